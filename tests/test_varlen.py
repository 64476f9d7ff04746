"""`block_sparse_attention_varlen`: packed sequences of any lengths against float64 dense references."""

import math

import pytest
import torch

from helpers import assert_grads_match, rel_l2
from video_sparse_attn import block_sparse_attention_varlen


def _reference(q, k, v, cq, ck, masks, qb, kb, causal=False, window_size=(-1, -1)):
    """Per sequence: float64 attention with its block mask expanded to tokens (k/v heads repeated) and
    the window bottom-right aligned within the sequence."""
    H = q.shape[1]
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].double().transpose(0, 1)
        ki, vi = (x[ck[i]:ck[i + 1]].double().transpose(0, 1).repeat_interleave(H // x.shape[1], 0) for x in (k, v))
        s = qi @ ki.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if masks is not None:
            tok = masks[i].repeat_interleave(qb, -2).repeat_interleave(kb, -1)[..., : qi.shape[1], : ki.shape[1]]
            s = s.masked_fill(~tok, float("-inf"))
        left, right = window_size[0], 0 if causal else window_size[1]
        d = torch.arange(ki.shape[1])[None, :] - torch.arange(qi.shape[1])[:, None] - (ki.shape[1] - qi.shape[1])
        if left >= 0:
            s = s.masked_fill(d < -left, float("-inf"))
        if right >= 0:
            s = s.masked_fill(d > right, float("-inf"))
        lse = torch.logsumexp(s, -1) if s.shape[-1] else torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None])
        outs.append((p @ vi).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=-1)


LENGTHS = [  # (q lengths, k lengths): empty sequences, 1, 17, block - 1, block + 1, q != k
    ([1, 17, 0, 31, 33], [5, 17, 3, 40, 33]),
    ([16, 0, 64], [16, 10, 0]),
    ([32, 0, 16], [64, 0, 32]),     # whole blocks only: the packing is the block layout (no copies)
]


@pytest.mark.parametrize("lq, lk", LENGTHS)
@pytest.mark.parametrize("Hk", [4, 1])
@pytest.mark.parametrize("with_masks", [False, True])
def test_varlen_matches_per_sequence_dense(lq, lk, Hk, with_masks):
    torch.manual_seed(sum(lq) + Hk)
    H, D, qb, kb = 4, 8, 16, 32
    cq = [0] + list(torch.tensor(lq).cumsum(0).tolist())
    ck = [0] + list(torch.tensor(lk).cumsum(0).tolist())
    q = torch.randn(cq[-1], H, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(ck[-1], Hk, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    masks = None
    if with_masks:
        masks = [torch.rand(H, -(-a // qb), -(-b // kb)) < 0.6 for a, b in zip(lq, lk)]
    out, lse = block_sparse_attention_varlen(q, k, v, cq, ck, masks, q_block=qb, k_block=kb, backend="torch")
    ref, ref_lse = _reference(q, k, v, cq, ck, masks, qb, kb)
    assert out.shape == (cq[-1], H, D) and lse.shape == (H, cq[-1])
    ok = torch.isfinite(ref_lse)
    assert rel_l2(out, ref) < 1e-12 and torch.equal(torch.isfinite(lse), ok)
    if ok.any():
        assert rel_l2(lse[ok], ref_lse[ok]) < 1e-12
    assert_grads_match(out, (q, k, v), ref, 1e-10)


def test_varlen_errors_name_the_values():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="offsets end at 9"):
        block_sparse_attention_varlen(q, q, q, [0, 9], [0, 10], q_block=16)
    with pytest.raises(ValueError, match="2 sequences but cu_seqlens_k 1"):
        block_sparse_attention_varlen(q, q, q, [0, 4, 10], [0, 10], q_block=16)
    with pytest.raises(ValueError, match=r"block_masks\[0\] must be bool \[\.\.\., 1, 1\]"):
        block_sparse_attention_varlen(q, q, q, [0, 10], [0, 10], [torch.ones(2, 2, dtype=torch.bool)], q_block=16)


@pytest.mark.interpreter
def test_varlen_through_triton_interpreter():
    torch.manual_seed(0)
    cq, ck = [0, 17, 17, 50], [0, 20, 25, 41]
    q = torch.randn(50, 2, 16, requires_grad=True)
    k, v = (torch.randn(41, 2, 16, requires_grad=True) for _ in range(2))
    out, lse = block_sparse_attention_varlen(q, k, v, cq, ck, q_block=16, backend="triton")
    ref, _ = _reference(q, k, v, cq, ck, None, 16, 16)
    assert rel_l2(out, ref) < 1e-5
    assert_grads_match(out, (q, k, v), ref, 1e-5)


@pytest.mark.parametrize("lq, lk", LENGTHS + [([15, 1, 40], [33, 17, 0])])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(20, 5)), dict(causal=True, window_size=(7, -1))])
def test_varlen_window_per_sequence(lq, lk, kw):
    """causal / sliding windows bottom-right aligned per sequence (as flash-attention's varlen), with
    empty sequences, lengths 1, block ± 1 and H_kv = 1, forward and backward vs float64."""
    torch.manual_seed(sum(lq) + sum(lk))
    H, Hk, D, qb, kb = 2, 1, 8, 16, 32
    cq = [0] + list(torch.tensor(lq).cumsum(0).tolist())
    ck = [0] + list(torch.tensor(lk).cumsum(0).tolist())
    q = torch.randn(cq[-1], H, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(ck[-1], Hk, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    masks = [torch.rand(H, -(-a // qb), -(-b // kb)) < 0.8 for a, b in zip(lq, lk)]
    out, lse = block_sparse_attention_varlen(q, k, v, cq, ck, masks, q_block=qb, k_block=kb, backend="torch", **kw)
    ref, ref_lse = _reference(q, k, v, cq, ck, masks, qb, kb, **kw)
    ok = torch.isfinite(ref_lse)
    assert rel_l2(out, ref) < 1e-12 and torch.equal(torch.isfinite(lse), ok)
    if ok.any():
        assert rel_l2(lse[ok], ref_lse[ok]) < 1e-12
    assert_grads_match(out, (q, k, v), ref, 1e-10)


@pytest.mark.interpreter
def test_varlen_causal_window_through_triton_interpreter():
    torch.manual_seed(3)
    cq, ck = [0, 17, 17, 50, 51], [0, 20, 25, 41, 41]
    q = torch.randn(51, 2, 16, requires_grad=True)
    k, v = (torch.randn(41, 1, 16, requires_grad=True) for _ in range(2))
    for kw in (dict(causal=True), dict(window_size=(9, 3))):
        out, _ = block_sparse_attention_varlen(q, k, v, cq, ck, q_block=16, backend="triton", **kw)
        ref, _ = _reference(q, k, v, cq, ck, None, 16, 16, **kw)
        assert rel_l2(out, ref) < 1e-5
        assert_grads_match(out, (q, k, v), ref, 1e-5)


@pytest.mark.parametrize("cu, err, words", [
    (torch.tensor([0.0, 20.5, 50.0]), TypeError, "cu_seqlens_q must be a 1-D integer tensor, got torch.float32"),
    (torch.tensor([[0, 20, 50]]), TypeError, r"1-D integer tensor, got torch.int64 of shape \(1, 3\)"),
    ([0, 20.5, 50], TypeError, "cu_seqlens_q must hold ints"),
    ([False, True], TypeError, "cu_seqlens_q must hold ints"),
    ("0,50", TypeError, "cu_seqlens_q must be a sequence of ints"),
])
def test_varlen_offsets_must_be_integers(cu, err, words):
    """Float offsets used to be truncated by int() (20.5 → 20): a silently different split."""
    q = torch.randn(50, 2, 16)
    with pytest.raises(err, match=words):
        block_sparse_attention_varlen(q, q, q, cu, [0, 20, 50], q_block=16, backend="torch")


def test_varlen_argument_errors_name_the_argument():
    q = torch.randn(50, 2, 16)
    with pytest.raises(ValueError, match="q_block=0: block sizes must be positive multiples of 16"):
        block_sparse_attention_varlen(q, q, q, [0, 50], [0, 50], q_block=0, backend="torch")
    with pytest.raises(ValueError, match="q, k, v are on different devices: cpu, meta, meta"):
        block_sparse_attention_varlen(q, q.to("meta"), q.to("meta"), [0, 50], [0, 50], q_block=16, backend="torch")
    with pytest.raises(TypeError, match="causal must be a bool"):
        block_sparse_attention_varlen(q, q, q, [0, 50], [0, 50], q_block=16, causal="no", backend="torch")
    with pytest.raises(ValueError, match=r"k and v must be \[Tk, H_kv, D=16\]"):
        block_sparse_attention_varlen(q, q[..., :8], q[..., :8], [0, 50], [0, 50], q_block=16, backend="torch")
    for m in (torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.ones(3, 4, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"block_masks\[0\] must be bool \[\.\.\., 4, 4\] \(2-D, or 3-D with H=2"):
            block_sparse_attention_varlen(q, q, q, [0, 50], [0, 50], [m], q_block=16, backend="torch")
    with pytest.raises(ValueError, match=r"block_masks\[0\] is on meta"):
        block_sparse_attention_varlen(q, q, q, [0, 50], [0, 50], [torch.ones(4, 4, dtype=torch.bool, device="meta")],
                                      q_block=16, backend="torch")
    with pytest.raises(TypeError, match="block_masks must be a list of 1 bool tensors"):
        block_sparse_attention_varlen(q, q, q, [0, 50], [0, 50], torch.ones(4, 4, dtype=torch.bool), q_block=16,
                                      backend="torch")
    # sequences of length 0, and an empty pack, still run
    out, lse = block_sparse_attention_varlen(q[:0], q[:0], q[:0], [0, 0], [0, 0], q_block=16, backend="torch")
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)

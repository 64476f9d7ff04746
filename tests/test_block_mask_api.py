"""`block_sparse_attention` given a block mask directly: any lengths, q block ≠ k block, GQA, LSE."""

import dataclasses
import math

import pytest
import torch

from helpers import assert_grads_match, block_window_reference, rel_l2
from video_sparse_attn import (BlockSparsePlan, SSTAConfig, TileLayout, block_sparse_attention, block_sparse_attention_varlen,
                               ssta_attention)


def _dense_reference(q, k, v, mask, qb, kb):
    """float64 attention with the block mask expanded to tokens (k/v heads repeated for GQA)."""
    H, Hk = q.shape[1], k.shape[1]
    k, v = (x.double().repeat_interleave(H // Hk, 1) for x in (k, v))
    tok = mask.repeat_interleave(qb, -2).repeat_interleave(kb, -1)[..., : q.shape[2], : k.shape[2]]
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None])
    return p @ v, lse


def _assert_equal_f64(out, lse, ref, ref_lse, inputs):
    """out and the finite lse equal the float64 reference, and so do the gradients through both."""
    ok = torch.isfinite(ref_lse)
    assert rel_l2(out, ref) < 1e-12 and torch.equal(torch.isfinite(lse), ok)
    if ok.any():
        assert rel_l2(lse[ok], ref_lse[ok]) < 1e-12
    g, gl = torch.randn_like(out), torch.randn_like(lse).masked_fill(~ok, 0)
    got = torch.autograd.grad((out * g).sum() + (lse.masked_fill(~ok, 0) * gl).sum(), inputs)
    exp = torch.autograd.grad((ref * g).sum() + (ref_lse.masked_fill(~ok, 0) * gl).sum(), inputs)
    for a, b in zip(got, exp):
        assert rel_l2(a, b) < 1e-10


@pytest.mark.parametrize("Sq, Sk, qb, kb", [(1, 1, 16, 16), (17, 33, 16, 32), (47, 48, 48, 16),
                                            (100, 70, 32, 64), (64, 64, 64, 64)])
@pytest.mark.parametrize("Hk", [4, 2, 1])
def test_mask_given_directly_matches_dense(Sq, Sk, qb, kb, Hk):
    torch.manual_seed(Sq * 7 + Sk + Hk)
    B, H, D = 2, 4, 8
    q = torch.randn(B, H, Sq, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hk, Sk, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    Mq, Nk = -(-Sq // qb), -(-Sk // kb)
    mask = torch.rand(B, H, Mq, Nk) < 0.6
    if Mq > 1:
        mask[:, :, 1] = False                                   # a query block that sees nothing
    out, lse = block_sparse_attention(q, k, v, mask, q_block=qb, k_block=kb, backend="torch")
    ref, ref_lse = _dense_reference(q, k, v, mask, qb, kb)
    assert out.shape == (B, H, Sq, D) and lse.shape == (B, H, Sq)
    _assert_equal_f64(out, lse, ref, ref_lse, (q, k, v))


def test_mask_shape_and_gqa_errors_name_the_values():
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 3, 40, 8)
    with pytest.raises(ValueError, match="q has 4, k 3"):
        block_sparse_attention(q, k, k, torch.ones(3, 3, dtype=torch.bool), q_block=16)
    with pytest.raises(ValueError, match=r"block mask is \(2, 2\) blocks but Sq=40, Sk=40"):
        block_sparse_attention(q, q, q, torch.ones(2, 2, dtype=torch.bool), q_block=16)
    with pytest.raises(ValueError, match="needs q_block"):
        block_sparse_attention(q, q, q, torch.ones(3, 3, dtype=torch.bool))


def test_ssta_attention_returns_lse_in_token_order():
    torch.manual_seed(0)
    thw, L = (3, 5, 6), 7
    q, k, v = (torch.randn(1, 2, 90 + L, 8, dtype=torch.float64) for _ in range(3))
    cfg = SSTAConfig(tile_thw=(2, 4, 4), sparse_type="dense", pad_type="mask", caller_rules=False)
    out, lse = ssta_attention(q, k, v, thw, cfg, L, return_lse=True, backend="torch")
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    assert rel_l2(lse, torch.logsumexp(s, -1)) < 1e-12
    assert rel_l2(out, torch.softmax(s, -1) @ v) < 1e-12


@pytest.mark.interpreter
@pytest.mark.parametrize("Sq, Sk, qb, kb", [(17, 33, 16, 32), (40, 64, 32, 16)])
def test_triton_interpreter_mask_api_with_lse_gradient(Sq, Sk, qb, kb):
    """Ragged last blocks, GQA and the lse gradient through the Triton kernels (interpreted, fp32)."""
    torch.manual_seed(Sq + Sk)
    B, H, Hk, D = 1, 2, 1, 16
    q = torch.randn(B, H, Sq, D, requires_grad=True)
    k, v = (torch.randn(B, Hk, Sk, D, requires_grad=True) for _ in range(2))
    mask = torch.rand(B, H, -(-Sq // qb), -(-Sk // kb)) < 0.7
    mask[..., 0, 0] = True
    out, lse = block_sparse_attention(q, k, v, mask, q_block=qb, k_block=kb, backend="triton")
    ref, ref_lse = _dense_reference(q, k, v, mask, qb, kb)
    ok = torch.isfinite(ref_lse)
    assert rel_l2(out, ref) < 1e-5 and rel_l2(lse[ok], ref_lse[ok]) < 1e-5
    g, gl = torch.randn_like(out), torch.randn_like(lse).masked_fill(~ok, 0)
    got = torch.autograd.grad((out * g).sum() + (lse.masked_fill(~ok, 0) * gl).sum(), (q, k, v))
    exp = torch.autograd.grad((ref * g).sum() + (ref_lse.masked_fill(~ok, 0) * gl.double()).sum(), (q, k, v))
    for a, b in zip(got, exp):
        assert rel_l2(a, b) < 1e-5


def _causal_reference(q, k, v, mask, qb, kb):
    """float64: the block mask expanded to tokens, and key j <= query i + Sk - Sq."""
    Sq, Sk = q.shape[2], k.shape[2]
    H, Hk = q.shape[1], k.shape[1]
    k, v = (x.double().repeat_interleave(H // Hk, 1) for x in (k, v))
    tok = mask.repeat_interleave(qb, -2).repeat_interleave(kb, -1)[..., :Sq, :Sk]
    tok = tok & (torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq))
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None]) @ v, lse


@pytest.mark.parametrize("Sq, Sk, qb, kb", [(40, 40, 16, 16), (17, 50, 16, 32), (50, 17, 32, 16), (1, 33, 16, 16)])
def test_causal_matches_dense_torch(Sq, Sk, qb, kb):
    torch.manual_seed(Sq + 3 * Sk)
    B, H, D = 1, 2, 8
    q = torch.randn(B, H, Sq, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, H, Sk, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.rand(B, H, -(-Sq // qb), -(-Sk // kb)) < 0.8
    out, lse = block_sparse_attention(q, k, v, mask, q_block=qb, k_block=kb, causal=True, backend="torch")
    ref, ref_lse = _causal_reference(q, k, v, mask, qb, kb)
    ok = torch.isfinite(ref_lse)
    assert rel_l2(out, ref) < 1e-12 and torch.equal(torch.isfinite(lse), ok)
    assert_grads_match(out, (q, k, v), ref, 1e-10)
    if Sq > 1:   # without the flag the same mask gives a different (non-causal) result
        assert rel_l2(block_sparse_attention(q, k, v, mask, q_block=qb, k_block=kb, backend="torch")[0], ref) > 1e-3


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True])
def test_causal_through_triton_interpreter(deterministic):
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    torch.manual_seed(1)
    Sq, Sk, qb, kb = 48, 64, 16, 32
    q = torch.randn(1, 2, Sq, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, Sk, 16, requires_grad=True) for _ in range(2))
    mask = torch.rand(1, 2, Sq // qb, Sk // kb) < 0.8
    mask[..., -1] = True
    ref, ref_lse = _causal_reference(q, k, v, mask, qb, kb)
    from video_sparse_attn.attention import _plan_for_mask

    plan = dataclasses.replace(_plan_for_mask(mask, Sq, Sk, qb, kb), window_hi=Sk - Sq)
    out, lse = block_sparse_attention_triton(q, k, v, plan, deterministic=deterministic)
    assert rel_l2(out, ref) < 1e-5
    assert_grads_match(out, (q, k, v), ref, 1e-5)


WINDOWS = [dict(causal=True), dict(window_size=(5, 3)), dict(window_size=(-1, 4)), dict(window_size=(10, -1)),
           dict(causal=True, window_size=(6, -1))]


@pytest.mark.parametrize("Sq, Sk, qb, kb", [(1, 1, 16, 16), (17, 33, 16, 32), (31, 33, 32, 16), (50, 17, 32, 16)])
@pytest.mark.parametrize("kw", WINDOWS)
def test_window_matches_dense_torch(Sq, Sk, qb, kb, kw):
    """Sliding windows / causal (bottom-right aligned), ragged lengths, H_kv = 1: out, lse and the
    gradients through both vs float64 dense attention."""
    torch.manual_seed(Sq + 5 * Sk + qb)
    B, H, D = 1, 2, 8
    q = torch.randn(B, H, Sq, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, 1, Sk, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.rand(B, H, -(-Sq // qb), -(-Sk // kb)) < 0.8
    out, lse = block_sparse_attention(q, k, v, mask, q_block=qb, k_block=kb, backend="torch", **kw)
    ref, ref_lse = block_window_reference(q, k, v, mask, qb, kb, **kw)
    _assert_equal_f64(out, lse, ref, ref_lse, (q, k, v))


def test_window_drops_blocks_outside_and_keeps_a_plans_own():
    from video_sparse_attn.attention import _plan_for_mask

    mask = torch.ones(4, 4, dtype=torch.bool)
    plan = _plan_for_mask(mask, 64, 64, 16, 16, (0, 0))                 # the diagonal only
    assert torch.equal(plan.to_dense()[0, 0], torch.eye(4, dtype=torch.bool))
    plan = _plan_for_mask(mask, 64, 64, 16, 16, (None, 0))              # causal: the lower triangle
    assert torch.equal(plan.to_dense()[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    plan = _plan_for_mask(mask, 50, 64, 16, 16, (None, 14))             # Sk - Sq = 14, ragged last q block
    assert torch.equal(plan.to_dense()[0, 0], torch.ones(4, 4, dtype=torch.bool).tril(1))
    q = torch.randn(1, 1, 64, 8, dtype=torch.float64)
    plan = dataclasses.replace(BlockSparsePlan.dense(1, 1, 4, 4, 16), window_lo=-3, window_hi=0)
    a = block_sparse_attention(q, q, q, plan, backend="torch")[0]
    b = block_sparse_attention(q, q, q, mask, q_block=16, backend="torch", window_size=(3, 0))[0]
    assert rel_l2(a, b) < 1e-14
    with pytest.raises(ValueError, match="window_size must be"):
        block_sparse_attention(q, q, q, mask, q_block=16, window_size=(3,))


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("Sq, Sk, qb, kb, kw", [(33, 47, 16, 32, dict(window_size=(9, 4))),
                                                (40, 17, 32, 16, dict(causal=True, window_size=(12, -1)))])
def test_window_through_triton_interpreter(deterministic, Sq, Sk, qb, kb, kw):
    """The Triton forward and both backwards with a sliding window, ragged blocks, H_kv = 1 (fp32)."""
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    torch.manual_seed(Sq + Sk)
    q = torch.randn(1, 2, Sq, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, Sk, 16, requires_grad=True) for _ in range(2))
    mask = torch.rand(1, 2, -(-Sq // qb), -(-Sk // kb)) < 0.8
    ref, ref_lse = block_window_reference(q, k, v, mask, qb, kb, **kw)
    if deterministic:   # the kernels directly, on the plan the public op builds
        from video_sparse_attn.attention import _pad_rows, _plan_for_mask
        from video_sparse_attn.plan import window_offsets

        plan = _plan_for_mask(mask, Sq, Sk, qb, kb, window_offsets(Sq, Sk, **kw))
        Mq, Nk = plan.num_q_blocks * qb, plan.num_k_blocks * kb
        kx, vx = (_pad_rows(x.expand(-1, 2, -1, -1), Nk) for x in (k, v))
        out, lse = block_sparse_attention_triton(_pad_rows(q, Mq), kx, vx, plan, deterministic=True)
        out, lse = out[:, :, :Sq], lse[:, :, :Sq]
    else:
        out, lse = block_sparse_attention(q, k, v, mask, q_block=qb, k_block=kb, backend="triton", **kw)
    ok = torch.isfinite(ref_lse)
    assert rel_l2(out, ref) < 1e-5 and torch.equal(torch.isfinite(lse), ok)
    assert_grads_match(out, (q, k, v), ref, 1e-5)


@pytest.mark.parametrize("bad", [(1,), (1.5, 2), "ab", 5, (True, 0)])
def test_window_size_must_be_two_ints(bad):
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match=r"window_size must be \(left, right\) ints"):
        block_sparse_attention(q, q, q, torch.ones(3, 3, dtype=torch.bool), q_block=16, backend="torch", window_size=bad)
    with pytest.raises(ValueError, match=r"window_size must be \(left, right\) ints"):
        block_sparse_attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), [0, 40], [0, 40],
                                      q_block=16, backend="torch", window_size=bad)


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("options", [{}, {"fwd_peel": False, "skip_padded_queries": False}], ids=["default", "unpeeled"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(150, 40)), dict(causal=True, window_size=(100, -1))],
                         ids=["causal", "window", "causal_window"])
def test_window_sub_tiles_inside_crossing_outside(kw, options, deterministic):
    """256-token blocks split into several kernel sub-tiles (forward 128 x 128, single-pass backward
    64 x 128), ragged last blocks: sub-tiles wholly inside the window run unmasked, those crossing its
    edge masked, those outside not at all; each kind occurs here. fp32 against float64 dense."""
    from video_sparse_attn.attention import _pad_rows, _plan_for_mask
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton
    from video_sparse_attn.plan import window_offsets

    torch.manual_seed(7)
    Sq, Sk, qb, kb = 600, 700, 256, 256
    q = torch.randn(1, 2, Sq, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, Sk, 16, requires_grad=True) for _ in range(2))
    mask = torch.rand(1, 2, -(-Sq // qb), -(-Sk // kb)) < 0.9
    ref, ref_lse = block_window_reference(q, k, v, mask, qb, kb, **kw)
    plan = _plan_for_mask(mask, Sq, Sk, qb, kb, window_offsets(Sq, Sk, **kw))
    Mq, Nk = plan.num_q_blocks * qb, plan.num_k_blocks * kb
    out, lse = block_sparse_attention_triton(_pad_rows(q, Mq), _pad_rows(k, Nk), _pad_rows(v, Nk), plan,
                                             kernel_options=options, deterministic=deterministic)
    out, lse = out[:, :, :Sq], lse[:, :, :Sq]
    ok = torch.isfinite(ref_lse)
    assert rel_l2(out, ref) < 1e-5 and torch.equal(torch.isfinite(lse), ok)
    assert_grads_match(out, (q, k, v), ref, 1e-5)


@pytest.mark.interpreter
def test_window_edge_found_past_64_kept_blocks():
    """The masked walks screen kept blocks 64 at a time: 70 blocks of 16 tokens, the mask a band around
    the diagonal plus the last block row and column, so the last row (forward, dQ: causal) and the
    last column (dK/dV: keys at or after the query) cross the window's edge in their second group of
    64 kept blocks, the others in the first. The deterministic backward runs both walks (dK/dV, dQ).
    fp32 against float64 dense."""
    from video_sparse_attn.attention import _pad_rows, _plan_for_mask
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton
    from video_sparse_attn.plan import window_offsets

    torch.manual_seed(3)
    S, blk = 1110, 16
    q, k, v = (torch.randn(1, 1, S, 16, requires_grad=True) for _ in range(3))
    n_blk = -(-S // blk)
    i = torch.arange(n_blk)
    mask = ((i[:, None] - i[None, :]).abs() <= 1) | (i[:, None] == n_blk - 1) | (i[None, :] == n_blk - 1)
    mask = mask[None, None]
    for kw in (dict(causal=True), dict(window_size=(0, -1))):
        ref, ref_lse = block_window_reference(q, k, v, mask, blk, blk, **kw)
        plan = _plan_for_mask(mask, S, S, blk, blk, window_offsets(S, S, **kw))
        n = plan.num_q_blocks * blk
        out, lse = block_sparse_attention_triton(*(_pad_rows(x, n) for x in (q, k, v)), plan,
                                                 kernel_options={"autotune": False}, deterministic=True)
        out, lse = out[:, :, :S], lse[:, :, :S]
        assert rel_l2(out, ref) < 1e-5 and torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
        assert_grads_match(out, (q, k, v), ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("thw, pad", [((2, 4, 8), "mask"), ((3, 5, 6), "zero")])
def test_ssta_attention_returns_lse_for_32_and_16_bit_inputs(dtype, thw, pad):
    """The float32 lse is returned to token order along its last dim (a row gather of 8-byte words
    over the last dim used to halve it and fail)."""
    L = 6
    S = math.prod(thw) + L
    q, k, v = (torch.randn(1, 2, S, 16).to(dtype) for _ in range(3))
    cfg = SSTAConfig(tile_thw=(1, 4, 4), sparse_type="dense", pad_type=pad, caller_rules=False)
    out, lse = ssta_attention(q, k, v, thw, cfg, L, return_lse=True, backend="torch")
    assert lse.shape == (1, 2, S) and lse.dtype == torch.float32
    s = (q.double() @ k.double().transpose(-1, -2)) / 4
    if pad == "zero":   # padding stays visible: zero keys (logit 0) and copies of the last text key
        layout = TileLayout(thw, cfg.tile_thw, L, pad)
        n_zero = layout.num_video_blocks * layout.tile_volume - layout.num_video_tokens
        n_copy = layout.num_text_blocks * layout.tile_volume - L
        s = torch.cat([s, torch.zeros(*s.shape[:-1], n_zero, dtype=s.dtype), s[..., -1:].expand(-1, -1, -1, n_copy)], -1)
    assert rel_l2(lse, torch.logsumexp(s, -1)) < 1e-3

"""Triton kernels (forward, both backwards, autograd) vs the torch reference and float64 dense attention.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before anything imports
Triton, and skips the `interpreter` tests where that interpreter cannot run them); shapes are tiny.
bf16 is not tested here: the interpreter's bf16 `tl.dot` is broken. Kernel options are passed
explicitly; nothing here reads the process environment.
"""

import dataclasses
import math
import os

import pytest
import torch

from helpers import golden_cases, load_golden, plan_token_mask, rel_l2
from video_sparse_attn import BlockSparsePlan, ssta_attention
from video_sparse_attn.kernels.torch_ref import block_sparse_attention_torch

pytestmark = pytest.mark.interpreter
triton_op = pytest.importorskip("video_sparse_attn.kernels.triton_op")
attn = triton_op.block_sparse_attention_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _dense_reference(q, k, v, plan, scale=None):
    """float64 dense attention with the plan's block mask expanded to tokens, its window and key bias
    (empty rows → 0)."""
    B, H, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = plan_token_mask(plan, B, H)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if plan.key_bias is not None:
        s = s + plan.key_bias.double()[:, None, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double()


def _inputs(B, H, Sq, Sk, D, dtype, bshd=False):
    """q [B,H,Sq,D], k/v [B,H,Sk,D]; with ``bshd`` they are transposed views of [B,S,H,D] tensors."""
    def one(S):
        if bshd:
            x = torch.randn(B, S, H, D, device=DEV, dtype=dtype).transpose(1, 2)
            assert not x.is_contiguous()
            return x.requires_grad_()
        return torch.randn(B, H, S, D, device=DEV, dtype=dtype, requires_grad=True)
    return one(Sq), one(Sk), one(Sk)


def _compare(q, k, v, plan, dtype, scale=None, deterministic=False, options=None):
    """Forward and backward against the torch reference; forward against float64 dense.

    Padded query rows (past ``plan.q_valid``) of q are zeroed for the references, so whatever they
    hold in ``q`` must not reach the kernels' results.
    """
    out, lse = attn(q, k, v, plan, scale, kernel_options=options, deterministic=deterministic)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q = q.detach().masked_fill(~plan.query_valid()[:, None, :, None], 0.0)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref, ref_lse = block_sparse_attention_torch(q32, k32, v32, plan, scale)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())

    tol = TOL[dtype]
    assert rel_l2(out, ref) < tol
    assert rel_l2(out, _dense_reference(q, k, v, plan, scale)) < tol
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse[fin], ref_lse[fin], atol=1e-4, rtol=1e-4)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert not g.isnan().any(), name
        assert rel_l2(g, r) < tol, (name, rel_l2(g, r))
    return out, lse, grads


def _plan(mask, qb, kb, k_valid=None, q_valid=None, **kw):
    return BlockSparsePlan.from_block_mask(mask.to(DEV), qb, kb, None if k_valid is None else k_valid.to(DEV),
                                           None if q_valid is None else q_valid.to(DEV), **kw)


@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "det"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_empty_rows_heterogeneous_blocks(dtype, deterministic):
    B, H, D, qb, kb, Mq, Nk = 1, 2, 32, 32, 16, 3, 5
    mask = torch.rand(B, H, Mq, Nk) < 0.5
    mask[0, 0, 1] = False                    # an empty query block
    mask[0, 1, 2] = True                     # a row with every block (text row)
    mask[0, 1, 0] = False
    mask[0, 1, 0, 3] = True                  # a row whose only block has k_valid 0 → empty as well
    k_valid = torch.tensor([[16, 16, 7, 0, 16]], dtype=torch.int32)
    plan = _plan(mask, qb, kb, k_valid)
    q, k, v = _inputs(B, H, Mq * qb, Nk * kb, D, dtype)
    out, lse, grads = _compare(q, k, v, plan, dtype, deterministic=deterministic)
    assert (out[0, 0, qb:2 * qb] == 0).all() and torch.isneginf(lse[0, 0, qb:2 * qb]).all()
    assert torch.isneginf(lse[0, 1, :qb]).all()
    assert (grads[0][0, 0, qb:2 * qb] == 0).all()
    assert (grads[1][0, :, 3 * kb:4 * kb] == 0).all()          # keys of a zero-valid block get no gradient
    assert (grads[2][0, :, 2 * kb + 7:3 * kb] == 0).all()      # nor do the padded tail keys


def test_broadcast_plan_strided_views_padded_head_dim():
    # plan with B = H = 1 index tensors and per-batch k_valid; [B,S,H,D] views; D = 24 padded to 32
    B, H, D, qb, kb, Mq, Nk = 2, 3, 24, 16, 32, 4, 3
    mask = torch.rand(1, 1, Mq, Nk) < 0.6
    mask[0, 0, -1] = True
    k_valid = torch.tensor([[32, 32, 5], [32, 17, 32]], dtype=torch.int32)
    plan = _plan(mask, qb, kb, k_valid)
    q, k, v = _inputs(B, H, Mq * qb, Nk * kb, D, torch.float32, bshd=True)
    _compare(q, k, v, plan, torch.float32, scale=0.3)


def test_head_broadcast_batch_specific_plan_dense_mode():
    B, H, D, qb = 2, 2, 16, 32
    plan = BlockSparsePlan.dense(B, 1, 2, 3, qb, 16, device=DEV)
    q, k, v = _inputs(B, H, 2 * qb, 3 * 16, D, torch.float16)
    out, _, _ = _compare(q, k, v, plan, torch.float16)
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4.0, -1) @ v.double()
    assert rel_l2(out, ref) < 2e-3


def test_every_element_written():
    # outputs are allocated uninitialised; a memory pool full of NaN must not leak into the result
    B, H, D, qb = 1, 1, 16, 16
    mask = torch.tensor([[True, False], [False, False]])
    plan = _plan(mask, qb, qb)
    q, k, v = (torch.randn(B, H, 2 * qb, D, device=DEV) for _ in range(3))
    for _ in range(2):
        torch.full((1 << 16,), float("nan"), device=DEV)  # recycle memory with NaN
        out, lse = attn(q, k, v, plan)
        assert not out.isnan().any() and not lse.isnan().any()
        assert (out[0, 0, qb:] == 0).all() and torch.isneginf(lse[0, 0, qb:]).all()


def test_input_errors():
    plan = BlockSparsePlan.dense(1, 1, 2, 2, 16, device=DEV)
    q = torch.randn(1, 1, 32, 16, device=DEV)
    with pytest.raises(ValueError, match="float64"):
        attn(q.double(), q.double(), q.double(), plan)
    with pytest.raises(ValueError, match="plan covers"):
        attn(q[:, :, :16], q[:, :, :16], q[:, :, :16], plan)
    with pytest.raises(ValueError, match="scale must be a finite positive float"):
        attn(q, q, q, plan, scale=-1.0)
    big = torch.randn(1, 1, 32, 272, device=DEV)
    with pytest.raises(ValueError, match="head dim 272"):
        attn(big, big, big, plan)
    with pytest.raises(ValueError, match="batch/head"):
        attn(*(torch.randn(1, 3, 32, 16, device=DEV) for _ in range(3)), BlockSparsePlan.dense(1, 2, 2, 2, 16, device=DEV))


GOLDEN = golden_cases()


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: os.path.basename(p)[:-12])
def test_golden_through_ssta_attention(path):
    t, params, config = load_golden(path)
    q, k, v = (t[n].to(DEV) for n in "qkv")
    mask = t.get("text_mask")
    out = ssta_attention(q, k, v, tuple(params["thw"]), config, params["text_len"],
                         None if mask is None else mask.to(DEV), backend="triton")
    assert rel_l2(out, t["out"].to(DEV)) < 1e-5


# ---------------------------------------------------------------- padding-free queries (q_valid)
def _padded_query_case(dtype, per_batch=True, nan=True):
    """q_block 256 splits into several kernel sub-tiles (forward 128 rows, single-pass backward 64 rows),
    so q_valid cuts sub-tiles partly (100, 200), leaves whole sub-tiles padded (rows 128-255 of block
    0) and pads whole blocks (0). Padded rows of q hold NaN where a whole block is padded and large
    values elsewhere: neither may leak into any result."""
    B, H, D, qb, kb, Mq, Nk = 2, 2, 16, 256, 32, 2, 5
    mask = torch.rand(1, H, Mq, Nk) < 0.6
    mask[..., 0] = True
    k_valid = torch.tensor([[32, 32, 32, 9, 32]], dtype=torch.int32)
    q_valid = torch.tensor([[100, 256], [0, 200]] if per_batch else [[100, 200]], dtype=torch.int32)
    plan = _plan(mask, qb, kb, k_valid, q_valid)
    q, k, v = _inputs(B, H, Mq * qb, Nk * kb, D, dtype)
    pad = ~plan.query_valid().expand(B, -1)                                   # [B, Sq]
    with torch.no_grad():
        q.masked_fill_(pad[:, None, :, None], 1e3)
        whole = (plan.q_valid.expand(B, -1) == 0).repeat_interleave(qb, 1)    # rows of fully padded blocks
        q.masked_fill_(whole[:, None, :, None], float("nan") if nan else -1e3)
    return plan, q, k, v, pad


@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "det"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_queries(dtype, deterministic):
    plan, q, k, v, pad = _padded_query_case(dtype)
    out, lse, (dq, dk, dv) = _compare(q, k, v, plan, dtype, deterministic=deterministic)
    rows = pad[:, None, :].expand_as(lse)
    assert pad.sum() == 156 + 256 + 56
    assert (out[rows] == 0).all() and torch.isneginf(lse[rows]).all()
    assert (dq[rows] == 0).all()
    assert torch.isfinite(lse[~rows]).all()                    # every valid row sees block 0
    assert not dk.isnan().any() and not dv.isnan().any()


@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "det"])
def test_padded_queries_flat_dkdv_loop(deterministic):
    """``skip_padded_queries=False``: the dK/dV loop visits padded sub-tiles too (finite padding),
    with the same results; with NaN in a fully padded block only the skipping loop stays clean."""
    plan, q, k, v, pad = _padded_query_case(torch.float32, nan=False)
    flat = {"skip_padded_queries": False}
    _compare(q, k, v, plan, torch.float32, deterministic=deterministic, options=flat)
    plan, q, k, v, pad = _padded_query_case(torch.float32, nan=True)
    out, _ = attn(q, k, v, plan, kernel_options=flat, deterministic=deterministic)
    assert torch.autograd.grad(out, k, torch.randn_like(out))[0].isnan().any()


def test_padded_queries_broadcast_q_valid():
    plan, q, k, v, pad = _padded_query_case(torch.float32, per_batch=False)
    assert plan.q_valid.shape[0] == 1
    out, lse, (dq, _, _) = _compare(q, k, v, plan, torch.float32)
    assert (out[pad[:, None, :].expand_as(lse)] == 0).all() and (dq[pad[:, None, :].expand_as(lse)] == 0).all()


# ---------------------------------------------------------------- backward modes
def test_deterministic_backward_bit_identical_and_matches_single_pass():
    B, H, D, qb, kb, Mq, Nk = 1, 2, 16, 32, 16, 3, 4
    mask = torch.rand(B, H, Mq, Nk) < 0.7
    mask[..., 1] = True
    plan = _plan(mask, qb, kb, torch.tensor([[16, 16, 5, 16]], dtype=torch.int32))
    q, k, v = _inputs(B, H, Mq * qb, Nk * kb, D, torch.float32)
    dout = torch.randn(B, H, Mq * qb, D, device=DEV)

    def grads(deterministic):
        out, _ = attn(q, k, v, plan, deterministic=deterministic)
        return torch.autograd.grad(out, (q, k, v), dout)

    first, second, single = grads(True), grads(True), grads(False)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        assert rel_l2(c, a) < 1e-5


# ---------------------------------------------------------------- kernel options
def test_kernel_options_rejects_unknown_keys_and_bad_values():
    plan = BlockSparsePlan.dense(1, 1, 2, 2, 16, device=DEV)
    q = torch.randn(1, 1, 32, 16, device=DEV)
    with pytest.raises(ValueError, match=r"unknown kernel_options \['BLOCK_M'\]") as e:
        attn(q, q, q, plan, kernel_options={"BLOCK_M": 64})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="dq_reduce"):
        attn(q, q, q, plan, kernel_options={"dq_reduce": "smem"})
    with pytest.raises(ValueError, match="fwd_peel"):
        attn(q, q, q, plan, kernel_options={"fwd_peel": 1})
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options

    assert resolve_kernel_options(None) == resolve_kernel_options({}) == {
        "tma": True, "warp_specialize": False, "fwd_peel": True, "fwd_lazy": True, "autotune": True,
        "dq_reduce": "atomic", "skip_padded_queries": True, "gluon": True, "gluon_fwd_stages": 2,
        "gluon_bwd_stages": 2, "gluon_bwd_overlap": True}
    assert resolve_kernel_options({"tma": False})["tma"] is False
    assert resolve_kernel_options({"gluon_fwd_stages": 3})["gluon_fwd_stages"] == 3
    for key, bad in (("gluon_fwd_stages", 4), ("gluon_bwd_stages", True), ("gluon_bwd_overlap", 1)):
        with pytest.raises(ValueError, match=key):
            resolve_kernel_options({key: bad})


@pytest.mark.parametrize("options", [
    {"fwd_peel": False, "fwd_lazy": False},                       # the v3 loop (ragged branch, eager rescale)
    {"fwd_peel": True, "fwd_lazy": False, "tma": False, "autotune": False},
    {"fwd_peel": False, "fwd_lazy": True, "dq_reduce": "tma"},    # tma reduce falls back to atomics here
], ids=["v3", "peel", "lazy"])
def test_kernel_option_variants_agree(options):
    B, H, D, qb, kb, Mq, Nk = 1, 2, 16, 32, 32, 3, 4
    mask = torch.rand(B, H, Mq, Nk) < 0.6
    mask[..., 2] = True
    k_valid = torch.tensor([[32, 32, 19, 32]], dtype=torch.int32)        # ragged sub-tile in the key loop
    plan = _plan(mask, qb, kb, k_valid, torch.tensor([[32, 20, 32]], dtype=torch.int32))
    q, k, v = _inputs(B, H, Mq * qb, Nk * kb, D, torch.float32)
    _compare(q, k, v, plan, torch.float32, options=options)


# ---------------------------------------------------------------- per-key score bias (plan.key_bias)
def _key_bias_case(dtype, per_batch, window=False):
    """k_block 256: the forward (128-key sub-tiles) and the dQ kernel (64) walk several sub-tiles per
    block; k_valid ends inside a sub-tile (the peeled / masked loops), one block has no key; an empty
    query block; a random bias (natural log, up to 4: multiplicities up to ~55) per batch or broadcast."""
    B, H, D, qb, kb, Mq, Nk = 2, 2, 16, 128, 256, 4, 2
    mask = torch.rand(1, H, Mq, Nk) < 0.7
    mask[..., 0] = True
    mask[0, 0, 1] = False                              # an empty query block
    k_valid = torch.tensor([[256, 150]] if window else [[150, 256], [0, 210]], dtype=torch.int32)
    q_valid = torch.tensor([[128, 100, 128, 60]], dtype=torch.int32)
    key_bias = torch.rand(B if per_batch else 1, Nk * kb) * 4
    extra = dict(window_hi=0) if window else {}        # causal (Sq == Sk): the diagonal crosses sub-tiles
    plan = _plan(mask, qb, kb, k_valid, q_valid, key_bias=key_bias.to(DEV), **extra)
    return plan, _inputs(B, H, Mq * qb, Nk * kb, D, dtype)


@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "det"])
@pytest.mark.parametrize("dtype, per_batch", [(torch.float32, True), (torch.float16, False)])
def test_key_bias(dtype, per_batch, deterministic):
    """Forward and both backwards with a per-key bias equal the torch backend and float64 dense attention
    with the bias (ragged keys, an empty block row, padded query rows)."""
    plan, (q, k, v) = _key_bias_case(dtype, per_batch)
    out, lse, grads = _compare(q, k, v, plan, dtype, deterministic=deterministic)
    plain = dataclasses.replace(plan, key_bias=None)                 # the bias changes the result
    assert rel_l2(attn(q, k, v, plain)[0], out) > 1e-2
    assert (out[:, 0, 128:256] == 0).all() and torch.isneginf(lse[:, 0, 128:256]).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["onepass", "det"])
def test_key_bias_causal_window(deterministic):
    """With a causal window every walk that recomputes scores adds the bias: the forward's masked window
    loop (crossing and ragged sub-tiles), the dK/dV and dQ crossing walks."""
    plan, (q, k, v) = _key_bias_case(torch.float32, True, window=True)
    assert plan.has_window
    _compare(q, k, v, plan, torch.float32, deterministic=deterministic)


def test_key_bias_v3_loop():
    """The unpeeled forward loop (ragged tail masked in the main loop) with eager rescaling adds the bias too."""
    plan, (q, k, v) = _key_bias_case(torch.float32, False)
    _compare(q, k, v, plan, torch.float32, options={"fwd_peel": False, "fwd_lazy": False})

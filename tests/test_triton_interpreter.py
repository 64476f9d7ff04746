"""Triton kernels (forward, backward, autograd) vs the torch reference and float64 dense attention.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before anything imports
Triton, and skips the `interpreter` tests where that interpreter cannot run them); shapes are tiny.
bf16 is not tested here: the interpreter's bf16 `tl.dot` is broken.
"""

import math
import os

import pytest
import torch

from helpers import golden_cases, load_golden, rel_l2
from video_sparse_attn import BlockSparsePlan, ssta_attention
from video_sparse_attn.kernels.torch_ref import block_sparse_attention_torch

pytestmark = pytest.mark.interpreter
triton_op = pytest.importorskip("video_sparse_attn.kernels.triton_op")
attn = triton_op.block_sparse_attention_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _dense_reference(q, k, v, plan, scale=None):
    """float64 dense attention with the plan's block mask expanded to tokens (empty rows → 0)."""
    B, H, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = plan.to_dense().expand(B, H, -1, -1)
    mask = mask.repeat_interleave(plan.q_block, 2).repeat_interleave(plan.k_block, 3)
    mask = mask & plan.token_valid()[:, None, None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
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


def _compare(q, k, v, plan, dtype, scale=None):
    """Forward and backward against the torch reference; forward against float64 dense."""
    out, lse = attn(q, k, v, plan, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

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


def _plan(mask, qb, kb, k_valid=None):
    return BlockSparsePlan.from_block_mask(mask.to(DEV), qb, kb, None if k_valid is None else k_valid.to(DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_empty_rows_heterogeneous_blocks(dtype):
    B, H, D, qb, kb, Mq, Nk = 1, 2, 32, 32, 16, 3, 5
    mask = torch.rand(B, H, Mq, Nk) < 0.5
    mask[0, 0, 1] = False                    # an empty query block
    mask[0, 1, 2] = True                     # a row with every block (text row)
    mask[0, 1, 0] = False
    mask[0, 1, 0, 3] = True                  # a row whose only block has k_valid 0 → empty as well
    k_valid = torch.tensor([[16, 16, 7, 0, 16]], dtype=torch.int32)
    plan = _plan(mask, qb, kb, k_valid)
    q, k, v = _inputs(B, H, Mq * qb, Nk * kb, D, dtype)
    out, lse, grads = _compare(q, k, v, plan, dtype)
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
    with pytest.raises(TypeError, match="float64"):
        attn(q.double(), q.double(), q.double(), plan)
    with pytest.raises(ValueError, match="plan covers"):
        attn(q[:, :, :16], q[:, :, :16], q[:, :, :16], plan)
    with pytest.raises(ValueError, match="scale must be positive"):
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

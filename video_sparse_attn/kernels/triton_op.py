"""`block_sparse_attention_triton`: the Triton kernels behind one autograd function.

Input checks live here; the kernels (`triton_fwd`, `triton_bwd`) trust what they are given.
Tuning knobs arrive as ``kernel_options`` (see `triton_common.KernelOptions`), never from the
process environment.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from .triton_bwd import attention_backward
from .triton_common import KernelOptions, resolve_kernel_options
from .triton_fwd import attention_forward

__all__ = ["block_sparse_attention_triton", "MAX_HEAD_DIM", "KernelOptions"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D], got {getattr(x, 'shape', type(x))}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name}: the Triton kernels take float16/bfloat16/float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == plan.device):
        raise ValueError(f"q, k, v and the plan must share a device: {q.device}, {k.device}, {v.device}, {plan.device}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    B, H, Sq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, H={H}, Sk, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is larger than the kernels support ({MAX_HEAD_DIM})")
    Mq, Nk = plan.num_q_blocks, plan.num_k_blocks
    if Sq != Mq * plan.q_block or k.shape[2] != Nk * plan.k_block:
        raise ValueError(
            f"plan covers Sq={Mq}*{plan.q_block}, Sk={Nk}*{plan.k_block} but q has {Sq} rows and k has {k.shape[2]}"
        )
    Bp, Hp = plan.kv_count.shape[:2]
    if Bp not in (1, B) or Hp not in (1, H) or plan.k_valid.shape[0] not in (1, B) or plan.q_valid.shape[0] not in (1, B):
        raise ValueError(
            f"plan batch/head dims ({Bp}, {Hp}), k_valid batch {plan.k_valid.shape[0]} and q_valid batch "
            f"{plan.q_valid.shape[0]} must be 1 or match q's ({B}, {H})"
        )
    for name in ("kv_count", "kv_index", "q_count", "q_index", "row_order", "col_order", "k_valid", "q_valid"):
        t = getattr(plan, name)
        if t.dtype != torch.int32 or t.stride(-1) != 1:
            raise ValueError(f"plan.{name} must be int32 with a unit last stride, got {t.dtype}, strides {t.stride()}")


#: The backward that runs when the caller does not choose. On an H200 at the HunyuanVideo-1.5 720p SSTA
#: mask (benchmarks/NOTES.md, v6): single pass with atomic dQ and pointer loads 186.4 ms, two-pass
#: (no atomics, bit-reproducible: ``deterministic=True``) 193.5 ms, FlexAttention 194.8 ms.
DEFAULT_DETERMINISTIC = False


class _BlockSparseAttention(torch.autograd.Function):
    """out, lse = attention(q, k, v); backward: single pass (float32 dQ buffer) or, with
    ``deterministic``, two passes without atomics."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, options, deterministic):
        out, lse = attention_forward(q, k, v, plan, scale, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.options, ctx.deterministic = plan, scale, options, deterministic
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(q, k, v, out, lse, dout, ctx.plan, ctx.scale, ctx.options,
                                        deterministic=ctx.deterministic, dlse=dlse)
        return dq, dk, dv, None, None, None, None


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    scale: Optional[float] = None,
    kernel_options: Optional[KernelOptions] = None,
    deterministic: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of block-ordered tensors over ``plan`` with the Triton kernels.

    Args:
        q: ``[B, H, Mq*q_block, D]``; k, v: ``[B, H, Nk*k_block, D]``; any strides (e.g. transposed
            ``[B, S, H, D]`` views), float16/bfloat16/float32, ``D <= 256``.
        plan: `BlockSparsePlan` on the same device, batch/head dims B or 1. Query rows past
            ``plan.q_valid`` are not computed (out 0, lse -inf, dq 0, no dk/dv contribution).
        scale: softmax scale, default ``1/sqrt(D)``.
        kernel_options: tuning knobs (`KernelOptions`: ``tma``, ``warp_specialize``, ``fwd_peel``,
            ``fwd_lazy``, ``autotune``, ``dq_reduce``); unknown keys raise ValueError.
        deterministic: True: the two-pass backward (no atomics, bit-reproducible); False: the single
            pass that adds dQ with atomics (5 block GEMMs instead of 7); None: the default,
            `DEFAULT_DETERMINISTIC` (the single pass, measured faster).

    Returns:
        ``out [B, H, Sq, D]`` in q's dtype and ``lse [B, H, Sq]`` float32 (natural log; -inf and
        out 0 for rows that see no key). Both differentiable in q, k, v.
    """
    options = resolve_kernel_options(kernel_options)
    _check(q, k, v, plan)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    deterministic = DEFAULT_DETERMINISTIC if deterministic is None else bool(deterministic)
    return _BlockSparseAttention.apply(q, k, v, plan, scale, options, deterministic)

"""`block_sparse_attention_triton`: the Triton kernels behind one autograd function.

Input checks live here; the kernels (`triton_fwd`, `triton_bwd`) trust what they are given.
Tuning knobs arrive as ``kernel_options`` (see `triton_common.KernelOptions`), never from the
process environment.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .precompile import precompile_backward_async
from .triton_bwd import attention_backward
from .triton_common import KernelOptions, resolve_kernel_options
from .triton_fwd import attention_forward

__all__ = ["block_sparse_attention_triton", "run_triton", "KernelOptions"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, scale: Optional[float]) -> float:
    """Checks for direct callers (the public ops check once at their entry and skip these): shapes,
    plan and scale as for every backend (`validation.validate_block_inputs`), what this backend runs
    (the registry's `BackendSpec`), and the plan's index layout the kernels read. Returns the scale."""
    from ..validation import validate_block_inputs
    from .registry import BACKENDS, AttentionCall

    scale = validate_block_inputs(q, k, v, plan, scale)
    why = BACKENDS["triton"].unsupported(AttentionCall.of(q, plan))
    if why is not None:
        raise ValueError(f"the Triton kernels cannot run this call: {why}")
    for name in ("kv_count", "kv_index", "q_count", "q_index", "row_order", "col_order", "k_valid", "q_valid", "window_shift"):
        t = getattr(plan, name)
        if t.dtype != torch.int32 or t.stride(-1) != 1:
            raise ValueError(f"plan.{name} must be int32 with a unit last stride, got {t.dtype}, strides {t.stride()}")
    return scale


#: The backward that runs when the caller does not choose. On an H200 at the HunyuanVideo-1.5 720p SSTA
#: mask (benchmarks/NOTES.md, v6): single pass with atomic dQ and pointer loads 186.4 ms, two-pass (no
#: atomics, bit-reproducible: ``deterministic=True``) 193.5 ms, FlexAttention 194.8 ms; on Hopper the
#: single pass runs the Gluon kernel (dQ by TMA reduce-add; v9, another run: 149.0 ms, Flex 195.4 ms).
DEFAULT_DETERMINISTIC = False


class _BlockSparseAttention(torch.autograd.Function):
    """out, lse = attention(q, k, v); backward: single pass (float32 dQ buffer) or, with
    ``deterministic``, bit-reproducible (two passes without atomics; on Hopper the Gluon single pass with
    dQ in fixed point)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, options, deterministic):
        if any(ctx.needs_input_grad[:3]):   # first call of a kind: the backward compiles beside the forward
            precompile_backward_async(q, k, v, plan, scale, options, deterministic)
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
        kernel_options: tuning knobs (`KernelOptions`: ``gluon``, ``tma``, ``warp_specialize``, ``fwd_peel``,
            ``fwd_lazy``, ``autotune``, ``dq_reduce``, ``skip_padded_queries``, ``gluon_fwd_stages``,
            ``gluon_fwd_skip_idle``, ``gluon_bwd_stages``, ``gluon_bwd_overlap``); unknown keys raise ValueError.
        deterministic: True: a bit-reproducible backward (the two-pass kernels, no atomics; on Hopper
            the Gluon single pass with dQ added in fixed point, whose integer sums do not depend
            on their order); False: the single pass that adds dQ with float atomics (5 block GEMMs
            instead of 7); None: the default, `DEFAULT_DETERMINISTIC` (the single pass, measured faster).

    Returns:
        ``out [B, H, Sq, D]`` in q's dtype and ``lse [B, H, Sq]`` float32 (natural log; -inf and
        out 0 for rows that see no key). Both differentiable in q, k, v.
    """
    options = resolve_kernel_options(kernel_options)
    scale = _check(q, k, v, plan, scale)
    return run_triton(q, k, v, plan, scale, options, deterministic)


def run_triton(q, k, v, plan, scale: float, options: Optional[dict] = None,
               deterministic: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`block_sparse_attention_triton` without its input checks (for callers that validated already)."""
    options = resolve_kernel_options(options)
    deterministic = DEFAULT_DETERMINISTIC if deterministic is None else bool(deterministic)
    return _BlockSparseAttention.apply(q, k, v, plan, scale, options, deterministic)

"""The torch backend as `torch.library` custom ops, so that `torch.compile(fullgraph=True)` sees one
opaque node instead of the reference's data-dependent loop width (a host read of ``kv_count.max()``).

``vsa::block_sparse_attention_torch`` (forward) and ``vsa::block_sparse_attention_torch_bwd`` (its
vector-Jacobian product, recomputing the forward) take the plan as `plan.op_args` gives it (its list of
tensor fields, the optional ``key_bias``, the static ints ``q_block`` / ``k_block`` / ``window_lo`` /
``window_hi``); `register_fake` gives their output shapes and `register_autograd` links the two.
`block_sparse_attention_torch_op` has the signature of `block_sparse_attention_torch` and returns the
same values, forward and backward.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..plan import BlockSparsePlan, from_op_args, op_args
from .torch_ref import block_sparse_attention_torch as _reference

__all__ = ["block_sparse_attention_torch_op", "block_sparse_attention_torch_traceable"]



@torch.library.custom_op("vsa::block_sparse_attention_torch", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan_tensors: List[torch.Tensor],
             key_bias: Optional[torch.Tensor], q_block: int, k_block: int, window_lo: Optional[int],
             window_hi: Optional[int], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    plan = from_op_args(plan_tensors, key_bias, q_block, k_block, window_lo, window_hi)
    with torch.no_grad():
        out, lse = _reference(q, k, v, plan, scale)
    return out.contiguous(), lse.contiguous()


@_forward.register_fake
def _forward_fake(q, k, v, plan_tensors, key_bias, q_block, k_block, window_lo, window_hi, scale):
    B, H, Sq, D = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32   # the reference's compute dtype
    return q.new_empty(B, H, Sq, D), q.new_empty(B, H, Sq, dtype=lse_dtype)


@torch.library.custom_op("vsa::block_sparse_attention_torch_bwd", mutates_args=())
def _backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, plan_tensors: List[torch.Tensor], key_bias: Optional[torch.Tensor], q_block: int,
              k_block: int, window_lo: Optional[int], window_hi: Optional[int],
              scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = from_op_args(plan_tensors, key_bias, q_block, k_block, window_lo, window_hi)
    use_lse = grad_lse is not None and bool(grad_lse.any())   # as eager: lse joins only when it is used

    def f(q_, k_, v_):
        out, lse = _reference(q_, k_, v_, plan, scale)
        return (out, lse) if use_lse else (out,)

    _, vjp = torch.func.vjp(f, q, k, v)    # autograd is below us here; functorch's vjp still works
    grads = vjp((grad_out, grad_lse) if use_lse else (grad_out,))
    return tuple(torch.zeros_like(x) if g is None else g.contiguous() for g, x in zip(grads, (q, k, v)))


@_backward.register_fake
def _backward_fake(grad_out, grad_lse, q, k, v, plan_tensors, key_bias, q_block, k_block, window_lo, window_hi,
                   scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, plan_tensors, key_bias, q_block, k_block, window_lo, window_hi, scale = inputs
    ctx.save_for_backward(q, k, v, key_bias, *plan_tensors)
    ctx.blocks_scale = (q_block, k_block, window_lo, window_hi, scale)


def _vjp(ctx, grad_out, grad_lse):
    q, k, v, key_bias, *plan_tensors = ctx.saved_tensors
    dq, dk, dv = _backward(grad_out, grad_lse, q, k, v, plan_tensors, key_bias, *ctx.blocks_scale)
    return dq, dk, dv, [None] * len(plan_tensors), None, None, None, None, None, None


_forward.register_autograd(_vjp, setup_context=_setup_context)


def block_sparse_attention_torch_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsePlan,
                                    scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`block_sparse_attention_torch` through the custom ops: ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``
    → ``(out [B, H, Sq, D], lse [B, H, Sq] float32)``; traceable by `torch.compile` with ``fullgraph=True``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _forward(q, k, v, *op_args(plan), scale)


def block_sparse_attention_torch_traceable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                           plan: BlockSparsePlan, scale: Optional[float] = None
                                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch backend for a dispatcher: the custom ops while `torch.compile` traces or on the meta
    device (their fake kernels give the shapes; the reference reads kept-block counts on the host),
    the reference (autograd through its own graph, no recomputation) in eager mode. Same values
    either way."""
    if torch.compiler.is_compiling() or q.device.type == "meta":
        return block_sparse_attention_torch_op(q, k, v, plan, scale)
    return _reference(q, k, v, plan, scale)

"""The GPU backends as `torch.library` custom ops, so that `torch.compile` sees one opaque node per
kernel call (no graph break, no tracing into Triton's autotuner or FA4's CuTe compiler).

- ``vsa::triton_attention`` / ``vsa::triton_attention_bwd``: the Triton forward and its backward
  (the default backward mode; the lse gradient shifts the row term, as in eager).
- ``vsa::fa4_attention`` / ``vsa::fa4_attention_bwd``: FlashAttention-4 over block lists that are
  built in the traced graph from the plan (pure tensor ops with static shapes).

Each op takes the plan as `plan.op_args` gives it (its tensor fields, the optional ``key_bias``, the
static block sizes and window); `register_fake` gives output shapes and `register_autograd` links
forward and backward. `triton_entry` / `fa4_entry` are the registry's entry points: eager calls go
to the backends' autograd functions, traced calls to these ops; both give the same values.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..plan import BlockSparsePlan, from_op_args, op_args

__all__ = ["triton_entry", "fa4_entry"]

Tensor = torch.Tensor



def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------- Triton
@torch.library.custom_op("vsa::triton_attention", mutates_args=())
def _triton_fwd(q: Tensor, k: Tensor, v: Tensor, plan_tensors: List[Tensor], key_bias: Optional[Tensor],
                q_block: int, k_block: int, window_lo: Optional[int], window_hi: Optional[int],
                scale: float) -> Tuple[Tensor, Tensor]:
    from .triton_common import resolve_kernel_options
    from .triton_fwd import attention_forward

    plan = from_op_args(plan_tensors, key_bias, q_block, k_block, window_lo, window_hi)
    return attention_forward(q, k, v, plan, scale, resolve_kernel_options(None))


@_triton_fwd.register_fake
def _(q, k, v, plan_tensors, key_bias, q_block, k_block, window_lo, window_hi, scale):
    B, H, Sq, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, H, Sq, dtype=torch.float32)


@torch.library.custom_op("vsa::triton_attention_bwd", mutates_args=())
def _triton_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                plan_tensors: List[Tensor], key_bias: Optional[Tensor], q_block: int, k_block: int,
                window_lo: Optional[int], window_hi: Optional[int], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    from .triton_bwd import attention_backward
    from .triton_common import resolve_kernel_options
    from .triton_op import DEFAULT_DETERMINISTIC

    plan = from_op_args(plan_tensors, key_bias, q_block, k_block, window_lo, window_hi)
    return attention_backward(q, k, v, out, lse, dout, plan, scale,
                              resolve_kernel_options(None), deterministic=DEFAULT_DETERMINISTIC, dlse=dlse)


@_triton_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, plan_tensors, key_bias, q_block, k_block, window_lo, window_hi, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _triton_setup(ctx, inputs, output):
    q, k, v, plan_tensors, key_bias, q_block, k_block, window_lo, window_hi, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_bias, *plan_tensors)
    ctx.static = (q_block, k_block, window_lo, window_hi, scale)


def _triton_vjp(ctx, dout, dlse):
    q, k, v, out, lse, key_bias, *plan_tensors = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = _triton_bwd(dout, dlse, q, k, v, out, lse, plan_tensors, key_bias, *ctx.static)
    return dq, dk, dv, [None] * len(plan_tensors), None, None, None, None, None, None


_triton_fwd.register_autograd(_triton_vjp, setup_context=_triton_setup)


def triton_entry(q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan,
                 scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The Triton backend: its autograd function in eager mode, the custom ops under `torch.compile`."""
    if torch.compiler.is_compiling():
        return _triton_fwd(q, k, v, *op_args(plan), _scale(q, scale))
    from .triton_op import run_triton

    return run_triton(q, k, v, plan, _scale(q, scale))     # inputs checked by the public op


# ---------------------------------------------------------------------------------------------- FA4
def _fa4_lists(lists: List[Tensor]):
    from .fa4 import FA4BlockLists

    return FA4BlockLists(fwd=tuple(lists[0:4]), bwd=tuple(lists[4:8]), key_ok=lists[8],
                         row_bounds=tuple(lists[9:11]) if len(lists) > 9 else None)


@torch.library.custom_op("vsa::fa4_attention", mutates_args=())
def _fa4_fwd(q: Tensor, k: Tensor, v: Tensor, lists: List[Tensor], q_pad: Tensor,
             scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from .fa4 import fa4_forward

    out, lse, out_raw, lse_raw = fa4_forward(q, k, v, _fa4_lists(lists), q_pad, scale)
    return out.contiguous(), lse, out_raw, lse_raw


@_fa4_fwd.register_fake
def _(q, k, v, lists, q_pad, scale):
    B, H, Sq, D = q.shape
    lse = q.new_empty(B, H, Sq, dtype=torch.float32)
    return q.new_empty(B, H, Sq, D), lse, q.new_empty(B, Sq, H, D), torch.empty_like(lse)


@torch.library.custom_op("vsa::fa4_attention_bwd", mutates_args=())
def _fa4_bwd(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out_raw: Tensor,
             lse_raw: Tensor, lists: List[Tensor], q_pad: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    from .fa4 import fa4_backward

    dq, dk, dv = fa4_backward(dout, dlse, q, k, v, out_raw, lse_raw, _fa4_lists(lists), q_pad, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_bwd.register_fake
def _(dout, dlse, q, k, v, out_raw, lse_raw, lists, q_pad, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup(ctx, inputs, output):
    q, k, v, lists, q_pad, scale = inputs
    _, _, out_raw, lse_raw = output
    ctx.save_for_backward(q, k, v, out_raw, lse_raw, q_pad, *lists)
    ctx.scale = scale


def _fa4_vjp(ctx, dout, dlse, _d_out_raw, _d_lse_raw):
    q, k, v, out_raw, lse_raw, q_pad, *lists = ctx.saved_tensors
    dq, dk, dv = _fa4_bwd(dout, dlse, q, k, v, out_raw, lse_raw, lists, q_pad, ctx.scale)
    return dq, dk, dv, [None] * len(lists), None, None


_fa4_fwd.register_autograd(_fa4_vjp, setup_context=_fa4_setup)


def fa4_entry(q: Tensor, k: Tensor, v: Tensor, plan: BlockSparsePlan,
              scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The FA4 backend: its autograd function in eager mode, the custom ops under `torch.compile`
    (the block lists are then built in the graph, once per call)."""
    from .fa4 import block_sparse_attention_fa4, fa4_block_lists

    if not torch.compiler.is_compiling():
        return block_sparse_attention_fa4(q, k, v, plan, scale)
    lists = fa4_block_lists(plan, q.shape[0], cache=False)
    flat = [*lists.fwd, *lists.bwd, lists.key_ok, *(lists.row_bounds or ())]
    out, lse, _, _ = _fa4_fwd(q, k, v, flat, ~plan.query_valid(), _scale(q, scale))
    return out, lse

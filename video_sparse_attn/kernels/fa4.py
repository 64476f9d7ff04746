"""FlashAttention-4 backend: a `BlockSparsePlan` run by FA4's CuTe block-sparse kernels (sm90 / sm100).

FA4 (``pip install -e ".[fa4]"``, the ``flash-attn-4`` package) walks per-row lists of kept
128-token KV blocks ("full" blocks run unmasked, "mask" blocks through a ``mask_mod``) and, in the
backward, the transposed per-KV-block lists of 128-row Q blocks. A plan is converted into those
lists once and cached on the plan (forward and backward of one call, and repeated calls with one
plan, share it), on the device, with no host synchronisation:

- every kept ``q_block × k_block`` block becomes ``(q_block/128) × (k_block/128)`` sub-blocks;
- a KV sub-block with every key valid (``k_valid``) is a full block; one with some valid keys is a
  mask block, whose ``mask_mod`` reads a per-token validity tensor (so ragged keys are exact);
  one with none is dropped, and so is every Q sub-block with no real row (``q_valid``).

Rows past ``q_valid`` return out 0 and lse -inf, and take no gradient, as the plan defines.
FA4 compiles each kernel variant on first use; set ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``
(this module sets it unless you did) to keep compiled kernels on disk across processes.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch

from ..plan import _compress

__all__ = ["block_sparse_attention_fa4", "fa4_block_lists", "FA4_BLOCK"]

os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")

FA4_BLOCK = 128     # FA4's sparse block along q and k at head dims 64 / 128 on sm90 and sm100
_CACHE_ATTR = "_fa4_block_lists"


class FA4BlockLists(NamedTuple):
    """FA4's block-sparse tensors for one plan (counts int32 ``[B', H', R]``, ids ``[B', H', R, C]``)."""

    fwd: object             # BlockSparseTensorsTorch, Q rows → KV sub-blocks
    bwd: object             # BlockSparseTensorsTorch, KV sub-blocks → Q rows
    key_ok: torch.Tensor    # int32 [B, Sk]: 1 where a key token takes part (read by the mask_mod)


def _sub_valid(valid: torch.Tensor, ratio: int) -> torch.Tensor:
    """Valid tokens per 128-token sub-block: ``[Bv, N]`` → ``[Bv, N * ratio]``."""
    starts = torch.arange(ratio, device=valid.device, dtype=torch.int32) * FA4_BLOCK
    return (valid[..., None] - starts).clamp(0, FA4_BLOCK).flatten(-2)


def fa4_block_lists(plan, batch: int) -> FA4BlockLists:
    """Convert ``plan`` to FA4's forward / backward block lists (cached on the plan)."""
    cached = getattr(plan, _CACHE_ATTR, None)
    if cached is not None and cached[0] == batch:
        return cached[1]
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    rq, rk = plan.q_block // FA4_BLOCK, plan.k_block // FA4_BLOCK
    mask = plan.to_dense()                                                       # [B', H', Mq, Nk]
    Bp, Hp, Mq, Nk = mask.shape
    kv = _sub_valid(plan.k_valid, rk)                                            # [Bv, Nk*rk]
    qv = _sub_valid(plan.q_valid, rq)                                            # [Bq, Mq*rq]
    sub = mask[:, :, :, None, :, None].expand(Bp, Hp, Mq, rq, Nk, rk).reshape(Bp, Hp, Mq * rq, Nk * rk)
    sub = sub & (qv > 0)[:, None, :, None] & (kv > 0)[:, None, None, :]
    full_cols = (kv == FA4_BLOCK)[:, None, None, :]
    full, part = sub & full_cols, sub & ~full_cols

    def lists(m):
        cnt, idx = _compress(m)
        return cnt.contiguous(), idx.contiguous()

    f_cnt, f_idx = lists(full)
    m_cnt, m_idx = lists(part)
    fb_cnt, fb_idx = lists(full.transpose(-1, -2))
    mb_cnt, mb_idx = lists(part.transpose(-1, -2))
    size = (FA4_BLOCK, FA4_BLOCK)
    out = FA4BlockLists(
        fwd=BlockSparseTensorsTorch(m_cnt, m_idx, f_cnt, f_idx, block_size=size),
        bwd=BlockSparseTensorsTorch(mb_cnt, mb_idx, fb_cnt, fb_idx, block_size=size),
        key_ok=plan.token_valid().to(torch.int32).expand(batch, -1).contiguous(),
    )
    object.__setattr__(plan, _CACHE_ATTR, (batch, out))
    return out


@functools.lru_cache(maxsize=None)
def _key_mask_mod():
    """The ``mask_mod`` of mask blocks: key token ``n`` of batch ``b`` takes part iff ``key_ok[b, n]``."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def key_valid_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        key_ok = aux_tensors[0]
        ok = utils.scalar_to_ssa(key_ok[batch[0], n_idx[0]], cutlass.Int32)
        return ok > utils.scalar_to_ssa(0, cutlass.Int32)

    return key_valid_mask


class _FA4BlockSparse(torch.autograd.Function):
    """FA4 forward / backward over a plan; q, k, v ``[B, H, S, D]`` (FA4 sees ``[B, S, H, D]`` views)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        from flash_attn.cute.interface import _flash_attn_fwd

        lists = fa4_block_lists(plan, q.shape[0])
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
        out_raw, lse_raw, *_ = _flash_attn_fwd(
            q_, k_, v_, softmax_scale=scale, mask_mod=_key_mask_mod(), block_sparse_tensors=lists.fwd,
            return_lse=True, aux_tensors=[lists.key_ok],
        )
        ctx.save_for_backward(q, k, v, out_raw, lse_raw)
        ctx.plan, ctx.scale, ctx.lists = plan, scale, lists
        ctx.set_materialize_grads(False)
        pad = ~plan.query_valid()                                                   # [Bq, Sq]
        out = out_raw.transpose(1, 2).masked_fill(pad[:, None, :, None], 0.0)
        lse = lse_raw.masked_fill(pad[:, None, :], float("-inf"))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from flash_attn.cute.interface import _flash_attn_bwd

        q, k, v, out_raw, lse_raw = ctx.saved_tensors
        pad = ~ctx.plan.query_valid()
        if dout is None:
            dout = torch.zeros_like(out_raw).transpose(1, 2)
        dout = dout.masked_fill(pad[:, None, :, None], 0.0)
        if dlse is not None:
            dlse = dlse.masked_fill(pad[:, None, :], 0.0).contiguous()
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
        dq, dk, dv = _flash_attn_bwd(
            q_, k_, v_, out_raw, dout.transpose(1, 2), lse_raw, softmax_scale=ctx.scale,
            mask_mod=_key_mask_mod(), aux_tensors=[ctx.lists.key_ok], block_sparse_tensors=ctx.lists.bwd,
            dlse=dlse,
        )[:3]
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


def block_sparse_attention_fa4(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of block-ordered ``q [B, H, Mq*q_block, D]``, ``k, v [B, H, Nk*k_block, D]``
    over ``plan`` with FlashAttention-4 (bf16 / fp16, D 64 or 128, blocks multiples of 128; the
    registry checks these). Returns ``out [B, H, Sq, D]`` and ``lse [B, H, Sq]`` float32 (natural
    log), both differentiable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _FA4BlockSparse.apply(q, k, v, plan, scale)

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
FA4 compiles each kernel variant on first use; ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` keeps
compiled kernels on disk across processes (the registry sets it before FA4 is first imported, unless
you chose otherwise; ``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR`` moves the cache).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch

from ..plan import compact


__all__ = ["block_sparse_attention_fa4", "fa4_block_lists", "fa4_forward", "fa4_backward", "FA4BlockLists",
           "FA4_BLOCK"]


FA4_BLOCK = 128     # FA4's sparse block along q and k at head dims 64 / 128 on sm90 and sm100
_CACHE_ATTR = "_fa4_block_lists"


class FA4BlockLists(NamedTuple):
    """FA4's block-sparse tensors for one plan (counts int32 ``[B', H', R]``, ids ``[B', H', R, C]``)."""

    fwd: tuple              # (mask_cnt, mask_idx, full_cnt, full_idx): Q sub-block rows → KV sub-blocks
    bwd: tuple              # the same, KV sub-block columns → Q sub-blocks
    key_ok: torch.Tensor    # int32 [B, Sk]: 1 where a key token takes part (read by the mask_mod)


def _sub_valid(valid: torch.Tensor, ratio: int) -> torch.Tensor:
    """Valid tokens per 128-token sub-block: ``[Bv, N]`` → ``[Bv, N * ratio]``."""
    starts = torch.arange(ratio, device=valid.device, dtype=torch.int32) * FA4_BLOCK
    return (valid[..., None] - starts).clamp(0, FA4_BLOCK).flatten(-2)


def _sub_lists(count, index, valid_self, valid_other, r_self, r_other):
    """Expand block lists to 128-token sub-blocks.

    ``count [B', H', R]`` / ``index [B', H', R, C]`` list, for each of R blocks, the kept blocks of the
    other side; ``valid_other [Bo, C * r_other]`` are the valid tokens of the other side's sub-blocks.
    Returns the candidate sub-block ids ``[Bx, H', R, C * r_other]`` (ascending), which of them exist
    (kept block, sub-block not empty) and their valid counts.
    """
    C = index.shape[-1]
    sub = torch.arange(r_other, device=index.device, dtype=torch.int32)
    cand = (index[..., None] * r_other + sub).flatten(-2)                                # [B', H', R, C*r]
    in_row = (torch.arange(C, device=index.device) < count[..., None].long())
    in_row = in_row[..., None].expand(*in_row.shape, r_other).flatten(-2)
    Bx = max(cand.shape[0], valid_other.shape[0], valid_self.shape[0])
    cand = cand.expand(Bx, *cand.shape[1:])
    v = torch.gather(valid_other[:, None, None, :].expand(Bx, cand.shape[1], cand.shape[2], -1), -1, cand.long())
    return cand, in_row & (v > 0), v


def fa4_block_lists(plan, batch: int, cache: bool = True) -> FA4BlockLists:
    """Convert ``plan`` to FA4's forward / backward block lists (cached on the plan unless ``cache`` is
    False; no host sync)."""
    cached = getattr(plan, _CACHE_ATTR, None) if cache else None
    if cached is not None and cached[0] == batch:
        return cached[1]
    rq, rk = plan.q_block // FA4_BLOCK, plan.k_block // FA4_BLOCK
    kv = _sub_valid(plan.k_valid, rk)                                                    # [Bv, Nk*rk]
    qv = _sub_valid(plan.q_valid, rq)                                                    # [Bq, Mq*rq]

    # forward: per query block, its KV sub-blocks split into full / masked, then one row per Q sub-block
    cand, exists, v = _sub_lists(plan.kv_count, plan.kv_index, plan.q_valid, kv, rq, rk)
    f_cnt, f_idx = compact(cand, exists & (v == FA4_BLOCK))
    m_cnt, m_idx = compact(cand, exists & (v < FA4_BLOCK))
    q_live = (qv > 0).view(qv.shape[0], 1, -1, rq)                                     # [Bq, 1, Mq, rq]

    def rows(cnt, idx):   # [Bx, H', Mq] / [Bx, H', Mq, W] → one row per Q sub-block, empty where no real row
        cnt = (cnt[..., None] * q_live).flatten(-2).to(torch.int32).contiguous()
        idx = idx[..., None, :].expand(*idx.shape[:-1], rq, idx.shape[-1]).flatten(-3, -2).contiguous()
        return cnt, idx

    (f_cnt, f_idx), (m_cnt, m_idx) = rows(f_cnt, f_idx), rows(m_cnt, m_idx)

    # backward: per key block, its live Q sub-blocks; a KV sub-block is wholly full or wholly masked
    cand, exists, _ = _sub_lists(plan.q_count, plan.q_index, plan.k_valid, qv, rk, rq)
    b_cnt, b_idx = compact(cand, exists)                                                # [Bx, H', Nk, ...]
    b_cnt = b_cnt[..., None].expand(*b_cnt.shape, rk).flatten(-2)                       # [Bx, H', Nk*rk]
    b_idx = b_idx[..., None, :].expand(*b_idx.shape[:-1], rk, b_idx.shape[-1]).flatten(-3, -2).contiguous()
    kv_b = kv[:, None, :]
    fb_cnt = (b_cnt * (kv_b == FA4_BLOCK)).to(torch.int32).contiguous()
    mb_cnt = (b_cnt * ((kv_b > 0) & (kv_b < FA4_BLOCK))).to(torch.int32).contiguous()
    out = FA4BlockLists(
        fwd=(m_cnt, m_idx, f_cnt, f_idx),
        bwd=(mb_cnt, b_idx, fb_cnt, b_idx),
        key_ok=plan.token_valid().to(torch.int32).expand(batch, -1).contiguous(),
    )
    if cache:
        object.__setattr__(plan, _CACHE_ATTR, (batch, out))
    return out


def _fa4_tensors(lists: tuple):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return BlockSparseTensorsTorch(*lists, block_size=(FA4_BLOCK, FA4_BLOCK))


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


def fa4_forward(q, k, v, lists: FA4BlockLists, q_pad: torch.Tensor, scale: float, zero_tail: bool = True):
    """FA4 forward. ``q_pad [Bq, Sq]`` bool marks rows past ``q_valid``.

    Returns ``(out [B, H, Sq, D], lse [B, H, Sq])`` with padded rows set to 0 / -inf (``out`` left as
    computed unless ``zero_tail``: then it is a view of ``out_raw``), and FA4's own
    ``(out_raw [B, Sq, H, D], lse_raw)``, which its backward needs."""
    from flash_attn.cute.interface import _flash_attn_fwd

    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
    out_raw, lse_raw, *_ = _flash_attn_fwd(
        q_, k_, v_, softmax_scale=scale, mask_mod=_key_mask_mod(), block_sparse_tensors=_fa4_tensors(lists.fwd),
        return_lse=True, aux_tensors=[lists.key_ok],
    )
    out = out_raw.transpose(1, 2)
    if zero_tail:
        out = out.masked_fill(q_pad[:, None, :, None], 0.0)
    lse = lse_raw.masked_fill(q_pad[:, None, :], float("-inf"))
    return out, lse, out_raw, lse_raw


def fa4_backward(dout, dlse, q, k, v, out_raw, lse_raw, lists: FA4BlockLists, q_pad: torch.Tensor, scale: float,
                 zero_tail: bool = True):
    """dq, dk, dv of `fa4_forward` given ``dout [B, H, Sq, D]`` and ``dlse [B, H, Sq]`` (either may be
    None); padded rows take no gradient (``zero_tail=False``: the caller's ``dout`` is already 0 there)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    if dout is None:
        dout = torch.zeros_like(out_raw).transpose(1, 2)
    if zero_tail:
        dout = dout.masked_fill(q_pad[:, None, :, None], 0.0)
    if dlse is not None:
        dlse = dlse.masked_fill(q_pad[:, None, :], 0.0).contiguous()
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
    dq, dk, dv = _flash_attn_bwd(
        q_, k_, v_, out_raw, dout.transpose(1, 2), lse_raw, softmax_scale=scale,
        mask_mod=_key_mask_mod(), aux_tensors=[lists.key_ok], block_sparse_tensors=_fa4_tensors(lists.bwd),
        dlse=dlse,
    )[:3]
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class _FA4BlockSparse(torch.autograd.Function):
    """FA4 forward / backward over a plan; q, k, v ``[B, H, S, D]`` (FA4 sees ``[B, S, H, D]`` views)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        lists = fa4_block_lists(plan, q.shape[0])
        q_pad = ~plan.query_valid()
        out, lse, out_raw, lse_raw = fa4_forward(q, k, v, lists, q_pad, scale, plan.zero_q_tail)
        ctx.save_for_backward(q, k, v, out_raw, lse_raw, q_pad)
        ctx.scale, ctx.lists, ctx.zero_tail = scale, lists, plan.zero_q_tail
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out_raw, lse_raw, q_pad = ctx.saved_tensors
        dq, dk, dv = fa4_backward(dout, dlse, q, k, v, out_raw, lse_raw, ctx.lists, q_pad, ctx.scale, ctx.zero_tail)
        return dq, dk, dv, None, None


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

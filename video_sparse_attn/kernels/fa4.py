"""FlashAttention-4 backend: a `BlockSparsePlan` run by FA4's CuTe block-sparse kernels (sm90 / sm100).

FA4 (``pip install -e ".[fa4]"``, the ``flash-attn-4`` package) walks per-row lists of kept
128-token KV blocks ("full" blocks run unmasked, "mask" blocks through a ``mask_mod``) and, in the
backward, the transposed per-KV-block lists of 128-row Q blocks. A plan is converted into those
lists once and cached on the plan (forward and backward of one call, and repeated calls with one
plan, share it), on the device, with no host synchronisation:

- every kept ``q_block × k_block`` block becomes ``(q_block/128) × (k_block/128)`` sub-blocks;
- a (Q, KV) sub-block pair whose valid rows all see all 128 keys is a full block; one with some
  visible (row, key) pairs is a mask block, whose ``mask_mod`` reads a per-token key-validity
  tensor (ragged keys) and, with a token window (causal / sliding, ``plan.window_lo`` /
  ``window_hi``), per-row key bounds; one with none is dropped, and so is every Q sub-block with no
  real row (``q_valid``). So causal runs the diagonal sub-blocks masked and the ones below it full.

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

from ..plan import compact, window_pairs


__all__ = ["block_sparse_attention_fa4", "fa4_block_lists", "fa4_forward", "fa4_backward", "FA4BlockLists",
           "FA4_BLOCK"]


FA4_BLOCK = 128     # FA4's sparse block along q and k at head dims 64 / 128 on sm90 and sm100
_CACHE_ATTR = "_fa4_block_lists"


class FA4BlockLists(NamedTuple):
    """FA4's block-sparse tensors for one plan (counts int32 ``[B', H', R]``, ids ``[B', H', R, C]``)."""

    fwd: tuple              # (mask_cnt, mask_idx, full_cnt, full_idx): Q sub-block rows → KV sub-blocks
    bwd: Optional[tuple]    # the same, KV sub-block columns → Q sub-blocks (None: not built, no backward)
    key_ok: torch.Tensor    # int32 [B, Sk]: 1 where a key token takes part (read by the mask_mod)
    row_bounds: Optional[tuple] = None   # with a window: (lo, hi) int32 [B, Sq], row i sees keys lo[i]..hi[i]


def _sub_valid(valid: torch.Tensor, ratio: int) -> torch.Tensor:
    """Valid tokens per 128-token sub-block: ``[Bv, N]`` → ``[Bv, N * ratio]``."""
    starts = torch.arange(ratio, device=valid.device, dtype=torch.int32) * FA4_BLOCK
    return (valid[..., None] - starts).clamp(0, FA4_BLOCK).flatten(-2)


def _candidates(count, index, r_self, r_other):
    """Block lists → sub-block candidates: ``count [B', H', R]`` / ``index [B', H', R, C]`` list, for
    each of R blocks, the kept blocks of the other side. Returns the other side's sub-block ids
    ``[B', H', R * r_self, C * r_other]`` (ascending per row) and which of them are kept."""
    C = index.shape[-1]
    sub = torch.arange(r_other, device=index.device, dtype=torch.int32)
    cand = (index[..., None] * r_other + sub).flatten(-2)                                # [B', H', R, C*r]
    kept = torch.arange(C, device=index.device) < count[..., None].long()
    kept = kept[..., None].expand(*kept.shape, r_other).flatten(-2)

    def rows(x):
        return x[..., None, :].expand(*x.shape[:-1], r_self, x.shape[-1]).flatten(-3, -2)

    return rows(cand), rows(kept)


def _classify(q_sub, k_sub, kept, qv, kv, shift, lo, hi):
    """Which (Q sub-block, KV sub-block) pairs run, and which of those need no mask.

    ``q_sub`` / ``k_sub``: broadcastable sub-block ids ``[Bx, H', R, W]``; ``qv [Bq, Rq]`` / ``kv
    [Bv, Rk]``: valid tokens per sub-block; ``shift [Bs, Rq]``: window shift of the Q sub-block. A
    pair is live when kept with a valid (row, key) pair inside the window; full when every valid row
    sees all 128 keys (so the mask_mod can be skipped)."""
    Bx = kept.shape[0]

    def take(t, ids):
        t = t.expand(Bx, -1)[:, None, None, :].expand(Bx, *ids.shape[1:-1], -1)
        return torch.gather(t, -1, ids.long().expand(Bx, *ids.shape[1:]))

    q_sub, k_sub = q_sub.expand_as(kept), k_sub.expand_as(kept)
    nq, nk = take(qv, q_sub).long(), take(kv, k_sub).long()
    live = kept & (nq > 0) & (nk > 0)
    full = live & (nk == FA4_BLOCK)
    if lo is not None or hi is not None:   # over valid rows and valid keys
        i0 = q_sub.long() * FA4_BLOCK + take(shift, q_sub).long()
        some, every = window_pairs(i0, nq, k_sub.long() * FA4_BLOCK, nk, lo, hi)
        live, full = live & some, full & every
    return live & ~full, full


def _unwindowed_candidates(count, index, valid_other, r_other, Bx):
    """Per block row of a plan's lists: the other side's sub-block ids, whether they exist (kept, some
    valid token) and their valid tokens."""
    cand, kept = _candidates(count, index, 1, r_other)
    cand = cand.expand(Bx, *cand.shape[1:])
    v = torch.gather(valid_other[:, None, None, :].expand(Bx, *cand.shape[1:3], -1), -1, cand.long())
    return cand, kept & (v > 0), v


def _per_sub_row(cnt, idx, r, live):
    """One list row per sub-block of the owning block; count 0 where the sub-block is not ``live``."""
    cnt = (cnt[..., None] * live).flatten(-2).to(torch.int32).contiguous()
    return cnt, idx[..., None, :].expand(*idx.shape[:-1], r, idx.shape[-1]).flatten(-3, -2).contiguous()


def _unwindowed_fwd(plan, kv, qv, rq, rk, Bx):
    """Forward lists of a plan without a window, compacted per block and then repeated per sub-block
    (3× fewer elements to compact than `_classify`'s per-sub-block rows at 384-token blocks; 1.9 vs 7.0
    ms for both directions at 720p on the H200, one process). Without a window a pair's class depends
    only on its KV sub-block (full when all 128 keys are valid) and whether the Q sub-block has a real
    row."""
    cand, exists, v = _unwindowed_candidates(plan.kv_count, plan.kv_index, kv, rk, Bx)
    q_live = (qv > 0).view(qv.shape[0], 1, -1, rq)
    fwd_f = _per_sub_row(*compact(cand, exists & (v == FA4_BLOCK)), rq, q_live)
    fwd_m = _per_sub_row(*compact(cand, exists & (v < FA4_BLOCK)), rq, q_live)
    return fwd_m[0], fwd_m[1], fwd_f[0], fwd_f[1]


def _unwindowed_bwd(plan, kv, qv, rq, rk, Bx):
    """Backward lists of a plan without a window (see `_unwindowed_fwd`)."""
    cand, exists, _ = _unwindowed_candidates(plan.q_count, plan.q_index, qv, rq, Bx)
    b_cnt, b_idx = _per_sub_row(*compact(cand, exists), rk, torch.ones_like(kv, dtype=torch.bool).view(
        kv.shape[0], 1, -1, rk))
    kv_b = kv[:, None, :]
    fb_cnt = (b_cnt * (kv_b == FA4_BLOCK)).to(torch.int32).contiguous()
    mb_cnt = (b_cnt * ((kv_b > 0) & (kv_b < FA4_BLOCK))).to(torch.int32).contiguous()
    return mb_cnt, b_idx, fb_cnt, b_idx


def fa4_block_lists(plan, batch: int, cache: bool = True, backward: bool = True) -> FA4BlockLists:
    """Convert ``plan`` to FA4's forward / backward block lists (cached on the plan unless ``cache`` is
    False; no host sync). With a token window (``plan.window_lo`` / ``window_hi``), sub-blocks wholly
    outside it are dropped, wholly inside are full blocks, and the rest mask blocks. ``backward=False``:
    the backward lists are not built (``bwd`` None; a later call with ``backward=True`` adds them to
    the cached forward lists) — a forward without gradients does not pay for them."""
    cached = getattr(plan, _CACHE_ATTR, None) if cache else None
    if cached is not None and cached[0] == batch and (cached[1].bwd is not None or not backward):
        return cached[1]
    rq, rk = plan.q_block // FA4_BLOCK, plan.k_block // FA4_BLOCK
    kv = _sub_valid(plan.k_valid, rk)                                                    # [Bv, Nk*rk]
    qv = _sub_valid(plan.q_valid, rq)                                                    # [Bq, Mq*rq]
    shift = plan.window_shift.repeat_interleave(rq, -1)                                  # [Bs, Mq*rq]
    lo, hi = plan.window_lo, plan.window_hi
    Bx = max(plan.kv_count.shape[0], kv.shape[0], qv.shape[0], shift.shape[0])

    def lists(count, index, r_self, r_other, transpose):
        cand, kept = _candidates(count, index, r_self, r_other)
        kept = kept.expand(Bx, *kept.shape[1:])
        own = torch.arange(cand.shape[-2], device=cand.device, dtype=torch.int32)[:, None]
        q_sub, k_sub = (cand, own) if transpose else (own, cand)
        mask, full = _classify(q_sub, k_sub, kept, qv, kv, shift, lo, hi)
        (m_cnt, m_idx), (f_cnt, f_idx) = compact(cand, mask), compact(cand, full)
        return tuple(t.contiguous() for t in (m_cnt, m_idx, f_cnt, f_idx))

    if cached is not None and cached[0] == batch:      # forward lists cached, backward ones asked for
        base = cached[1]
    else:
        row_bounds = None
        if plan.has_window:
            w_lo, w_hi = plan.window_bounds()
            pos = (torch.arange(plan.num_q_blocks * plan.q_block, device=plan.device, dtype=torch.int32)
                   + plan.window_shift.repeat_interleave(plan.q_block, -1)).expand(batch, -1)
            row_bounds = ((pos + w_lo).contiguous(), (pos + w_hi).contiguous())
            fwd = lists(plan.kv_count, plan.kv_index, rq, rk, False)
        else:
            fwd = _unwindowed_fwd(plan, kv, qv, rq, rk, Bx)
        base = FA4BlockLists(fwd=fwd, bwd=None,
                             key_ok=plan.token_valid().to(torch.int32).expand(batch, -1).contiguous(),
                             row_bounds=row_bounds)
    out = base
    if backward:
        bwd = (lists(plan.q_count, plan.q_index, rk, rq, True) if plan.has_window
               else _unwindowed_bwd(plan, kv, qv, rq, rk, Bx))
        out = base._replace(bwd=bwd)
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


@functools.lru_cache(maxsize=None)
def _window_mask_mod():
    """The ``mask_mod`` of mask blocks with a token window: key ``n`` takes part for row ``m`` iff
    ``key_ok[b, n]`` and ``lo[b, m] <= n <= hi[b, m]`` (aux tensors: key_ok, lo, hi)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def key_window_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        key_ok, row_lo, row_hi = aux_tensors[0], aux_tensors[1], aux_tensors[2]
        ok = utils.scalar_to_ssa(key_ok[batch[0], n_idx[0]], cutlass.Int32)
        lo = utils.scalar_to_ssa(row_lo[batch[0], m_idx[0]], cutlass.Int32)
        hi = utils.scalar_to_ssa(row_hi[batch[0], m_idx[0]], cutlass.Int32)
        return (ok > utils.scalar_to_ssa(0, cutlass.Int32)) & (n_idx >= lo) & (n_idx <= hi)

    return key_window_mask


def _mask_mod(lists: FA4BlockLists):
    """``(mask_mod, aux_tensors)`` for ``lists``: key validity, and the window when there is one."""
    if lists.row_bounds is None:
        return _key_mask_mod(), [lists.key_ok]
    return _window_mask_mod(), [lists.key_ok, *lists.row_bounds]


def fa4_forward(q, k, v, lists: FA4BlockLists, q_pad: torch.Tensor, scale: float, zero_tail: bool = True):
    """FA4 forward. ``q_pad [Bq, Sq]`` bool marks rows past ``q_valid``.

    Returns ``(out [B, H, Sq, D], lse [B, H, Sq])`` with padded rows set to 0 / -inf (with
    ``zero_tail=False`` out's padded rows are left as computed and ``out`` is a view of ``out_raw``),
    and FA4's own
    ``(out_raw [B, Sq, H, D], lse_raw)``, which its backward needs."""
    from flash_attn.cute.interface import _flash_attn_fwd

    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
    mask_mod, aux = _mask_mod(lists)
    out_raw, lse_raw, *_ = _flash_attn_fwd(
        q_, k_, v_, softmax_scale=scale, mask_mod=mask_mod, block_sparse_tensors=_fa4_tensors(lists.fwd),
        return_lse=True, aux_tensors=aux,
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
    mask_mod, aux = _mask_mod(lists)
    dq, dk, dv = _flash_attn_bwd(
        q_, k_, v_, out_raw, dout.transpose(1, 2), lse_raw, softmax_scale=scale,
        mask_mod=mask_mod, aux_tensors=aux, block_sparse_tensors=_fa4_tensors(lists.bwd),
        dlse=dlse,
    )[:3]
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class _FA4BlockSparse(torch.autograd.Function):
    """FA4 forward / backward over a plan; q, k, v ``[B, H, S, D]`` (FA4 sees ``[B, S, H, D]`` views)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        # the backward lists only when a backward can follow (built in the backward otherwise never)
        lists = fa4_block_lists(plan, q.shape[0], backward=any(ctx.needs_input_grad[:3]))
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

"""`BlockSparsePlan`: the compressed block-sparse format the attention kernels consume.

A plan describes which key blocks every query block attends to, for a sequence that is already
in block order (see `layout.TileLayout`). Query block ``i`` covers query rows
``[i*q_block, (i+1)*q_block)``, key block ``j`` covers key rows ``[j*k_block, (j+1)*k_block)``.

Row format (forward and dQ):
    kv_count[b, h, i]            number of kept key blocks of query block i
    kv_index[b, h, i, :count]    their ids, ascending; entries past ``count`` are padding (undefined)
Column format (dK / dV), the transpose:
    q_count[b, h, j], q_index[b, h, j, :count]
Key validity:
    k_valid[b, j]                key tokens ``j*k_block + r`` with ``r >= k_valid[b, j]`` are excluded
Query validity (padding-free compute):
    q_valid[b, i]                query rows ``i*q_block + r`` with ``r >= q_valid[b, i]`` are padding:
                                 backends need not compute them; they return out 0, lse -inf and
                                 dq 0 there, and such rows add nothing to dk / dv
Key bias (optional):
    key_bias[b, j]               float32, added to the scaled score ``q·k·scale`` of key token j (natural
                                 log: a key of bias ``log m`` weighs as ``m`` copies of itself; padding-free
                                 ``repeat`` padding, `TileLayout.key_bias`)
Token window (optional, on top of the blocks):
    window_lo, window_hi         static ints or None (unbounded): query row ``i`` of block ``m`` sees
                                 key ``j`` only if ``window_lo <= j - (i + window_shift[b, m]) <= window_hi``
    window_shift[b, m]           int32, shifts a query block's positions (per-sequence alignment in
                                 packed layouts; 0 by default). Causal bottom-right aligned is
                                 ``window_hi = Sk - Sq``; flash-attention's ``window_size=(left, right)``
                                 is ``(Sk - Sq - left, Sk - Sq + right)``
Schedules (heavy rows first, so long dense text rows do not form a tail):
    row_order[b, h, :]           query blocks sorted by descending kv_count
    col_order[b, h, :]           key blocks sorted by descending q_count

The batch and head dims of the index tensors are ``B`` or 1, and the batch dim of ``k_valid``,
``q_valid`` and ``key_bias`` is ``B`` or 1: size-1 dims broadcast. Everything but ``key_bias`` is
int32 and built on the mask's device without a host synchronisation (widths are the static block
counts, not data-dependent maxima).

A plan is a pytree (`torch.utils._pytree`): its tensors are the leaves and ``q_block`` / ``k_block``
static context, so it can enter and leave `torch.compile`d functions and `torch.func` transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.utils._pytree as pytree

from .validation import check_plan_args

__all__ = ["BlockSparsePlan", "TENSOR_FIELDS", "OPTIONAL_FIELDS", "STATIC_FIELDS", "window_pairs", "window_reach",
           "window_offsets", "op_args", "from_op_args"]

#: an unbounded window side, as the kernels see it (positions stay far below it)
WINDOW_INF = 1 << 30


def window_offsets(Sq: int, Sk: int, causal: bool = False, window_size=(-1, -1)):
    """``(window_lo, window_hi)`` of flash-attention's ``causal`` / ``window_size=(left, right)``
    (-1: unbounded), bottom-right aligned: query ``i`` sees keys ``i + Sk - Sq - left ..
    i + Sk - Sq + right``; causal is ``right = 0``."""
    left, right = (int(x) for x in window_size)
    if causal:
        right = 0
    off = Sk - Sq
    return (None if left < 0 else off - left), (None if right < 0 else off + right)


def window_pairs(i0, nq, j0, nk, lo: Optional[int], hi: Optional[int]):
    """Query rows ``i0 .. i0+nq-1`` against keys ``j0 .. j0+nk-1`` (broadcastable int tensors, counts
    > 0): ``(some, every)`` — whether some / every (row, key) pair has ``lo <= j - i <= hi``
    (None: unbounded side)."""
    d_min, d_max = j0 - (i0 + nq - 1), (j0 + nk - 1) - i0
    some = every = torch.ones_like(d_min, dtype=torch.bool)
    if lo is not None:
        some, every = some & (d_max >= lo), every & (d_min >= lo)
    if hi is not None:
        some, every = some & (d_min <= hi), every & (d_max <= hi)
    return some, every


def window_reach(q_valid: torch.Tensor, k_valid: torch.Tensor, q_block: int, k_block: int,
                 lo: Optional[int], hi: Optional[int], shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool ``[Bx, Mq, Nk]``: whether query block ``m`` and key block ``n`` hold a valid pair
    ``(i, j)`` with ``lo <= j - i - shift[m] <= hi`` (valid counts ``q_valid [Bq, Mq]``,
    ``k_valid [Bv, Nk]``; empty blocks reach nothing)."""
    dev = q_valid.device
    Mq, Nk = q_valid.shape[-1], k_valid.shape[-1]
    qv, kv = q_valid.long()[:, :, None], k_valid.long().to(dev)[:, None, :]
    i0 = torch.arange(Mq, device=dev)[None, :, None] * q_block
    if shift is not None:
        i0 = i0 + shift.long().to(dev)[:, :, None]
    j0 = torch.arange(Nk, device=dev)[None, None, :] * k_block
    return (qv > 0) & (kv > 0) & window_pairs(i0, qv, j0, kv, lo, hi)[0]


def compact(values: torch.Tensor, keep: torch.Tensor):
    """Stable left-compaction along the last dim: ``(count int32 [...], values int32 [..., W])`` with
    the kept values first, in order; slots past the count hold 0. A cumulative sum gives each kept
    value its slot; one scatter writes them (no sort). ``values`` may be an expanded view."""
    W = values.shape[-1]
    count = keep.sum(dim=-1, dtype=torch.int32)
    if torch.compiler.is_compiling():
        # Inductor's CUDA lowering of this scan fails at 720p sizes (a split scan over [1, 16, 366, 1098]
        # int32, torch 2.11); a stable sort of the drop flags puts the kept positions first, in order
        order = torch.sort(keep.logical_not().to(torch.uint8), dim=-1, stable=True).indices
        kept = torch.gather(values.to(torch.int32).expand_as(keep), -1, order)
        return count, torch.where(torch.arange(W, device=keep.device) < count.unsqueeze(-1), kept, 0)
    slot = torch.where(keep, keep.cumsum(-1, dtype=torch.int32) - 1, W).long()     # dropped → spare slot W
    out = torch.zeros(*keep.shape[:-1], W + 1, dtype=torch.int32, device=keep.device)
    return count, out.scatter(-1, slot, values.to(torch.int32).expand_as(keep))[..., :W]


def _compress(mask: torch.Tensor):
    """bool [..., R, C] → (count int32 [..., R], ascending index int32 [..., R, C]).

    Kept column ids come first in ascending order (`compact`); the tail repeats the last kept id (or 0
    for an empty row) so that a kernel that over-reads a padded slot still loads a valid block.
    """
    C = mask.shape[-1]
    count, index = compact(torch.arange(C, device=mask.device, dtype=torch.int32), mask)
    last = torch.gather(index, -1, (count.long() - 1).clamp(min=0).unsqueeze(-1))
    in_row = torch.arange(C, device=mask.device, dtype=torch.int32) < count.unsqueeze(-1)
    return count, torch.where(in_row, index, last)


def _heavy_first(count: torch.Tensor) -> torch.Tensor:
    """Block ids sorted by descending count (stable), int32 [..., R]."""
    return torch.sort(count, dim=-1, descending=True, stable=True).indices.to(torch.int32)


@dataclass(frozen=True)
class BlockSparsePlan:
    """Compressed block-sparse attention pattern (see the module docstring for the format).

    Shapes (B' in {1, B}, H' in {1, H}, Bv in {1, B}; Mq query blocks, Nk key blocks):
        kv_count [B', H', Mq]       kv_index [B', H', Mq, Nk]
        q_count  [B', H', Nk]       q_index  [B', H', Nk, Mq]
        row_order [B', H', Mq]      col_order [B', H', Nk]
        k_valid  [Bv, Nk]           density  [] float32 (mean of the block mask)
        q_valid  [Bq, Mq]           window_shift [Bq, Mq]       (Bv, Bq, Bb in {1, B})
        key_bias [Bb, Nk * k_block] float32 (float64 for float64 inputs) or None (no bias)
    ``window_lo`` / ``window_hi`` (Python ints, or None: unbounded): a token-level window on top of
    the blocks — query row ``i`` sees key ``j`` only if ``window_lo <= j - i - shift <= window_hi``
    (positions in the block layout, ``shift = window_shift`` of the row's block). Causal
    (bottom-right aligned, as flash-attention) is ``window_hi = Sk - Sq``.
    ``key_bias`` (natural log; finite, or -inf for a key never seen) is added to the scaled score of
    every key token; only backends with `BackendSpec.key_bias` run a plan that has one.
    ``zero_q_tail`` (default True): rows past ``q_valid`` return out 0 / lse -inf and their output
    gradient is ignored. False: a caller that drops those rows (and passes zero gradients there, as
    `ssta_attention`'s untile does) lets a backend skip that masking pass (FA4: two passes over the
    output and its gradient).
    """

    kv_count: torch.Tensor
    kv_index: torch.Tensor
    q_count: torch.Tensor
    q_index: torch.Tensor
    row_order: torch.Tensor
    col_order: torch.Tensor
    k_valid: torch.Tensor
    density: torch.Tensor
    q_block: int
    k_block: int
    q_valid: Optional[torch.Tensor] = None
    window_shift: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    window_lo: Optional[int] = None
    window_hi: Optional[int] = None
    zero_q_tail: bool = True

    def __post_init__(self) -> None:
        for name in ("q_block", "k_block"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(f"{name}={v}: block sizes must be positive multiples of 16")
        Bp, Hp, Mq = self.kv_count.shape
        Nk = self.q_count.shape[-1]
        if self.kv_index.shape != (Bp, Hp, Mq, Nk) or self.q_index.shape != (Bp, Hp, Nk, Mq):
            raise ValueError(
                f"inconsistent plan: kv_count {tuple(self.kv_count.shape)}, kv_index "
                f"{tuple(self.kv_index.shape)}, q_count {tuple(self.q_count.shape)}, q_index {tuple(self.q_index.shape)}"
            )
        if self.k_valid.dim() != 2 or self.k_valid.shape[1] != Nk:
            raise ValueError(f"k_valid must be [B or 1, {Nk}], got {tuple(self.k_valid.shape)}")
        if self.q_valid is None:
            object.__setattr__(self, "q_valid", torch.full((1, Mq), self.q_block, dtype=torch.int32,
                                                           device=self.kv_count.device))
        if self.q_valid.dim() != 2 or self.q_valid.shape[1] != Mq:
            raise ValueError(f"q_valid must be [B or 1, {Mq}], got {tuple(self.q_valid.shape)}")
        if self.window_shift is None:
            object.__setattr__(self, "window_shift", torch.zeros((1, Mq), dtype=torch.int32,
                                                                 device=self.kv_count.device))
        if self.window_shift.dim() != 2 or self.window_shift.shape[1] != Mq:
            raise ValueError(f"window_shift must be [B or 1, {Mq}], got {tuple(self.window_shift.shape)}")
        kb = self.key_bias
        if kb is not None and (kb.dtype not in (torch.float32, torch.float64) or kb.dim() != 2
                               or kb.shape[1] != Nk * self.k_block or kb.stride(-1) != 1):
            raise ValueError(f"key_bias must be float32 / float64 [B or 1, {Nk * self.k_block}] with a unit "
                             f"last stride (from_block_mask converts), got {kb.dtype} {tuple(kb.shape)} "
                             f"strides {kb.stride()}")
        for name in ("window_lo", "window_hi"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"{name} must be an int or None, got {v!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        q_block: int,
        k_block: Optional[int] = None,
        k_valid: Optional[torch.Tensor] = None,
        q_valid: Optional[torch.Tensor] = None,
        window_lo: Optional[int] = None,
        window_hi: Optional[int] = None,
        window_shift: Optional[torch.Tensor] = None,
        zero_q_tail: bool = True,
        key_bias: Optional[torch.Tensor] = None,
    ) -> "BlockSparsePlan":
        """Build a plan from a bool block mask ``[B or 1, H or 1, Mq, Nk]`` (or ``[Mq, Nk]``).

        ``k_valid`` (int ``[B or 1, Nk]``) and ``q_valid`` (int ``[B or 1, Mq]``) default to full
        blocks. With a window (``window_lo`` / ``window_hi`` / ``window_shift [B or 1, Mq]``, see the
        class), blocks with no valid (query, key) pair inside it are dropped. ``zero_q_tail``: see the
        class. ``key_bias`` (float ``[B or 1, Nk * k_block]`` or 1-D, natural log): added to each key's
        scaled score (stored as float32; float64 stays float64, for float64 inputs). No host
        synchronisation.
        """
        q_block, k_block = check_plan_args(block_mask, q_block, k_block, k_valid, q_valid, window_shift, key_bias)
        if block_mask.dim() == 2:
            block_mask = block_mask[None, None]
        Nk = block_mask.shape[-1]
        if k_valid is None:
            k_valid = torch.full((1, Nk), k_block, dtype=torch.int32, device=block_mask.device)
        # clamp in the caller's dtype first: a cast to int32 would wrap large counts (2**40 → 0)
        k_valid = k_valid.to(device=block_mask.device).clamp(0, k_block).to(torch.int32)
        if k_valid.dim() == 1:
            k_valid = k_valid[None]
        if q_valid is not None:
            q_valid = q_valid.to(device=block_mask.device)
            q_valid = (q_valid[None] if q_valid.dim() == 1 else q_valid).clamp(0, q_block).to(torch.int32).contiguous()
        if window_shift is not None:
            window_shift = window_shift.to(device=block_mask.device)
            window_shift = (window_shift[None] if window_shift.dim() == 1 else window_shift).to(torch.int32).contiguous()
        if key_bias is not None:
            dtype = torch.float64 if key_bias.dtype == torch.float64 else torch.float32
            key_bias = key_bias.to(device=block_mask.device, dtype=dtype)
            key_bias = (key_bias[None] if key_bias.dim() == 1 else key_bias).contiguous()
        if window_lo is not None or window_hi is not None:
            qv = q_valid if q_valid is not None else torch.full((1, block_mask.shape[-2]), q_block, dtype=torch.int32,
                                                                device=block_mask.device)
            reach = window_reach(qv, k_valid, q_block, k_block, window_lo, window_hi, window_shift)
            block_mask = block_mask & reach[:, None]
        kv_count, kv_index = _compress(block_mask)
        q_count, q_index = _compress(block_mask.transpose(-1, -2))
        return cls(
            kv_count=kv_count, kv_index=kv_index, q_count=q_count, q_index=q_index,
            row_order=_heavy_first(kv_count), col_order=_heavy_first(q_count),
            k_valid=k_valid.contiguous(),
            density=block_mask.float().mean(), q_block=int(q_block), k_block=int(k_block), q_valid=q_valid,
            window_shift=window_shift, key_bias=key_bias, window_lo=window_lo, window_hi=window_hi,
            zero_q_tail=zero_q_tail,
        )

    @classmethod
    def dense(cls, batch: int, heads: int, num_q_blocks: int, num_k_blocks: int, q_block: int,
              k_block: Optional[int] = None, k_valid: Optional[torch.Tensor] = None,
              device: torch.device | str = "cpu") -> "BlockSparsePlan":
        """Every key block for every query block."""
        mask = torch.ones(batch, heads, num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)
        return cls.from_block_mask(mask, q_block, k_block, k_valid)

    # ------------------------------------------------------------------ inspection
    @property
    def has_window(self) -> bool:
        """Whether a token window (``window_lo`` / ``window_hi``) applies."""
        return self.window_lo is not None or self.window_hi is not None

    def window_bounds(self) -> tuple:
        """``(lo, hi)`` as ints, unbounded sides as ``∓WINDOW_INF`` (what the kernels take)."""
        return (-WINDOW_INF if self.window_lo is None else self.window_lo,
                WINDOW_INF if self.window_hi is None else self.window_hi)

    @property
    def num_q_blocks(self) -> int:
        return self.kv_count.shape[-1]

    @property
    def num_k_blocks(self) -> int:
        return self.q_count.shape[-1]

    @property
    def shape(self) -> tuple:
        """(B', H', Mq, Nk)."""
        return tuple(self.kv_index.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_count.device

    def to_dense(self) -> torch.Tensor:
        """The bool block mask ``[B', H', Mq, Nk]`` this plan encodes."""
        Nk = self.num_k_blocks
        slots = torch.arange(Nk, device=self.device)
        keep = slots < self.kv_count.unsqueeze(-1)
        out = torch.zeros(self.shape, dtype=torch.int8, device=self.device)
        # padded slots repeat a kept id with keep=False: take the max so they never clear it
        return out.scatter_reduce(-1, self.kv_index.long(), keep.to(torch.int8), reduce="amax").bool()

    def token_valid(self) -> torch.Tensor:
        """bool ``[Bv, Nk * k_block]``: which key tokens take part at all."""
        r = torch.arange(self.k_block, device=self.device, dtype=torch.int32)
        return (r < self.k_valid.unsqueeze(-1)).flatten(1)

    def query_valid(self) -> torch.Tensor:
        """bool ``[Bq, Mq * q_block]``: which query rows are computed."""
        r = torch.arange(self.q_block, device=self.device, dtype=torch.int32)
        return (r < self.q_valid.unsqueeze(-1)).flatten(1)

    def to(self, device: torch.device | str) -> "BlockSparsePlan":
        """A copy on ``device`` (the plan itself is left alone)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    def __repr__(self) -> str:
        Bp, Hp, Mq, Nk = self.shape
        window = f", window=({self.window_lo}, {self.window_hi})" if self.has_window else ""
        window += f", key_bias={tuple(self.key_bias.shape)}" if self.key_bias is not None else ""
        return (f"BlockSparsePlan(shape=(B={Bp}, H={Hp}, Mq={Mq}, Nk={Nk}), q_block={self.q_block}, "
                f"k_block={self.k_block}, k_valid={tuple(self.k_valid.shape)}{window}, device={self.device})")

    def to_string(self, b: int = 0, h: int = 0, max_blocks: int = 64) -> str:
        """A picture of one (b, h) block mask: '#' kept, '.' skipped (host sync: for humans)."""
        m = self.to_dense()[b, h, :max_blocks, :max_blocks].cpu()
        return "\n".join("".join("#" if x else "." for x in row) for row in m.tolist())


# The static fields (Python ints / bools: pytree context, custom-op arguments), the tensor fields that are
# always set (the list custom ops take, in this order) and the optional ones (None or a tensor: one
# ``Tensor?`` custom-op argument each; pytree leaves when set, their presence is context).
STATIC_FIELDS = ("q_block", "k_block", "window_lo", "window_hi", "zero_q_tail")
OPTIONAL_FIELDS = ("key_bias",)
TENSOR_FIELDS = tuple(f.name for f in fields(BlockSparsePlan) if f.name not in STATIC_FIELDS + OPTIONAL_FIELDS)


def op_args(plan: BlockSparsePlan) -> tuple:
    """A plan as custom ops take it: ``(tensor fields, key_bias or None, q_block, k_block, window_lo,
    window_hi)``."""
    return ([getattr(plan, n) for n in TENSOR_FIELDS], plan.key_bias, plan.q_block, plan.k_block, plan.window_lo,
            plan.window_hi)


def from_op_args(tensors, key_bias: Optional[torch.Tensor], q_block: int, k_block: int,
                 window_lo: Optional[int] = None, window_hi: Optional[int] = None) -> BlockSparsePlan:
    """The plan of `op_args` (``zero_q_tail`` back to its default: custom ops zero padded rows)."""
    return BlockSparsePlan(**dict(zip(TENSOR_FIELDS, tensors)), key_bias=key_bias, q_block=q_block, k_block=k_block,
                           window_lo=window_lo, window_hi=window_hi)


def _leaf_names(plan: BlockSparsePlan) -> tuple:
    return TENSOR_FIELDS + tuple(n for n in OPTIONAL_FIELDS if getattr(plan, n) is not None)


def _context(plan: BlockSparsePlan, names: tuple) -> tuple:
    return tuple(getattr(plan, n) for n in STATIC_FIELDS), names[len(TENSOR_FIELDS):]


def _flatten(plan: BlockSparsePlan):
    names = _leaf_names(plan)
    return [getattr(plan, n) for n in names], _context(plan, names)


def _flatten_with_keys(plan: BlockSparsePlan):
    names = _leaf_names(plan)
    return [(pytree.GetAttrKey(n), getattr(plan, n)) for n in names], _context(plan, names)


def _unflatten(leaves, context) -> BlockSparsePlan:
    # no __post_init__: pytree utilities also rebuild plans whose leaves are not tensors
    statics, optional = context
    plan = object.__new__(BlockSparsePlan)
    for name in OPTIONAL_FIELDS:
        object.__setattr__(plan, name, None)
    for name, leaf in zip(TENSOR_FIELDS + optional, leaves):
        object.__setattr__(plan, name, leaf)
    for name, value in zip(STATIC_FIELDS, statics):
        object.__setattr__(plan, name, value)
    return plan


pytree.register_pytree_node(BlockSparsePlan, _flatten, _unflatten, flatten_with_keys_fn=_flatten_with_keys,
                            serialized_type_name="video_sparse_attn.BlockSparsePlan")

"""Tile layout: reorder a `[video | text]` sequence into tile (= attention block) order and back.

Video tokens come in raster order over the latent grid ``(t, h, w)`` (t slowest). The grid is padded
per axis to a multiple of the tile, tiles are laid out in raster order and tokens in raster order
inside each tile (einops: ``(nt tt nh th nw tw) -> (nt nh nw tt th tw)``). Text is padded to a
multiple of the block size by repeating its last token. The block-ordered sequence is
``[Nv video blocks | Nt text blocks]`` of ``bs = prod(tile)`` tokens each; the reorders and indices
also come in a text-first order, ``[Nt text blocks | Nv video blocks]`` (`TileLayout.to_text_first`),
for kernels that take blocks in the order given (the text rows, which see every key, go first).

Padding values: ``zero`` → 0, ``repeat`` → copy of the last slice along each padded axis, ``mask``
→ 0. Inside each tile the real tokens come first (raster order among them, padding after), so that
a per-block count describes the padding exactly: `query_valid` for the rows that are discarded
anyway, `key_valid` for the keys a pad type excludes or that padding-free compute skips (with
`key_bias` carrying the weight of skipped ``repeat`` copies). The order inside a tile changes neither
the tile means nor the block mask.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from einops import rearrange

from .config import PAD_TYPES
from .kernels.registry import triton_runs_on

__all__ = ["TileLayout", "block_slots"]

Triple = Tuple[int, int, int]


def _build_indices(grid: Triple, tile: Triple, text_len: int, pad_type: str,
                   device: torch.device | str = "cpu", text_first: bool = False) -> Dict[str, torch.Tensor]:
    """Index tensors for one layout (see `TileLayout.indices` for their meaning), in block order or,
    with ``text_first``, with the text blocks moved before the video blocks (`_text_first_indices`).

    A tile of ``bs_t = Tt*Th*Tw`` tokens is stored in a block of ``bs = bs_t`` rounded up to 16 slots:
    real tokens first, then the tile's grid padding, then the storage tail (zeros, never a key or a
    query). Text blocks hold ``bs_t`` text tokens (the last repeated) and the same tail.
    Static-shape tensor ops only (sizes follow from the Python ints), so `torch.compile` traces it.
    """
    t, h, w = grid
    Tt, Th, Tw = tile
    nt, nh, nw = (-(-g // s) for g, s in zip(grid, tile))
    bs_t = Tt * Th * Tw
    bs = -(-bs_t // 16) * 16
    tail = bs - bs_t
    Nv = nt * nh * nw
    n_real = t * h * w
    # coordinates of every padded-grid position, then tile order
    T = torch.arange(nt * Tt, device=device).view(-1, 1, 1).expand(nt * Tt, nh * Th, nw * Tw)
    Y = torch.arange(nh * Th, device=device).view(1, -1, 1).expand_as(T)
    X = torch.arange(nw * Tw, device=device).view(1, 1, -1).expand_as(T)
    to_tiles = "(nt tt) (nh th) (nw tw) -> (nt nh nw) (tt th tw)"
    T, Y, X = (rearrange(c, to_tiles, tt=Tt, th=Th, tw=Tw) for c in (T, Y, X))   # [Nv, bs_t]
    valid = (T < t) & (Y < h) & (X < w)
    if pad_type == "repeat":
        src = T.clamp(max=t - 1) * h * w + Y.clamp(max=h - 1) * w + X.clamp(max=w - 1)
    else:
        src = torch.where(valid, T * h * w + Y * w + X, torch.zeros_like(T))
    slot_raster = torch.arange(bs_t, device=device).expand_as(T)  # raster position inside the tile of each slot
    semantic = torch.ones_like(valid)                              # a slot of the tile (not storage tail)
    if tail:
        def widen(x, value):
            return torch.cat([x, torch.full((Nv, tail), value, dtype=x.dtype, device=device)], dim=1)
        src, valid, semantic = widen(src, 0), widen(valid, False), widen(semantic, False)
        slot_raster = widen(slot_raster, bs_t)                     # bs_t: "no raster position"
    # real tokens first, then the tile's padding, then the tail (stable: raster order kept)
    rank = torch.where(valid, 0, torch.where(semantic, 1, 2)).to(torch.int8)
    order = torch.sort(rank, dim=1, stable=True).indices
    src, valid, semantic, slot_raster = (torch.gather(x, 1, order) for x in (src, valid, semantic, slot_raster))
    Nt = -(-text_len // bs_t)
    pos = torch.arange(Nt * bs, device=device)
    text_tok = (pos // bs) * bs_t + pos % bs                       # text token of each text slot
    text_semantic = pos % bs < bs_t
    text_src = n_real + torch.where(text_semantic, text_tok.clamp(max=max(text_len - 1, 0)), 0)
    src_all = torch.cat([src.flatten(), text_src])
    flat_valid = valid.flatten()
    zero_video = ~flat_valid if pad_type != "repeat" else ~semantic.flatten()
    zero_all = torch.cat([zero_video, ~text_semantic])
    n_zero = (Nv * bs - n_real if pad_type != "repeat" else Nv * tail) + Nt * tail   # a static count
    zero_pos = torch.nonzero_static(zero_all, size=n_zero).flatten()
    real_pos = torch.nonzero_static(flat_valid, size=n_real).flatten()       # slot of every video token
    text_ids = torch.arange(text_len, device=device)
    inverse = torch.cat([torch.empty(n_real, dtype=torch.long, device=device).index_put_(
        (src.flatten()[real_pos],), real_pos), Nv * bs + (text_ids // bs_t) * bs + text_ids % bs_t])
    kernel_src = src_all.index_fill(0, zero_pos, -1)
    owner = torch.full_like(src_all, -1).index_copy_(0, inverse, torch.arange(inverse.numel(), device=device))
    # multiplicity m of every real video token: the slots holding it (repeat: itself and its copies, which
    # lie in its own tile; otherwise itself), on its own slot; 1 on every other slot (copies, padding,
    # tail, text), so that log m is the key bias (exact small integers in float32)
    holds = semantic if pad_type == "repeat" else valid
    mult = torch.zeros(n_real, dtype=torch.float32, device=device).index_add_(
        0, src.flatten(), holds.flatten().to(torch.float32))
    video_mult = torch.where(valid, mult[src], 1.0)
    key_mult = torch.cat([video_mult.flatten(), torch.ones(Nt * bs, dtype=torch.float32, device=device)])
    video_valid = valid.sum(1).to(torch.int32)
    text_valid = (text_len - torch.arange(Nt, device=device) * bs_t).clamp(0, bs_t).to(torch.int32)
    idx = {
        "src": src_all, "zero_pos": zero_pos, "inverse": inverse, "kernel_src": kernel_src, "owner": owner,
        "video_valid": video_valid, "slot_raster": slot_raster, "key_mult": key_mult,
        "key_bias": key_mult.log(), "query_valid": torch.cat([video_valid, text_valid])[None],
    }
    return _text_first_indices(idx, Nt, bs) if text_first and Nt else idx


def _text_first_indices(idx: Dict[str, torch.Tensor], Nt: int, bs: int) -> Dict[str, torch.Tensor]:
    """``idx`` with the ``Nt`` text blocks (of ``bs`` slots) first: slot ``p`` of block order becomes slot
    ``(p + Nt·bs) mod P``. Per-slot tensors rotate, slot numbers shift; the per-video-tile ones stay."""
    shift = Nt * bs
    P = idx["src"].numel()
    out = {name: torch.roll(idx[name], shift) for name in ("src", "kernel_src", "owner", "key_mult", "key_bias")}
    out["zero_pos"] = torch.sort((idx["zero_pos"] + shift) % P).values
    out["inverse"] = (idx["inverse"] + shift) % P
    out["query_valid"] = torch.roll(idx["query_valid"], Nt, dims=1)
    out["video_valid"], out["slot_raster"] = idx["video_valid"], idx["slot_raster"]
    return out


def _duplicates(idx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Slots that copy a token already placed elsewhere (repeat padding, text padding copies) and
    where their gradients go: ``dup_slots [n]``, ``dup_targets [m]`` (the copied tokens, unique, as
    positions in the original sequence) and ``dup_local [n]`` (index of each copy's token in
    ``dup_targets``)."""
    src, inverse = idx["src"], idx["inverse"]
    is_zero = torch.zeros_like(src, dtype=torch.bool)
    is_zero[idx["zero_pos"]] = True
    own = torch.zeros_like(src, dtype=torch.bool)
    own[inverse] = True
    dup_slots = torch.nonzero(~own & ~is_zero).flatten()
    targets, local = torch.unique(src[dup_slots], return_inverse=True)
    return {"dup_slots": dup_slots, "dup_targets": targets, "dup_local": local}


@functools.lru_cache(maxsize=64)
def _cpu_indices(grid: Triple, tile: Triple, text_len: int, pad_type: str,
                 text_first: bool = False) -> Dict[str, torch.Tensor]:
    idx = _build_indices(grid, tile, text_len, pad_type, text_first=text_first)
    return {**idx, **_duplicates(idx)}


@functools.lru_cache(maxsize=256)
def _device_indices(grid, tile, text_len, pad_type, device: str, text_first: bool = False) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in _cpu_indices(grid, tile, text_len, pad_type, text_first).items()}


def _row_view(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret rows as 8-byte words when the strides allow (4x fewer elements to index for bf16;
    eager only: a compiled graph fuses the copy anyway)."""
    es = x.element_size()
    if torch.compiler.is_compiling():
        return x
    if es < 8 and x.dim() > 1 and x.stride(-1) == 1 and (x.shape[-1] * es) % 8 == 0 and all(
        (st * es) % 8 == 0 for st in x.stride()[:-1]
    ) and (x.storage_offset() * es) % 8 == 0:
        return x.view(torch.int64)
    return x


def _gather_rows(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    if dim == x.dim() - 1:      # elements, not rows (an lse [B, H, S]): the word view would merge them
        return x.index_select(dim, index)
    return _row_view(x).index_select(dim, index).view(x.dtype)


def _select_rows(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, index)``; on CUDA for ``[B, H, S, D]`` along S, the Triton row gather
    (any strides of x, one pass)."""
    if x.dim() == 4 and dim == 2 and triton_runs_on(x) and not torch.compiler.is_compiling():
        return _triton_select_rows(x, index)
    return x.index_select(dim, index)


def _triton_select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    from .kernels.triton_gather import gather_rows_with_means

    return gather_rows_with_means(x, index, 64, 0)[0]


class _GatherRows(torch.autograd.Function):
    """``y = x.index_select(dim, index)`` with rows ``zero_pos`` of y set to 0, plus (optionally)
    the float32 means of the ``n_means`` groups of ``group`` rows of y from group ``mean_group0`` on,
    each sum divided by ``mean_div`` (the tile volume: a storage tail of zeros does not count; not
    differentiable).

    On CUDA one Triton pass copies the rows and sums the groups; elsewhere PyTorch ops do.
    Backward: duplicated sources (repeat padding, text padding copies) sum their gradients. With
    ``dups`` (`_duplicates`: which slots are copies, where they go) each token takes its own slot's
    gradient and the copies are summed in float32 (a token can have hundreds of copies: summing them
    in bf16 would lose most of their digits); without, one ``index_add`` in float32 for half types;
    with ``unique`` (no row taken twice, as in `untile`) a plain scatter.
    """

    @staticmethod
    def forward(ctx, x, dim, index, zero_pos, kernel_src, group, n_means, mean_div=1, dups=None, unique=False,
                mean_group0=0):
        if kernel_src is not None and x.dim() == 4 and dim == 2 and triton_runs_on(x):
            from .kernels.triton_gather import gather_rows_with_means

            y, means = gather_rows_with_means(x, kernel_src, group, n_means, mean_div, mean_group0)
            if dups is not None and y.dtype in (torch.float16, torch.bfloat16) and ctx.needs_input_grad[0]:
                # the backward returns the gradient to token order with the Triton gather (`_select_rows`
                # of a gradient laid out like y): compile it now, beside the forward (`precompile`)
                from .kernels import precompile as pc

                inverse = dups[0]
                key = ("tile_bwd", y.device, y.dtype, y.shape[-1], y.stride(), inverse.shape)
                pc.precompile_async(key, lambda: _triton_select_rows(pc.empty_like(y), inverse), y.device)
        else:
            y = _gather_rows(x, dim, index)
            if zero_pos.numel():
                y.index_fill_(dim, zero_pos, 0)
            means = None
            if n_means:
                head = y.narrow(dim, mean_group0 * group, n_means * group)
                means = head.unflatten(dim, (n_means, group)).sum(dim=dim + 1, dtype=torch.float32) / mean_div
        ctx.save_for_backward(index, zero_pos, *(dups or ()))
        ctx.dim, ctx.shape, ctx.has_dups, ctx.unique = dim, x.shape, dups is not None, unique
        if means is None:
            return y, x.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(means)
        return y, means

    @staticmethod
    def backward(ctx, gy, _gmeans):
        index, zero_pos, *dups = ctx.saved_tensors
        dim, half = ctx.dim, gy.dtype in (torch.float16, torch.bfloat16)
        if ctx.has_dups and half:
            from .kernels import precompile as pc

            pc.wait()                        # the background compile of the gather below, if any, first
            inverse, (dup_slots, targets, local) = dups[0], dups[1:]
            gx = _select_rows(gy, dim, inverse)                      # every token's own slot
            if dup_slots.numel():
                acc = gx.index_select(dim, targets).float().index_add_(dim, local, gy.index_select(dim, dup_slots).float())
                gx.index_copy_(dim, targets, acc.to(gx.dtype))
            return gx, None, None, None, None, None, None, None, None, None, None
        if ctx.unique:    # every source row taken at most once (untile): a scatter, no sums
            return (gy.new_zeros(ctx.shape).index_copy_(dim, index, gy), None, None, None, None, None, None, None,
                    None, None, None)
        if zero_pos.numel():
            gy = gy.index_fill(dim, zero_pos, 0)
        acc_dtype = torch.float32 if half else gy.dtype
        gx = gy.new_zeros(ctx.shape, dtype=acc_dtype).index_add_(dim, index, gy.to(acc_dtype))
        return gx.to(gy.dtype), None, None, None, None, None, None, None, None, None, None


def _dups(idx: Dict[str, torch.Tensor]):
    """``(inverse, dup_slots, dup_targets, dup_local)`` when the cached indices hold them (eager)."""
    if "dup_slots" not in idx:
        return None
    return idx["inverse"], idx["dup_slots"], idx["dup_targets"], idx["dup_local"]


def block_slots(tile_volume: int) -> int:
    """Slots of the attention block that holds a tile of ``tile_volume`` tokens: the volume rounded up
    to 16 (the kernels' granularity); slots past the volume are a zero tail that takes part in nothing."""
    return -(-tile_volume // 16) * 16


def _is_int_triple(value) -> bool:
    """Whether ``value`` is a tuple / list of three positive integers (bools and strings refused)."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return False
    try:
        return all(not isinstance(x, bool) and operator.index(x) >= 1 for x in value)
    except TypeError:
        return False


@dataclass(frozen=True)
class TileLayout:
    """How a ``[video (t*h*w) | text (text_len)]`` sequence maps onto attention blocks.

    Attributes:
        grid_thw: unpadded latent grid (t, h, w).
        tile_thw: tile size (Tt, Th, Tw) of ``tile_volume = Tt*Th*Tw`` tokens (any size); each tile is
            an attention block of ``block_size`` slots (the volume rounded up to 16).
        text_len: number of text tokens L.
        pad_type: ``zero`` | ``repeat`` | ``mask``.
    Derived: ``tiles_thw`` (nt, nh, nw); ``num_video_blocks`` Nv; ``num_text_blocks`` Nt;
    ``num_blocks`` N = Nv + Nt; ``seq_len`` S = t*h*w + L; ``padded_len`` N * block_size.
    """

    grid_thw: Triple
    tile_thw: Triple
    text_len: int = 0
    pad_type: str = "zero"

    def __post_init__(self) -> None:
        for name in ("grid_thw", "tile_thw"):
            value = getattr(self, name)
            if not _is_int_triple(value):
                raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")
            object.__setattr__(self, name, tuple(operator.index(x) for x in value))
        if isinstance(self.text_len, bool) or not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"text_len must be an int >= 0, got {self.text_len!r}")
        if self.pad_type not in PAD_TYPES:
            raise ValueError(f"pad_type must be one of {PAD_TYPES}, got {self.pad_type!r}")
        object.__setattr__(self, "text_len", int(self.text_len))

    # ------------------------------------------------------------------ sizes
    @property
    def tile_volume(self) -> int:
        """Tokens of one tile (``Tt*Th*Tw``): the semantic block of SSTA."""
        return math.prod(self.tile_thw)

    @property
    def block_size(self) -> int:
        """Slots of one attention block (`block_slots` of the tile volume)."""
        return block_slots(self.tile_volume)

    @property
    def has_video_padding(self) -> bool:
        """Whether some tile overhangs the grid (a static fact of the shapes)."""
        return self.num_video_blocks * self.tile_volume != self.num_video_tokens

    @property
    def tiles_thw(self) -> Triple:
        return tuple(-(-g // s) for g, s in zip(self.grid_thw, self.tile_thw))  # type: ignore[return-value]

    @property
    def padded_thw(self) -> Triple:
        return tuple(n * s for n, s in zip(self.tiles_thw, self.tile_thw))  # type: ignore[return-value]

    @property
    def num_video_tokens(self) -> int:
        return math.prod(self.grid_thw)

    @property
    def num_video_blocks(self) -> int:
        return math.prod(self.tiles_thw)

    @property
    def num_text_blocks(self) -> int:
        return -(-self.text_len // self.tile_volume)

    @property
    def num_blocks(self) -> int:
        return self.num_video_blocks + self.num_text_blocks

    @property
    def seq_len(self) -> int:
        return self.num_video_tokens + self.text_len

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block_size

    def indices(self, device: torch.device | str, text_first: bool = False) -> Dict[str, torch.Tensor]:
        """Cached index tensors on ``device`` (``text_first``: for the text-first block order, see
        `to_text_first`; the per-video-tile ones are the same):
        ``src [padded_len]`` source token of every block-ordered slot; ``zero_pos`` slots filled with
        zeros; ``kernel_src`` = src with -1 at the zero slots; ``inverse [seq_len]`` slot of every
        original token; ``owner [padded_len]`` its inverse (the token a slot holds, -1 for padding and
        copies); ``video_valid [Nv]`` real tokens per video tile; ``slot_raster [Nv, bs]`` raster
        position inside its tile of each slot; ``key_mult [padded_len]`` float32 multiplicity of the
        token on its own slot (1 elsewhere) and ``key_bias`` its log (`key_bias`); ``query_valid [1, N]``
        real query rows per block (`query_valid`).
        """
        text_first = bool(text_first) and self.num_text_blocks > 0
        if torch.compiler.is_compiling():   # built in the graph (a few small static-shape ops), not cached
            return _build_indices(self.grid_thw, self.tile_thw, self.text_len, self.pad_type, device, text_first)
        return _device_indices(self.grid_thw, self.tile_thw, self.text_len, self.pad_type, str(torch.device(device)),
                               text_first)

    def to_text_first(self, x: torch.Tensor, dims=-1, slots: bool = False) -> torch.Tensor:
        """A tensor indexed by block (``slots``: by block-ordered slot) along ``dims`` (an int or a
        tuple, e.g. ``(-2, -1)`` for a block mask), re-indexed for the text-first order that `tile` /
        `untile` / `indices` take with ``text_first=True``: the text blocks, then the video blocks (a
        rotation by the text blocks; a new tensor, or ``x`` itself without text). Backends whose
        kernels take blocks in the order given run SSTA in it (`BackendSpec.text_first`)."""
        n = self.num_text_blocks * (self.block_size if slots else 1)
        if not n:
            return x
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        return torch.roll(x, (n,) * len(dims), dims=dims)

    # ------------------------------------------------------------------ reorder
    def _check_seq_len(self, n: int) -> None:
        if n != self.seq_len:
            raise ValueError(
                f"sequence length {n} != t*h*w + text_len = "
                f"{'*'.join(map(str, self.grid_thw))} + {self.text_len} = {self.seq_len}"
            )

    def tile(self, x: torch.Tensor, seq_dim: int = 2, text_first: bool = False) -> torch.Tensor:
        """``[..., S, ...]`` (sequence along ``seq_dim``) → block order ``[..., N*bs, ...]`` (new tensor;
        ``text_first``: in the text-first order, `to_text_first`)."""
        self._check_seq_len(x.shape[seq_dim])
        idx = self.indices(x.device, text_first)
        return _GatherRows.apply(x, seq_dim % x.dim(), idx["src"], idx["zero_pos"], idx["kernel_src"],
                                 self.block_size, 0, 1, _dups(idx))[0]

    def tile_with_means(self, x: torch.Tensor, text_first: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """`tile` of ``x [B, H, S, D]`` plus the float32 mean of every video tile ``[B, H, Nv, D]``
        (padding included, as the block selection defines it; in video tile order also with
        ``text_first``), from the same pass over x."""
        if x.dim() != 4:
            raise ValueError(f"expected [B, H, S, D], got shape {tuple(x.shape)}")
        self._check_seq_len(x.shape[2])
        idx = self.indices(x.device, text_first)
        first = self.num_text_blocks if text_first else 0
        return _GatherRows.apply(x, 2, idx["src"], idx["zero_pos"], idx["kernel_src"], self.block_size,
                                 self.num_video_blocks, self.tile_volume, _dups(idx), False, first)

    def untile(self, y: torch.Tensor, seq_dim: int = 2, text_first: bool = False) -> torch.Tensor:
        """Inverse of `tile`: block order (``text_first``: the text-first order) ``[..., N*bs, ...]`` →
        ``[..., S, ...]`` (padding dropped)."""
        if y.shape[seq_dim] != self.padded_len:
            raise ValueError(f"expected {self.padded_len} block-ordered tokens, got {y.shape[seq_dim]}")
        idx = self.indices(y.device, text_first)
        return _GatherRows.apply(y, seq_dim % y.dim(), idx["inverse"], idx["zero_pos"][:0], None, 1, 0, 1, None,
                                 True)[0]

    # ------------------------------------------------------------------ validity per block
    def query_valid(self, device: torch.device | str, text_first: bool = False) -> torch.Tensor:
        """Real query rows per block, int32 ``[1, N]`` (a `BlockSparsePlan.q_valid`; ``text_first``: in
        that order): video tiles count their real tokens, text blocks their tokens before the padding
        copies. Rows past the count are dropped by `untile`, so they need not be computed."""
        # built once per layout, device and order (no copy per call)
        return self.indices(device, text_first)["query_valid"]

    def _loaded_video_keys(self, device, key_tile: int) -> torch.Tensor:
        """Keys per video tile that padding-free ``zero`` padding loads: the real tokens, rounded up to
        whole ``key_tile``s (zero keys inside a tile the kernel loads anyway), at most the tile volume."""
        valid = self.indices(device)["video_valid"]
        if key_tile <= 1:
            return valid
        return ((valid + key_tile - 1) // key_tile * key_tile).clamp(max=self.tile_volume).to(valid.dtype)

    def key_valid(self, text_mask: Optional[torch.Tensor], device: torch.device | str,
                  padding_free: bool = False, key_tile: int = 1) -> torch.Tensor:
        """Key tokens per block that the kernels load, int32 ``[B or 1, N]`` (a `BlockSparsePlan.k_valid`).

        ``pad_type="mask"`` excludes padded video tokens, text padding copies and, when ``text_mask``
        ``[B, L]`` is given, the tokens past its valid count (a valid prefix). With ``padding_free``
        (skip the padded video keys): ``zero`` skips the zero-padded keys (their exact effect is
        restored by `zero_keys`), except those sharing a ``key_tile`` with real tokens (a backend's
        `BackendSpec.key_tile`: loading them costs nothing and computes them exactly); ``repeat``
        loads only the real tokens of each tile, whose copies' weight `key_bias` must then add (so
        only for a backend with `BackendSpec.key_bias`; ``key_tile`` does not apply). Otherwise every
        token of a tile is a key. Text blocks keep all ``tile_volume`` tokens as keys (text padding
        copies included) except with ``mask``; the storage tail past the tile volume never is a key.
        """
        bs, Nv, Nt = self.tile_volume, self.num_video_blocks, self.num_text_blocks
        if self.pad_type != "mask":
            if not padding_free:
                return torch.full((1, Nv + Nt), bs, dtype=torch.int32, device=device)
            video = (self._loaded_video_keys(device, key_tile) if self.pad_type == "zero"
                     else self.indices(device)["video_valid"])
            return torch.cat([video[None], torch.full((1, Nt), bs, dtype=torch.int32, device=device)], dim=1)
        video = self.indices(device)["video_valid"][None]
        if text_mask is None:   # every text token valid: the same counts as the query rows
            return self.query_valid(device)
        n_text = text_mask.to(device=device).sum(-1, dtype=torch.int32)[:, None]
        starts = torch.arange(Nt, device=device, dtype=torch.int32)[None] * bs
        text = (n_text - starts).clamp(0, bs)
        return torch.cat([video.expand(text.shape[0], Nv), text], dim=1).to(torch.int32)

    def key_bias(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive score bias per key slot, ``[padded_len]`` of ``dtype`` (float32, cached; or float64, for
        float64 inputs: exact to their precision; natural log; a `BlockSparsePlan.key_bias` row):
        ``log m_r`` on the slot of real video token ``r``, where
        ``m_r`` = 1 + its ``repeat`` copies (each copy lies in ``r``'s own tile, behind its real
        tokens), 0 on every other slot (copies, storage tail, text). A key seen ``m_r`` times with logit
        ``s`` weighs ``m_r e^s = e^(s + log m_r)``: attention over the real keys (`key_valid` with
        ``padding_free``) with this bias equals attention over every slot of a kept tile. All zeros
        for ``zero`` and ``mask`` padding."""
        idx = self.indices(device)
        return idx["key_bias"] if dtype == torch.float32 else idx["key_mult"].to(dtype).log()

    def zero_keys(self, device: torch.device | str, key_tile: int = 1) -> torch.Tensor:
        """Zero-padded video keys per block, float32 ``[N]`` (0 for text blocks and other pad types):
        the keys that padding-free compute skips (`key_valid` with the same ``key_tile``) and adds
        back exactly (logit 0, value 0)."""
        N = self.num_blocks
        if self.pad_type != "zero":
            return torch.zeros(N, dtype=torch.float32, device=device)
        pad = self.tile_volume - self._loaded_video_keys(device, key_tile).float()
        return torch.cat([pad, torch.zeros(self.num_text_blocks, device=device)])

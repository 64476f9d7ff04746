"""What the Triton kernels share: constants, kernel options, launch helpers and the row prologue.

Kernel options replace process-environment switches: every knob is an argument of
`block_sparse_attention_triton(..., kernel_options=...)`, so a compiled graph, a test or a server
never depends on the environment. `resolve_kernel_options` fills the defaults and refuses unknown keys.
"""

from __future__ import annotations

import math
import os
from typing import Literal, Optional, TypedDict

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET", "LOG2E", "LN2", "C_LOG2E", "C_LN2", "KernelOptions", "resolve_kernel_options", "kernel_configs",
    "dot_precision", "plan_strides", "tma_layout_ok", "tma_usable", "query_tile", "row_program", "window_sides", "SHAPE_ARGS_M",
    "SHAPE_ARGS_N", "key_bias_args", "key_bias_log2",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # read once at import: Triton itself does the same
LOG2E = 1.4426950408889634                               # exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453                                 # ln(x) = log2(x) * LN2
C_LOG2E = tl.constexpr(LOG2E)                            # the same, for use inside kernels
C_LN2 = tl.constexpr(LN2)

# Integer arguments Triton must not specialise on (``do_not_specialize``): by default it compiles a
# separate variant for an int equal to 1 and records whether it is divisible by 16. These change with
# the sequence length and the mask layout (the plan's strides grow with the block counts, 0 where
# broadcast), so each new video size would compile the kernels again; they only feed scalar address
# arithmetic and loop bounds, where the specialisation buys nothing. (Sq stays specialised: it
# addresses the lse / delta / dQ-buffer rows, and it is a multiple of the block size anyway.)
_SHAPE_ARGS = ("s_cnt_b", "s_cnt_h", "s_idx_b", "s_idx_h", "s_ord_b", "s_ord_h", "s_val_b", "s_qv_b",
               "s_sh_b", "s_kb_b", "H", "Sk", "win_lo", "win_hi")
SHAPE_ARGS_M = [*_SHAPE_ARGS, "s_idx_m"]     # kernels that walk kv_index (forward, deterministic dQ)
SHAPE_ARGS_N = [*_SHAPE_ARGS, "s_idx_n"]     # the dK/dV kernels (q_index)


class KernelOptions(TypedDict, total=False):
    """Tuning knobs of the Triton kernels (every key optional; `resolve_kernel_options` fills defaults).

    Correctness never depends on them: each combination computes the same attention.
    """

    tma: bool
    """Read the walked operands through tensor descriptors (TMA) where usable (sm90+, power-of-two
    head dim, 16-byte aligned strides). ``False`` forces pointer loads everywhere, the path Ampere and
    Ada run. Default ``True``."""

    warp_specialize: bool
    """Warp-specialise the forward key loop (``tl.range(..., warp_specialize=True)``), only at D=128
    with TMA, with its own 8-warp config list. Measured slower (benchmarks/NOTES.md v5). Default ``False``."""

    fwd_peel: bool
    """Forward: run ragged key sub-tiles in a second, masked loop so the main loop has no branch.
    ``False`` masks them behind a per-sub-tile branch (the v3 loop). Default ``True``."""

    fwd_lazy: bool
    """Forward: move the softmax reference max (and rescale the accumulator) only when a row's max
    grows by more than 8 in log2 units. ``False`` rescales every tile. Default ``True``."""

    autotune: bool
    """Benchmark each kernel's config list on first use of a shape family (cached on disk, and skipped
    for GPUs in the shipped table, see `tuning`). ``False`` takes the first config of each list. Default
    ``True`` (the interpreter always takes the first config)."""

    dq_reduce: Literal["atomic", "tma"]
    """Single-pass backward: how dQ contributions reach the float32 dQ buffer. ``"atomic"``: pointer
    ``tl.atomic_add`` (every GPU). ``"tma"``: tensor-descriptor reduce-add (``desc.atomic_add``, a TMA
    reduce on sm90+; falls back to ``"atomic"`` where descriptors are unusable; measured 17% slower
    at 720p on an H200, benchmarks/NOTES.md v7). Default ``"atomic"``.
    Ignored with ``deterministic=True``."""

    skip_padded_queries: bool
    """dK/dV loops (both backward modes): walk each kept query block's sub-tiles only up to its
    ``q_valid`` (an inner loop per block, software-pipelined within the block). ``False``: one flat
    loop over every sub-tile (pipelined across blocks, the v5 loop); padded rows then cost GEMMs but
    add nothing (their lse is -inf). Results are identical. Default ``True``."""

    gluon: bool
    """On Hopper (sm90), forward: run the warp-specialised Gluon kernel (`gluon_fwd.gluon_sparse_forward`:
    a TMA producer warpgroup and two 64-row consumer warpgroups) where it supports the call (bf16 / fp16,
    head dim 64 or 128, blocks multiples of 128, no token window, no key bias, q/k/v strides a 2-D TMA
    view describes; `gluon_fwd.sparse_unsupported`), else the Triton forward. Same outputs (out, and the
    lse the backward reuses) to rounding. The single-pass backward likewise runs the Gluon backward
    (`gluon_bwd`, dQ by TMA reduce-add) where it supports the call (D=128, q / k / v of one shape, plan
    covering the sequence; `gluon_bwd.sparse_backward_unsupported`), with ``deterministic=True`` too (dQ
    then in fixed point). ``False``: the Triton kernels always. Default ``True``."""

    gluon_fwd_stages: int
    """Gluon forward: depth of its K and V rings (2 or 3 slots of 128 keys each; 3 measured no faster).
    Default 2."""

    gluon_fwd_skip_idle: bool
    """Gluon forward: in a 128-row tile with at most 64 valid rows, the second consumer warpgroup (all
    padding) only releases the K / V ring's slots instead of computing. Same outputs; on an H200 at
    720p/121f 1.5% off the padding-free inference plan's forward (37.22 vs 37.79 ms). Default ``True``."""

    gluon_bwd_stages: int
    """Gluon backward: depth of its Q / dO ring (2 or 3 slots of 64 query rows; 3 measured slower with
    the overlapping walk). Default 2."""

    gluon_bwd_overlap: bool
    """Gluon backward: issue each query step's Sᵀ before the previous step's dQ is waited for and added
    (`gluon_bwd._consumer_walk_overlap`), so that the two overlap. ``False``: each step waits for all
    its GEMMs before the dQ adds (the first walk: 5% slower on an H200 on an STA mask at S = 46k, level
    at 720p/121f; benchmarks/NOTES.md v10). Default ``True``."""


_DEFAULTS: KernelOptions = {
    "tma": True, "warp_specialize": False, "fwd_peel": True, "fwd_lazy": True, "autotune": True,
    "dq_reduce": "atomic", "skip_padded_queries": True, "gluon": True, "gluon_fwd_stages": 2, "gluon_bwd_stages": 2,
    "gluon_bwd_overlap": True, "gluon_fwd_skip_idle": True,
}
_CHOICES = {"dq_reduce": ("atomic", "tma"), "gluon_fwd_stages": (2, 3), "gluon_bwd_stages": (2, 3)}


def resolve_kernel_options(options: Optional[dict] = None) -> dict:
    """The defaults overridden by ``options``; an unknown key or a bad value raises one-line ValueError."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown kernel_options {unknown}; known: {sorted(_DEFAULTS)}")
    out = {**_DEFAULTS, **options}
    for key, value in out.items():
        allowed = _CHOICES.get(key, (True, False))
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ValueError(f"kernel_options[{key!r}] = {value!r}; expected one of {list(allowed)}")
    return out


def kernel_configs(rows, q_tile: int, k_tile: int, names=("BLOCK_M", "BLOCK_N")):
    """`triton.Config`s from ``(bm, bn, warps, stages)`` rows, tiles cut to divide the plan's blocks.

    ``gcd(b, tile)`` is a power of two ≥ 16 dividing the plan block (blocks are multiples of 16).
    Duplicates after the cut are dropped.
    """
    seen, out = set(), []
    for bm, bn, warps, stages in rows:
        row = (math.gcd(bm, q_tile), math.gcd(bn, k_tile), warps, stages)
        if row not in seen:
            seen.add(row)
            out.append(triton.Config({names[0]: row[0], names[1]: row[1]}, num_warps=warps, num_stages=stages))
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact products (tests); half types use the tensor cores' native path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def plan_strides(t: torch.Tensor, B: int, H: int):
    """Strides of a plan tensor ``[B', H', ...]`` expanded to ``[B, H, ...]`` (0 on broadcast dims)."""
    return t.expand(B, H, *t.shape[2:]).stride()


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_layout_ok(D: int, *tensors: torch.Tensor) -> bool:
    """The layout half of `tma_usable`: unpadded power-of-two D, unit last stride, 16-byte aligned
    base and strides."""
    if D != triton.next_power_of_2(D) or D < 16:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st == 0 or (st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def tma_usable(D: int, *tensors: torch.Tensor, enabled: bool = True) -> bool:
    """Tensor descriptors: enabled, sm90+ and `tma_layout_ok` (never under the interpreter)."""
    x = tensors[0]
    if not enabled or INTERPRET or not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if not tma_layout_ok(D, *tensors):
        return False
    triton.set_allocator(_scratch)
    return True


def key_bias_args(plan, batch: int):
    """``(pointer, batch stride, HAS_KEY_BIAS)`` of ``plan.key_bias`` for a kernel launch. Without a bias
    the pointer and stride are None: Triton takes None arguments as constants, so the kernel's signature,
    and with it the compiled code, stay exactly those of the kernel before the bias existed (a dummy
    pointer compiles the same IR, but its extra parameters reorder the PTX and move register allocation)."""
    if plan.key_bias is None:
        return None, None, False
    return plan.key_bias, plan.key_bias.expand(batch, -1).stride(0), True


@triton.jit
def key_bias_log2(base, row0, offs, HAS_KEY_BIAS: tl.constexpr):
    """The score bias of keys ``row0 + offs`` in log2 units (the kernels' scores are ``q·k·scale·log2 e``,
    so the natural-log bias is multiplied by log2 e), from ``base`` = the batch's row of
    ``plan.key_bias``; 0.0 without a bias (nothing is loaded)."""
    kb = 0.0
    if HAS_KEY_BIAS:
        kb = tl.load(base + row0 + offs) * C_LOG2E
    return kb


@triton.jit
def query_tile(tile, b, h, ROW_ORDER, KV_COUNT, KV_INDEX, Q_VALID,
               s_ord_b, s_ord_h, s_cnt_b, s_cnt_h, s_idx_b, s_idx_h, s_idx_m, s_qv_b,
               Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row prologue of the programs that own ``BLOCK_M`` query rows (forward, deterministic dQ).

    Tile ``tile`` is sub-tile ``tile % SUB_M`` of the query block of rank ``tile // SUB_M`` in
    ``row_order`` (heaviest first). Returns the block id, the number of kept key blocks to walk (0 when
    every row of the sub-tile is padding, so the key loop is skipped), the pointer to the block's kept
    key ids, the global row ids ``offs_m [BLOCK_M]`` and ``n_rows``, the valid rows of this sub-tile
    (rows ``offs_m[r]`` with ``r >= n_rows`` are padding; ``n_rows`` may exceed BLOCK_M).
    """
    SUB_M: tl.constexpr = Q_BLOCK // BLOCK_M
    q_blk = tl.load(ROW_ORDER + b * s_ord_b + h * s_ord_h + tile // SUB_M)
    sub = tile % SUB_M
    n_rows = tl.load(Q_VALID + b * s_qv_b + q_blk) - sub * BLOCK_M
    count = tl.load(KV_COUNT + b * s_cnt_b + h * s_cnt_h + q_blk)
    count = tl.where(n_rows > 0, count, 0)
    idx_ptr = KV_INDEX + b * s_idx_b + h * s_idx_h + q_blk * s_idx_m
    offs_m = q_blk * Q_BLOCK + sub * BLOCK_M + tl.arange(0, BLOCK_M)
    return q_blk, count, idx_ptr, offs_m, n_rows


@triton.jit
def row_program(H, ROWS: tl.constexpr, D_PAD: tl.constexpr):
    """Prologue of the row-wise helper kernels, grid (row groups of ROWS, B*H): this program's b, h
    (int64), its ROWS row ids (int64) and the D_PAD column ids."""
    bh = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), rows, tl.arange(0, D_PAD)


@triton.jit
def window_sides(pos_lo, pos_hi, key_lo, key_hi, win_lo, win_hi):
    """Query positions ``pos_lo .. pos_hi`` against keys ``key_lo .. key_hi`` under the window
    ``win_lo <= key - pos <= win_hi``: ``(inside, some)`` — every pair inside it / some pair inside it
    (a sub-tile with ``some`` but not ``inside`` crosses the window's edge)."""
    lo_d = key_lo - pos_hi                      # least and greatest key - pos over the pairs
    hi_d = key_hi - pos_lo
    return (lo_d >= win_lo) & (hi_d <= win_hi), (hi_d >= win_lo) & (lo_d <= win_hi)

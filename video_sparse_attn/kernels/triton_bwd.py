"""Triton backward kernels of block-sparse attention over a `BlockSparsePlan`.

Probabilities are recomputed from the forward's lse (base 2 inside): P = exp2(S·scale·log2e − lse·log2e),
dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − delta) with delta = rowsum(out ∘ dout), dK = scale·dSᵀ·Q,
dQ = scale·dS·K. Rows with lse = -inf (no key, or padded query rows) get probability 0 everywhere,
hence zero gradients; key rows past ``k_valid`` get zero dK/dV; query sub-tiles whose rows all lie
past ``q_valid`` are skipped (dK/dV: an inner loop per kept query block runs only up to q_valid —
a branch around the GEMMs of a flat loop would stop Triton from pipelining it; the flat v5 loop
stays selectable, ``skip_padded_queries=False``). Padded rows inside a partly valid sub-tile are
read and multiplied by a probability of 0, so q / dout must hold finite values there (the layout
pads with zeros or repeats).

Launches:
- ``_delta_kernel``: delta[b,h,i] = Σ_d out·dout (float32), the softmax-gradient row term.
- ``_dkdv_kernel``: one program per ``BLOCK_N`` keys of one key block (``col_order``, heaviest
  first); walks the query blocks of ``q_index`` as ``Q_BLOCK // BLOCK_M`` sub-tiles in one flat loop,
  keeping dK/dV in registers. Default (single pass, ``DQ_MODE`` 1 or 2): it also computes each
  sub-tile's dQ contribution dS·K and adds it to a float32 buffer (pointer atomics, or a TMA
  reduce-add through a tensor descriptor); ``_dq_convert_kernel`` then scales and casts the buffer.
  Five block GEMMs per (query sub-tile, key sub-tile) pair. The order of the atomic additions varies
  from run to run, so dQ is not bit-reproducible.
- Deterministic (``deterministic=True``): ``_dkdv_kernel`` with ``DQ_MODE`` 0, then ``_dq_kernel``:
  one program per ``BLOCK_M`` query rows (``row_order``) walks ``kv_index`` like the forward and
  recomputes P and dP (seven block GEMMs per pair; no atomics, bit-reproducible).
Key bias (``plan.key_bias``, a ``HAS_KEY_BIAS`` variant): every recomputation of P adds the keys' bias
(log2 units) to the scaled scores; the dK/dV program owns its keys, so it loads their bias once.
Token windows: the dK/dV and dQ walks run the pairs wholly inside the window unmasked (the others get
probability 0 by an +inf offset on their lse), then only the pairs crossing its edge, masked.
Grids put the tile axis fastest (one head at a time, heavy tiles first); tensor descriptors (TMA)
replace pointer loads of the walked operands on sm90+ when strides allow (see `tma_usable`).
On Hopper the single pass runs the Gluon kernel instead (`gluon_bwd`: a TMA producer warpgroup and two
consumer warpgroups, dQ by TMA reduce-add) wherever it supports the call (`gluon_backward_usable`,
kernel option ``gluon``); the same gradients up to the order of the dQ additions. There
``deterministic=True`` runs the same single pass with dQ accumulated in fixed point, one int32 sum per
element (integer additions give the same bits in any order; `gluon_bwd.fixed_point_scales`) instead of
two passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import precompile as pc
from .triton_common import (SHAPE_ARGS_M, SHAPE_ARGS_N, C_LOG2E, LOG2E, dot_precision, key_bias_args, key_bias_log2,
                            plan_strides, query_tile, row_program, tma_usable, window_sides)
from .tuning import tuned_kernel

__all__ = ["attention_backward", "gluon_backward_usable", "DKDV_CONFIGS", "DQ_CONFIGS", "ONE_PASS_CONFIGS"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
DKDV_CONFIGS = {
    "small_d": [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2)],
    "large_d": [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
DQ_CONFIGS = {
    "small_d": [(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3)],
    "large_d": [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
# single pass: dK, dV and a [BLOCK_M, D] dQ tile live at once, so lists lean to fewer stages
ONE_PASS_CONFIGS = {
    "small_d": [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 8, 3), (32, 64, 4, 3)],
    "large_d": [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
_ROWS = 64          # rows per program of the delta and dQ-convert kernels


@triton.jit(do_not_specialize=["H"])
def _delta_kernel(
    O, DO, DELTA, sob, soh, sos, sod, sdb, sdh, sds, sdd, H, Sq,
    D: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr,
):
    # Grid: (row groups of ROWS, B*H). delta = rowsum(out * dout) in float32.
    b, h, offs_m, offs_d = row_program(H, ROWS, D_PAD)
    ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _off_unless_inside(pos0, key_lo, key_hi, win_lo, win_hi, BLOCK_M: tl.constexpr):
    """0 if every row ``pos0 .. pos0 + BLOCK_M - 1`` sees every key ``key_lo .. key_hi`` through the
    window, else +inf (the pair is left to the masked walk)."""
    inside, _ = window_sides(pos0, pos0 + BLOCK_M - 1, key_lo, key_hi, win_lo, win_hi)
    return tl.where(inside, 0.0, float("inf"))


@triton.jit
def _dkdv_step(
    k, v, dk, dv, q_src, do_src, dq_dst, LSE, DELTA, row_base, row0, rem, key_ok, offs_m, offs_d, d_ok,
    sqs, sqd, sds, sdd, qk_scale, offs_n, q_shift, win_lo, win_hi, off, kb,
    D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, DQ_MODE: tl.constexpr,
    WINDOW: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (query sub-tile, key sub-tile) pair: dV += Pᵀ·dO, dK += dSᵀ·Q and (DQ_MODE ≠ 0) dQ += dS·K.

    ``q_src`` / ``do_src``: tensor descriptors (USE_TMA) or the per-head base pointers; ``dq_dst``: the
    dQ buffer's descriptor (DQ_MODE 2) or base pointer. Rows of the sub-tile start at ``row0``.
    ``off``: 0, or +inf to make the pair contribute nothing (a scalar); ``WINDOW``: test the window
    score by score. ``kb [BLOCK_N]`` (``HAS_KEY_BIAS``): the keys' score bias in log2 units.
    """
    rows = row0 + offs_m
    if USE_TMA:
        qt = tl.trans(q_src.load([row0, 0]))
        do = do_src.load([row0, 0])
    else:
        qt = tl.load(q_src + rows[None, :] * sqs + offs_d[:, None] * sqd, mask=d_ok[:, None], other=0.0)
        do = tl.load(do_src + rows[:, None] * sds + offs_d[None, :] * sdd, mask=d_ok[None, :], other=0.0)
    lse2 = tl.load(LSE + row_base + rows) * C_LOG2E
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2) + off    # keyless / padded rows → p = 0
    delta = tl.load(DELTA + row_base + rows)
    st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale            # scaled log2 scores Sᵀ [N, M]
    if HAS_KEY_BIAS:
        st = st + kb[:, None]
    pt = tl.exp2(st - lse2[None, :])                                    # Pᵀ [N, M]
    if rem < BLOCK_N:
        pt = tl.where(key_ok[:, None], pt, 0.0)
    if WINDOW:                                                          # win_lo <= key - (row + shift) <= win_hi
        d = offs_n[:, None] - (rows + q_shift)[None, :]
        pt = tl.where((d >= win_lo) & (d <= win_hi), pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)             # dPᵀ [N, M]
    dst = pt * (dpt - delta[None, :])                                   # dSᵀ [N, M]
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)
    if DQ_MODE != 0:                                                    # this pair's dS·K, unscaled
        dq = tl.dot(tl.trans(dst).to(k.dtype), k, input_precision=DOT_PREC)   # [M, D_PAD]
        if DQ_MODE == 2:
            dq_dst.atomic_add([row0, 0], dq)
        else:
            tl.atomic_add(dq_dst + rows[:, None] * D_PAD + offs_d[None, :], dq, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=SHAPE_ARGS_N)
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
    Q_COUNT, Q_INDEX, COL_ORDER, K_VALID, Q_VALID, Q_SHIFT, KEY_BIAS,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    s_dkb, s_dkh, s_dks, s_dkd, s_dvb, s_dvh, s_dvs, s_dvd,
    s_cnt_b, s_cnt_h, s_idx_b, s_idx_h, s_idx_n, s_ord_b, s_ord_h, s_val_b, s_qv_b, s_sh_b, s_kb_b,
    H, Sq, Sk, sm_scale, qk_scale, win_lo, win_hi,
    D: tl.constexpr, D_PAD: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, DQ_MODE: tl.constexpr, SKIP_PAD_Q: tl.constexpr,
    WINDOW: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (key sub-tiles of all key blocks in col_order rank, B*H); one program = BLOCK_N keys.
    # WINDOW: the main walk runs only the query sub-tiles whose rows see all of this key sub-tile (no
    # per-score test; the others are switched off by an +inf offset), a last walk the ones crossing the
    # window's edge, masked. Sub-tiles wholly outside it contribute nothing.
    # DQ_MODE: 0 no dQ (deterministic path), 1 dQ by pointer atomics, 2 dQ by TMA reduce-add.
    # SKIP_PAD_Q: walk each kept query block's sub-tiles only up to q_valid (an inner loop per block,
    # pipelined within the block); else one flat loop over every sub-tile (pipelined across blocks;
    # padded rows then cost GEMMs but contribute 0 since their lse is -inf).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    SUB_M: tl.constexpr = Q_BLOCK // BLOCK_M
    SUB_N: tl.constexpr = K_BLOCK // BLOCK_N

    k_blk = tl.load(COL_ORDER + b * s_ord_b + h * s_ord_h + tile // SUB_N)
    rem = tl.load(K_VALID + b * s_val_b + k_blk) - (tile % SUB_N) * BLOCK_N   # valid keys in this tile
    count = tl.load(Q_COUNT + b * s_cnt_b + h * s_cnt_h + k_blk)
    count = tl.where(rem > 0, count, 0)                                       # all-padding tile: zeros
    idx_ptr = Q_INDEX + b * s_idx_b + h * s_idx_h + k_blk * s_idx_n
    qv_ptr = Q_VALID + b * s_qv_b
    sh_ptr = Q_SHIFT + b * s_sh_b

    key_lo = k_blk * K_BLOCK + (tile % SUB_N) * BLOCK_N                # this program's key positions
    key_hi = key_lo + BLOCK_N - 1
    offs_n = key_lo + tl.arange(0, BLOCK_N)
    key_ok = tl.arange(0, BLOCK_N) < rem
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=d_ok[None, :], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
    kb = 0.0
    if HAS_KEY_BIAS:   # this program's keys are fixed: their bias is loaded once
        kb = key_bias_log2(KEY_BIAS + b * s_kb_b, key_lo, tl.arange(0, BLOCK_N), HAS_KEY_BIAS)
    row_base = bh.to(tl.int64) * Sq
    q_src = Q + b * sqb + h * sqh
    do_src = DO + b * sdb + h * sdh
    dq_dst = DQ_ACC + row_base * D_PAD           # dQ buffer: float32 [B*H, Sq, D_PAD], contiguous
    if USE_TMA:
        q_src = tl.make_tensor_descriptor(q_src, shape=[Sq, D], strides=[sqs, 1], block_shape=[BLOCK_M, D])
        do_src = tl.make_tensor_descriptor(do_src, shape=[Sq, D], strides=[sds, 1], block_shape=[BLOCK_M, D])
    if DQ_MODE == 2:
        dq_dst = tl.make_tensor_descriptor(dq_dst, shape=[Sq, D_PAD], strides=[D_PAD, 1], block_shape=[BLOCK_M, D_PAD])

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    if SKIP_PAD_Q:
        for j in range(0, count):
            q_blk = tl.load(idx_ptr + j)
            n_sub = tl.cdiv(tl.load(qv_ptr + q_blk), BLOCK_M)               # sub-tiles with a valid row
            q_shift = 0
            if WINDOW:
                q_shift = tl.load(sh_ptr + q_blk)
            for sub in range(0, n_sub):
                row0 = q_blk * Q_BLOCK + sub * BLOCK_M
                off = 0.0
                if WINDOW:
                    off = _off_unless_inside(row0 + q_shift, key_lo, key_hi, win_lo, win_hi, BLOCK_M)
                dk, dv = _dkdv_step(
                    k, v, dk, dv, q_src, do_src, dq_dst, LSE, DELTA, row_base, row0,
                    rem, key_ok, offs_m, offs_d, d_ok, sqs, sqd, sds, sdd, qk_scale, offs_n, q_shift, win_lo, win_hi,
                    off, kb, D_PAD, DOT_PREC, USE_TMA, DQ_MODE, False, HAS_KEY_BIAS, BLOCK_M, BLOCK_N)
    else:
        for it in range(0, count * SUB_M):
            q_blk = tl.load(idx_ptr + it // SUB_M)
            row0 = q_blk * Q_BLOCK + (it % SUB_M) * BLOCK_M
            q_shift = 0
            off = 0.0
            if WINDOW:
                q_shift = tl.load(sh_ptr + q_blk)
                off = _off_unless_inside(row0 + q_shift, key_lo, key_hi, win_lo, win_hi, BLOCK_M)
            dk, dv = _dkdv_step(
                k, v, dk, dv, q_src, do_src, dq_dst, LSE, DELTA, row_base, row0,
                rem, key_ok, offs_m, offs_d, d_ok, sqs, sqd, sds, sdd, qk_scale, offs_n, q_shift, win_lo, win_hi,
                off, kb, D_PAD, DOT_PREC, USE_TMA, DQ_MODE, False, HAS_KEY_BIAS, BLOCK_M, BLOCK_N)

    if WINDOW:   # the query sub-tiles crossing the window's edge, masked score by score; kept query
                 # blocks are screened 64 at a time as whole blocks (only one crossing the edge has such a sub-tile)
        offs_c = tl.arange(0, 64)
        for c in range(0, count, 64):
            in_col = c + offs_c < count
            blk = tl.load(idx_ptr + c + offs_c, mask=in_col, other=0)
            b_pos = blk * Q_BLOCK + tl.load(sh_ptr + blk, mask=in_col, other=0)
            b_in, b_some = window_sides(b_pos, b_pos + Q_BLOCK - 1, key_lo, key_hi, win_lo, win_hi)
            todo = in_col & b_some & (b_in == 0)
            for r in range(0, tl.sum(todo.to(tl.int32))):
                pos = tl.min(tl.where(todo, offs_c, 64))
                todo = todo & (offs_c != pos)
                q_blk = tl.load(idx_ptr + c + pos)
                n_sub = SUB_M
                if SKIP_PAD_Q:
                    n_sub = tl.cdiv(tl.load(qv_ptr + q_blk), BLOCK_M)
                q_shift = tl.load(sh_ptr + q_blk)
                for sub in range(0, n_sub):
                    row0 = q_blk * Q_BLOCK + sub * BLOCK_M
                    pos0 = row0 + q_shift
                    inside, some = window_sides(pos0, pos0 + BLOCK_M - 1, key_lo, key_hi, win_lo, win_hi)
                    if some & (inside == 0):
                        dk, dv = _dkdv_step(
                            k, v, dk, dv, q_src, do_src, dq_dst, LSE, DELTA, row_base, row0,
                            rem, key_ok, offs_m, offs_d, d_ok, sqs, sqd, sds, sdd, qk_scale, offs_n, q_shift,
                            win_lo, win_hi, 0.0, kb, D_PAD, DOT_PREC, USE_TMA, DQ_MODE, True, HAS_KEY_BIAS,
                            BLOCK_M, BLOCK_N)

    dk = dk * sm_scale
    tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dks + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=d_ok[None, :])
    tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvs + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=d_ok[None, :])


@triton.jit(do_not_specialize=["H"])
def _dq_convert_kernel(
    DQ_ACC, DQ, s_dqb, s_dqh, s_dqs, s_dqd, H, Sq, sm_scale,
    D: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr,
):
    # Grid: (row groups of ROWS, B*H). dq = scale · buffer, cast to dq's dtype, written with its strides.
    b, h, offs_m, offs_d = row_program(H, ROWS, D_PAD)
    ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    acc = tl.load(DQ_ACC + ((b * H + h) * Sq + offs_m[:, None]) * D_PAD + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqs + offs_d[None, :] * s_dqd,
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=SHAPE_ARGS_M)
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    KV_COUNT, KV_INDEX, ROW_ORDER, K_VALID, Q_VALID, Q_SHIFT, KEY_BIAS,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    s_dqb, s_dqh, s_dqs, s_dqd,
    s_cnt_b, s_cnt_h, s_idx_b, s_idx_h, s_idx_m, s_ord_b, s_ord_h, s_val_b, s_qv_b, s_sh_b, s_kb_b,
    H, Sq, Sk, sm_scale, qk_scale, win_lo, win_hi,
    D: tl.constexpr, D_PAD: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, WINDOW: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (query sub-tiles in row_order rank, B*H); one program = BLOCK_M query rows (as the forward).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    SUB_N: tl.constexpr = K_BLOCK // BLOCK_N

    q_blk, count, idx_ptr, offs_m, n_rows = query_tile(
        tile, b, h, ROW_ORDER, KV_COUNT, KV_INDEX, Q_VALID, s_ord_b, s_ord_h, s_cnt_b, s_cnt_h,
        s_idx_b, s_idx_h, s_idx_m, s_qv_b, Q_BLOCK, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < n_rows
    q_pos = offs_m
    pos_lo = 0
    pos_hi = 0
    if WINDOW:
        q_pos = offs_m + tl.load(Q_SHIFT + b * s_sh_b + q_blk)
        pos_lo = tl.min(q_pos, 0)
        pos_hi = tl.max(q_pos, 0)
    valid_ptr = K_VALID + b * s_val_b
    kb_base = KEY_BIAS
    if HAS_KEY_BIAS:
        kb_base = KEY_BIAS + b * s_kb_b
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    ld_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=ld_ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=ld_ok, other=0.0)
    row_base = bh.to(tl.int64) * Sq
    lse2 = tl.load(LSE + row_base + offs_m) * C_LOG2E
    lse2 = tl.where((lse2 == float("-inf")) | (~row_ok), float("inf"), lse2)   # keyless / padded rows → p = 0
    delta = tl.load(DELTA + row_base + offs_m)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, D], strides=[sks, 1], block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, D], strides=[svs, 1], block_shape=[BLOCK_N, D])

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for it in range(0, count * SUB_N):
        k_blk = tl.load(idx_ptr + it // SUB_N)
        rem = tl.load(valid_ptr + k_blk) - (it % SUB_N) * BLOCK_N
        row0 = k_blk * K_BLOCK + (it % SUB_N) * BLOCK_N
        if USE_TMA:
            kt = tl.trans(k_desc.load([row0, 0]))
            vt = tl.trans(v_desc.load([row0, 0]))
        else:
            rows = row0 + offs_n
            kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
            vt = tl.load(v_base + rows[None, :] * svs + offs_d[:, None] * svd, mask=d_ok[:, None], other=0.0)
        off = 0.0
        if WINDOW:                                  # not wholly inside the window: left to the last loop
            off = _off_unless_inside(pos_lo, row0, row0 + BLOCK_N - 1, win_lo, win_hi, BLOCK_M)
        sc = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale          # scaled log2 scores [M, N]
        if HAS_KEY_BIAS:
            sc = sc + key_bias_log2(kb_base, row0, offs_n, HAS_KEY_BIAS)[None, :]
        p = tl.exp2(sc - (lse2 + off)[:, None])
        if rem < BLOCK_N:
            p = tl.where((offs_n < rem)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)

    if WINDOW:   # the key sub-tiles crossing the window's edge, masked score by score; kept blocks are
                 # screened 64 at a time as whole blocks (only a block crossing the edge has such a sub-tile)
        offs_c = tl.arange(0, 64)
        for c in range(0, count, 64):
            in_row = c + offs_c < count
            blk = tl.load(idx_ptr + c + offs_c, mask=in_row, other=0)
            b_in, b_some = window_sides(pos_lo, pos_hi, blk * K_BLOCK, blk * K_BLOCK + K_BLOCK - 1, win_lo, win_hi)
            todo = in_row & b_some & (b_in == 0)
            for r in range(0, tl.sum(todo.to(tl.int32))):
                pos = tl.min(tl.where(todo, offs_c, 64))
                todo = todo & (offs_c != pos)
                k_blk = tl.load(idx_ptr + c + pos)
                kv1 = tl.load(valid_ptr + k_blk)
                for sub in range(0, SUB_N):
                    rem = kv1 - sub * BLOCK_N
                    row0 = k_blk * K_BLOCK + sub * BLOCK_N
                    inside, some = window_sides(pos_lo, pos_hi, row0, row0 + BLOCK_N - 1, win_lo, win_hi)
                    if some & (inside == 0) & (rem > 0):
                        rows = row0 + offs_n
                        kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
                        vt = tl.load(v_base + rows[None, :] * svs + offs_d[:, None] * svd, mask=d_ok[:, None], other=0.0)
                        sc = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
                        if HAS_KEY_BIAS:
                            sc = sc + key_bias_log2(kb_base, row0, offs_n, HAS_KEY_BIAS)[None, :]
                        p = tl.exp2(sc - lse2[:, None])
                        d = rows[None, :] - q_pos[:, None]
                        p = tl.where((d >= win_lo) & (d <= win_hi) & (offs_n < rem)[None, :], p, 0.0)
                        dp = tl.dot(do, vt, input_precision=DOT_PREC)
                        ds = p * (dp - delta[:, None])
                        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqs + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=d_ok[None, :])


def gluon_backward_usable(q, k, v, plan, options: dict, deterministic: bool = False) -> bool:
    """Whether the single-pass backward runs the Gluon kernel (`gluon_bwd`, Hopper): option ``gluon`` and
    a call it supports (`gluon_bwd.sparse_backward_unsupported`: sm90 with Gluon, bf16 / fp16, D=128,
    q / k / v of one shape, blocks multiples of 128 covering the sequence, no window, no key bias).
    The one place that decides, for both modes (``deterministic=True``: dQ in fixed point, which sums
    at most `gluon_bwd.FIXED_MAX_TERMS` key tiles per row; longer sequences take the two passes)."""
    if not options.get("gluon", True):
        return False
    from . import gluon_bwd

    if deterministic and k.shape[2] > gluon_bwd.FIXED_MAX_TERMS * gluon_bwd.BLOCK_N:
        return False

    return gluon_bwd.sparse_backward_unsupported(q, k, v, plan) is None


def attention_backward(q, k, v, out, lse, dout, plan, scale: float, options: dict, deterministic: bool = False,
                       dlse=None):
    """dq, dk, dv (each like its input) of `attention_forward`'s ``out`` given ``dout`` (any strides)
    and, optionally, the gradient ``dlse [B, H, Sq]`` of its lse.

    ``options``: resolved kernel options. ``deterministic``: bit-reproducible — two passes without atomics,
    or on Hopper (Gluon) the single pass with dQ in fixed point — instead of the single pass with
    a float32 dQ buffer.

    With ``L = <dout, out> + <dlse, lse>``: ``dL/ds_ij = p_ij (dp_ij − delta_i) + p_ij dlse_i``, so the
    lse gradient only shifts the row term: ``delta_i ← delta_i − dlse_i``.
    """
    pc.wait()                                   # background compiles of these kernels, if any, first
    if gluon_backward_usable(q, k, v, plan, options, deterministic):
        from .gluon_bwd import gluon_sparse_backward

        # deterministic: dQ in fixed point (integer additions in any order give the same bits)
        return gluon_sparse_backward(q, k, v, out, lse, dout, plan, scale, dlse=dlse, launch=pc.launch,
                                     stages=options["gluon_bwd_stages"], overlap=options["gluon_bwd_overlap"],
                                     dq_fixed=deterministic, compile_only=pc.compiling_only())
    B, H, Sq, D = q.shape
    d_pad = max(16, triton.next_power_of_2(D))
    table = "large_d" if d_pad > 128 else "small_d"
    prec = dot_precision(q.dtype)
    delta = pc.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    pc.launch(
        _delta_kernel, (triton.cdiv(Sq, _ROWS), B * H),
        out, dout, delta, *out.stride(), *dout.stride(), H, Sq, D=D, D_PAD=d_pad, ROWS=_ROWS,
    )
    if dlse is not None:
        delta.sub_(dlse)
    dq, dk, dv = pc.empty_like(q), pc.empty_like(k), pc.empty_like(v)
    val_b = plan.k_valid.expand(B, -1).stride(0)
    qv_b = plan.q_valid.expand(B, -1).stride(0)
    sh_b = plan.window_shift.expand(B, -1).stride(0)
    common = dict(D=D, D_PAD=d_pad, Q_BLOCK=plan.q_block, K_BLOCK=plan.k_block, DOT_PREC=prec)
    tune = dict(q_block=plan.q_block, k_block=plan.k_block, dtype=q.dtype, head_dim=D, device=q.device,
                autotune=options["autotune"])
    Sk = k.shape[2]
    io_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    # Q / dO through tensor descriptors: the two-pass dK/dV kernel gains from them; the single pass
    # measured faster with pointer loads (H200, 720p SSTA: 186 vs 241 ms), unless dQ is reduced by TMA
    use_tma_q = tma_usable(D, q, dout, enabled=options["tma"] and (deterministic or options["dq_reduce"] == "tma"))
    skip = options["skip_padded_queries"]
    window = plan.has_window
    kb, kb_b, has_kb = key_bias_args(plan, B)
    tag = (".window" if window else "") + (".kbias" if has_kb else "")
    lo, hi = plan.window_bounds()

    if deterministic:
        dq_mode, dq_acc = 0, dk                          # DQ_ACC unused
        kernel = tuned_kernel("dkdv", _dkdv_kernel, DKDV_CONFIGS[table], variant=f"tma{use_tma_q:d}.skip{skip:d}" + tag,
                              tune_key=("D_PAD", "USE_TMA", "DQ_MODE", "SKIP_PAD_Q"), **tune)
    else:
        dq_mode = 2 if (options["dq_reduce"] == "tma" and use_tma_q) else 1
        dq_acc = pc.zeros(B * H, Sq, d_pad, device=q.device, dtype=torch.float32)
        kernel = tuned_kernel("bwd1", _dkdv_kernel, ONE_PASS_CONFIGS[table],
                              variant=f"tma{use_tma_q:d}.dq{'tma' if dq_mode == 2 else 'atomic'}.skip{skip:d}" + tag,
                              tune_key=("D_PAD", "USE_TMA", "DQ_MODE", "SKIP_PAD_Q"), reset_to_zero=["DQ_ACC"], **tune)

    cs, ix, co = plan_strides(plan.q_count, B, H), plan_strides(plan.q_index, B, H), plan_strides(plan.col_order, B, H)
    pc.launch(
        kernel, lambda meta: (plan.num_k_blocks * (plan.k_block // meta["BLOCK_N"]), B * H),
        q, k, v, dout, lse, delta, dk, dv, dq_acc,
        plan.q_count, plan.q_index, plan.col_order, plan.k_valid, plan.q_valid, plan.window_shift, kb,
        *io_strides, *dk.stride(), *dv.stride(),
        cs[0], cs[1], ix[0], ix[1], ix[2], co[0], co[1], val_b, qv_b, sh_b, kb_b,
        H, Sq, Sk, scale, scale * LOG2E, lo, hi, USE_TMA=use_tma_q, DQ_MODE=dq_mode,
        SKIP_PAD_Q=skip, WINDOW=window, HAS_KEY_BIAS=has_kb, **common,
    )

    if not deterministic:
        pc.launch(
            _dq_convert_kernel, (triton.cdiv(Sq, _ROWS), B * H),
            dq_acc, dq, *dq.stride(), H, Sq, scale, D=D, D_PAD=d_pad, ROWS=_ROWS,
        )
        return dq, dk, dv

    use_tma_k = tma_usable(D, k, v, enabled=options["tma"])
    cs, ix, ro = plan_strides(plan.kv_count, B, H), plan_strides(plan.kv_index, B, H), plan_strides(plan.row_order, B, H)
    pc.launch(
        tuned_kernel("dq", _dq_kernel, DQ_CONFIGS[table], variant=f"tma{use_tma_k:d}" + tag,
                     tune_key=("D_PAD", "USE_TMA"), **tune),
        lambda meta: (plan.num_q_blocks * (plan.q_block // meta["BLOCK_M"]), B * H),
        q, k, v, dout, lse, delta, dq,
        plan.kv_count, plan.kv_index, plan.row_order, plan.k_valid, plan.q_valid, plan.window_shift, kb,
        *io_strides, *dq.stride(),
        cs[0], cs[1], ix[0], ix[1], ix[2], ro[0], ro[1], val_b, qv_b, sh_b, kb_b,
        H, Sq, Sk, scale, scale * LOG2E, lo, hi, USE_TMA=use_tma_k, WINDOW=window, HAS_KEY_BIAS=has_kb, **common,
    )
    return dq, dk, dv

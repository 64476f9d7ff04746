"""Triton forward kernel of block-sparse attention over a `BlockSparsePlan`.

One program owns ``BLOCK_M`` query rows (a sub-tile of one query block) of one (batch, head). It
walks only the kept key blocks listed in ``kv_index`` and treats each as ``K_BLOCK // BLOCK_N``
contiguous sub-tiles in one flat, branch-free loop (so the software pipeline runs across blocks). A
ragged sub-tile (``k_valid`` ends inside it) is switched off there by a per-row +inf offset and run
masked in a second, short loop. Softmax is online in base 2 with the scale folded into one multiply,
and lazy: the reference max (and the accumulator rescale) moves only when a row's max grows by more
than 8. Kernel options ``fwd_peel=False`` / ``fwd_lazy=False`` give back the v3 loop (ragged tail
masked behind a per-sub-tile branch) / eager rescaling. Rows that see no key write 0 and lse = -inf.

Token windows (causal, sliding): sub-tiles wholly inside the window run in the main loop without a
per-score test; the others are switched off there like ragged ones, and those crossing the window's
edge run masked in a last walk (a causal mask's diagonal) that screens whole kept blocks first, so a
block with nothing to mask costs one test there, not a second pass over its sub-tiles.

Padding-free queries: a sub-tile whose rows all lie at or past ``q_valid`` skips the key loop and
only stores out 0 / lse -inf; in a partly valid sub-tile the padded rows load q as 0 and are stored
as 0 / -inf.

Key bias (``plan.key_bias``, a ``HAS_KEY_BIAS`` variant; without one the kernel is the same as before
it existed): each loop adds its sub-tile's bias, in log2 units, to the scaled scores before the max.

Grid: ``(Mq * Q_BLOCK // BLOCK_M, B*H)``: query tiles fastest, in ``row_order`` rank (heaviest query
blocks first), one head after another, so the programs running together share one head's K/V in L2.
On Hopper (sm90+), K and V are read through tensor descriptors (TMA) when the strides allow;
elsewhere (Ampere/Ada, odd strides, padded head dims, the interpreter, ``tma=False``) through
pointers. Warp specialisation of the key loop (``warp_specialize=True``, D=128 with TMA) is opt-in:
it gained nothing on the v3 loop, and Triton 3.6 compiles it on the peeled loop only with 8 warps
(its own config list).

On Hopper the forward runs the Gluon kernel instead (`gluon_fwd.gluon_sparse_forward`, kernel option
``gluon``, default True) wherever it supports the call (`gluon_usable`); the same outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import precompile as pc
from .triton_common import (SHAPE_ARGS_M, C_LN2, LOG2E, dot_precision, key_bias_args, key_bias_log2, plan_strides,
                            query_tile, tma_usable, window_sides)
from .tuning import tuned_kernel

__all__ = ["attention_forward", "gluon_usable", "FWD_CONFIGS"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages); block sizes are reduced to divisors of the plan's blocks.
FWD_CONFIGS = {
    "small_d": [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (64, 128, 4, 3), (128, 64, 8, 4)],
    "large_d": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)],
    "ws": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)],   # warp specialisation: 8 warps only
}


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, qk_scale, skip, kb, LAZY: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """One online-softmax step (base 2) over unscaled scores ``s [BM, BN]`` and values ``v [BN, D]``.

    ``skip`` is 0 or +inf (a scalar): +inf makes the whole tile contribute nothing. ``kb [BN]`` (with
    ``HAS_KEY_BIAS``): the keys' score bias in log2 units, added to the scaled scores. With ``LAZY`` the
    reference max ``m_i`` only moves (and ``acc``/``l_i`` are only rescaled) when some row's max grows
    by more than 8 (a factor 256), so probabilities stay ≤ 256; the result is exact because the final
    normalisation uses the same reference max.
    """
    if HAS_KEY_BIAS:    # scaled log2 scores plus the bias; they need no further scaling below
        s = s * qk_scale + kb[None, :]
        qk_scale = 1.0
    if LAZY:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale - skip)
        if tl.max(m_new - m_i, 0) > 8.0:
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(s * qk_scale - (m_i + skip)[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        return m_i, l_i, acc
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale - skip)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)               # rows with no key yet
    p = tl.exp2(s * qk_scale - (m_use + skip)[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=SHAPE_ARGS_M)
def _fwd_kernel(
    Q, K, V, O, LSE,
    KV_COUNT, KV_INDEX, ROW_ORDER, K_VALID, Q_VALID, Q_SHIFT, KEY_BIAS,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    s_cnt_b, s_cnt_h, s_idx_b, s_idx_h, s_idx_m, s_ord_b, s_ord_h, s_val_b, s_qv_b, s_sh_b, s_kb_b,
    H, Sq, Sk, qk_scale, win_lo, win_hi,
    D: tl.constexpr, D_PAD: tl.constexpr, Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, USE_WS: tl.constexpr, PEEL: tl.constexpr, LAZY: tl.constexpr,
    WINDOW: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (query sub-tiles of all query blocks in row_order rank, B*H); one program = BLOCK_M rows.
    # WINDOW: key j is seen from row i only if win_lo <= j - (i + shift) <= win_hi (shift = Q_SHIFT of
    # the row's block). The main loop runs only the sub-tiles wholly inside the window (no per-score
    # test); the others are switched off there (+inf offset) and those crossing its edge run masked in
    # a last loop. Sub-tiles wholly outside it contribute nothing.
    # HAS_KEY_BIAS: every score gets its key's bias (plan.key_bias, loaded per sub-tile in every loop).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    SUB_N: tl.constexpr = K_BLOCK // BLOCK_N

    q_blk, count, idx_ptr, offs_m, n_rows = query_tile(
        tile, b, h, ROW_ORDER, KV_COUNT, KV_INDEX, Q_VALID, s_ord_b, s_ord_h, s_cnt_b, s_cnt_h,
        s_idx_b, s_idx_h, s_idx_m, s_qv_b, Q_BLOCK, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < n_rows                           # padded query rows: q = 0, out 0
    q_pos = offs_m
    pos_lo = 0
    pos_hi = 0
    if WINDOW:
        q_pos = offs_m + tl.load(Q_SHIFT + b * s_sh_b + q_blk)
        pos_lo = tl.min(q_pos, 0)                                       # the rows' window positions
        pos_hi = tl.max(q_pos, 0)
    valid_ptr = K_VALID + b * s_val_b
    kb_base = KEY_BIAS
    if HAS_KEY_BIAS:
        kb_base = KEY_BIAS + b * s_kb_b
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D

    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, D], strides=[sks, 1], block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, D], strides=[svs, 1], block_shape=[BLOCK_N, D])

    if LAZY:   # a finite floor, so that "the max grew by more than the threshold" is defined from the start
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for it in tl.range(0, count * SUB_N, warp_specialize=USE_WS):
        k_blk = tl.load(idx_ptr + it // SUB_N)
        rem = tl.load(valid_ptr + k_blk) - (it % SUB_N) * BLOCK_N      # valid keys left in this sub-tile
        row0 = k_blk * K_BLOCK + (it % SUB_N) * BLOCK_N
        if USE_TMA:
            kt = tl.trans(k_desc.load([row0, 0]))
            v = v_desc.load([row0, 0])
        else:
            rows = row0 + offs_n
            kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + rows[:, None] * svs + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC)                    # unscaled: scale folds into one FMA
        if PEEL:                                                        # ragged sub-tiles: whole tile off here
            skip = tl.where(rem < BLOCK_N, float("inf"), 0.0)
        else:
            skip = 0.0
            if rem < BLOCK_N:                                           # ragged tail only
                s = tl.where((offs_n < rem)[None, :], s, float("-inf"))
        if WINDOW:                                                      # not wholly inside: off here
            inside, _ = window_sides(pos_lo, pos_hi, row0, row0 + BLOCK_N - 1, win_lo, win_hi)
            skip = skip + tl.where(inside, 0.0, float("inf"))
        kb = key_bias_log2(kb_base, row0, offs_n, HAS_KEY_BIAS)
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, qk_scale, skip, kb, LAZY, HAS_KEY_BIAS, DOT_PREC)

    if PEEL and not WINDOW:   # the ragged sub-tiles skipped above, masked, found 64 kept blocks at a time
        offs_c = tl.arange(0, 64)
        for c in range(0, count, 64):
            in_row = c + offs_c < count
            blk = tl.load(idx_ptr + c + offs_c, mask=in_row, other=0)
            kv = tl.load(valid_ptr + blk, mask=in_row, other=K_BLOCK)
            ragged = in_row & (kv < K_BLOCK) & (kv % BLOCK_N != 0)
            for r in range(0, tl.sum(ragged.to(tl.int32))):
                pos = tl.min(tl.where(ragged, offs_c, 64))
                ragged = ragged & (offs_c != pos)
                k_blk = tl.load(idx_ptr + c + pos)
                kv1 = tl.load(valid_ptr + k_blk)
                row0 = k_blk * K_BLOCK + (kv1 // BLOCK_N) * BLOCK_N
                rows = row0 + offs_n
                kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_base + rows[:, None] * svs + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
                s = tl.dot(q, kt, input_precision=DOT_PREC)
                s = tl.where((offs_n < kv1 % BLOCK_N)[None, :], s, float("-inf"))
                kb = key_bias_log2(kb_base, row0, offs_n, HAS_KEY_BIAS)
                m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, qk_scale, 0.0, kb, LAZY, HAS_KEY_BIAS, DOT_PREC)

    if WINDOW:
        # The sub-tiles switched off above that have a key in the window, masked: those crossing its edge
        # and (peeled loop) the ragged ones. Kept blocks are screened whole first (a block wholly inside
        # the window or wholly outside it has no crossing sub-tile), so only the few blocks that have
        # such a sub-tile (a causal mask's diagonal) are walked sub-tile by sub-tile.
        for j in range(0, count):
            k_blk = tl.load(idx_ptr + j)
            kv1 = tl.load(valid_ptr + k_blk)
            b_in, b_some = window_sides(pos_lo, pos_hi, k_blk * K_BLOCK, k_blk * K_BLOCK + K_BLOCK - 1, win_lo, win_hi)
            todo = b_in == 0
            if PEEL:
                todo = todo | ((kv1 < K_BLOCK) & (kv1 % BLOCK_N != 0))
            if todo & b_some & (kv1 > 0):
                for sub in range(0, SUB_N):
                    rem = kv1 - sub * BLOCK_N
                    row0 = k_blk * K_BLOCK + sub * BLOCK_N
                    inside, some = window_sides(pos_lo, pos_hi, row0, row0 + BLOCK_N - 1, win_lo, win_hi)
                    todo_s = inside == 0                                # crossing the edge
                    if PEEL:
                        todo_s = todo_s | (rem < BLOCK_N)               # or ragged
                    if todo_s & some & (rem > 0):
                        rows = row0 + offs_n
                        kt = tl.load(k_base + rows[None, :] * sks + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
                        v = tl.load(v_base + rows[:, None] * svs + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
                        s = tl.dot(q, kt, input_precision=DOT_PREC)
                        d = rows[None, :] - q_pos[:, None]
                        s = tl.where((d >= win_lo) & (d <= win_hi) & (offs_n < rem)[None, :], s, float("-inf"))
                        kb = key_bias_log2(kb_base, row0, offs_n, HAS_KEY_BIAS)
                        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, qk_scale, 0.0, kb, LAZY, HAS_KEY_BIAS,
                                                      DOT_PREC)

    # out = acc / l; lse = ln(l) + m·ln2 (m is in log2 units). No key, or a padded row: 0 and -inf.
    empty = (l_i == 0.0) | (~row_ok)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * C_LN2)
    o_base = O + b * sob + h * soh
    tl.store(o_base + offs_m[:, None] * sos + offs_d[None, :] * sod, out.to(O.dtype.element_ty), mask=d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse)


def gluon_usable(q, k, v, plan, options: dict) -> bool:
    """Whether this forward runs the Gluon kernel: option ``gluon`` and a call it supports
    (`gluon_fwd.sparse_unsupported`: sm90 with Gluon, bf16/fp16, D 64/128, blocks multiples of 128, no
    window, no key bias, TMA-describable strides). The one place that decides."""
    if not options.get("gluon", True):
        return False
    from . import gluon_fwd

    return gluon_fwd.sparse_unsupported(q, k, v, plan) is None


def attention_forward(q, k, v, plan, scale: float, options: dict):
    """Run the forward kernel. q ``[B,H,Sq,D]``, k/v ``[B,H,Sk,D]`` (any strides, checked by the caller);
    ``options``: resolved kernel options (`triton_common.resolve_kernel_options`).

    Returns ``out`` (q's dtype and strides where dense, else contiguous) and ``lse [B,H,Sq]`` float32.
    """
    if gluon_usable(q, k, v, plan, options):
        from .gluon_fwd import gluon_sparse_forward

        return gluon_sparse_forward(q, k, v, plan, scale, launch=pc.launch, empty_like=pc.empty_like, empty=pc.empty,
                                    stages=options["gluon_fwd_stages"])
    B, H, Sq, D = q.shape
    out = pc.empty_like(q)
    lse = pc.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    d_pad = max(16, triton.next_power_of_2(D))
    cs, ix, ro = plan_strides(plan.kv_count, B, H), plan_strides(plan.kv_index, B, H), plan_strides(plan.row_order, B, H)
    val_b = plan.k_valid.expand(B, -1).stride(0)
    qv_b = plan.q_valid.expand(B, -1).stride(0)
    sh_b = plan.window_shift.expand(B, -1).stride(0)
    use_tma = tma_usable(D, k, v, enabled=options["tma"])
    use_ws = use_tma and D == 128 and options["warp_specialize"]
    peel, lazy = options["fwd_peel"], options["fwd_lazy"]
    window = plan.has_window
    kb, kb_b, has_kb = key_bias_args(plan, B)
    rows = FWD_CONFIGS["ws" if use_ws else "large_d" if d_pad > 128 else "small_d"]
    variant = f"tma{use_tma:d}.ws{use_ws:d}.peel{peel:d}.lazy{lazy:d}" + (".window" if window else "")
    kernel = tuned_kernel(
        "fwd", _fwd_kernel, rows, q_block=plan.q_block, k_block=plan.k_block, dtype=q.dtype, head_dim=D,
        device=q.device, variant=variant + (".kbias" if has_kb else ""),
        autotune=options["autotune"], tune_key=("D_PAD", "USE_TMA", "USE_WS", "PEEL", "LAZY"))

    def grid(meta):
        return (plan.num_q_blocks * (plan.q_block // meta["BLOCK_M"]), B * H)

    pc.launch(
        kernel, grid, q, k, v, out, lse,
        plan.kv_count, plan.kv_index, plan.row_order, plan.k_valid, plan.q_valid, plan.window_shift, kb,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        cs[0], cs[1], ix[0], ix[1], ix[2], ro[0], ro[1], val_b, qv_b, sh_b, kb_b,
        H, Sq, k.shape[2], scale * LOG2E, *plan.window_bounds(),
        D=D, D_PAD=d_pad, Q_BLOCK=plan.q_block, K_BLOCK=plan.k_block, DOT_PREC=dot_precision(q.dtype),
        USE_TMA=use_tma, USE_WS=use_ws, PEEL=peel, LAZY=lazy, WINDOW=window, HAS_KEY_BIAS=has_kb,
    )
    return out, lse

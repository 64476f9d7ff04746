"""Block-sparse attention forward for Hopper (sm90) written in Gluon: the Triton backend's forward on
Hopper (`triton_fwd.gluon_usable` decides; `gluon_sparse_forward` is its entry).

FA3's layout of work: one program owns ``BLOCK_M = 128`` query rows of one (batch, head), in three
partitions (`gl.warp_specialize`): a producer warpgroup (24 registers, one thread issuing) TMA-loads
the Q tile once, then walks the query block's kept key blocks (``plan.kv_index[:kv_count]``) in
128-row sub-tiles up to each block's ``k_valid``, loading K and V into separate rings of ``STAGES``
slots with "full" and "empty" mbarriers (so QKᵀ can start before V has landed, and a K slot is
refilled as soon as both consumers' QKᵀ that read it retired); two consumer warpgroups (240
registers) own 64 query rows each and walk the same sequence of sub-tiles. In a consumer, QKᵀ of
sub-tile ``n`` (Q and K from shared memory) and PV of sub-tile ``n-1`` (P from registers) are issued
back to back and the softmax of ``n`` runs while PV of ``n-1`` is on the tensor cores (FA3's
intra-warpgroup overlap; `tile_loop_reference` is the same order of operations in torch). Softmax is
online in base 2 with the scale folded into the exp2 argument; ``lse`` is natural log, ``[B, H, Sq]``
float32, as the Triton forward's. Grid ``(Nq * Q_BLOCK // 128, B*H)``: query tiles fastest in
``row_order`` rank, as the Triton forward.

Dense prototypes of this kernel (one 8-warp partition issuing its own loads: 533 TFLOP/s dense at
S=32,640 on an H200; this layout: 635; with the consumers taking turns at the tensor cores: 626) were
measured and dropped (benchmarks/NOTES.md, "Gluon sm90 forward: prototype"); a dense plan runs here.
Importing this module never fails: without Gluon `HAS_GLUON` is False and the entry raises.
"""
from __future__ import annotations

import torch

from .gluon_common import HAS_GLUON, hopper_unsupported, plan_unsupported

if HAS_GLUON:
    from .gluon_common import (TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, tma, tma_load,
                               tma_store, warpgroup_mma, warpgroup_mma_wait)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

__all__ = ["HAS_GLUON", "gluon_sparse_forward", "sparse_unsupported", "tma_rows", "tile_loop_reference"]



if HAS_GLUON:

    C_LN2 = gl.constexpr(LN2)

    # ----------------------------------------------------------------------------------------------
    # Block-sparse "ws": the producer walks a query block's kept key blocks (plan.kv_index), in
    # 128-row sub-tiles up to each block's k_valid; the consumers walk the same sequence
    # ----------------------------------------------------------------------------------------------

    @gluon.jit
    def _sub_tiles(kv, BLOCK_N: gl.constexpr):
        """Sub-tiles walked in a kept key block with ``kv`` valid keys: ``ceil(kv / BLOCK_N)``, at least
        one (a block with no valid key runs one sub-tile masked whole, so that its place in the
        sequence needs no test)."""
        return gl.maximum(gl.cdiv(kv, BLOCK_N), 1)

    @gluon.jit
    def _sparse_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty,
                         v_empty, q_row, q_col, k_row0, k_col, v_row0, v_col, count, idx_ptr, valid_ptr,
                         K_BLOCK: gl.constexpr, BLOCK_MC: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr):
        """Loads both consumers' Q halves (only when there is a key block to walk), then K and V of
        every sub-tile of every kept key block, in order, into the ring (a slot is rewritten only once
        both consumers released it)."""
        has_keys = count > 0
        for c in gl.static_range(2):
            mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes, pred=has_keys)
            tma_load(q_desc, [q_row + c * BLOCK_MC, q_col], q_bars.index(c), q_smem.index(c), pred=has_keys)
        n = 0
        for j in range(count):
            k_blk = gl.load(idx_ptr + j)
            kv = gl.load(valid_ptr + k_blk)
            for sub in range(_sub_tiles(kv, BLOCK_N)):
                stage = n % STAGES
                free_phase = ((n // STAGES) & 1) ^ 1
                off = k_blk * K_BLOCK + sub * BLOCK_N
                mbarrier.wait(k_empty.index(stage), free_phase)
                mbarrier.expect(k_full.index(stage), k_desc.block_type.nbytes)
                tma_load(k_desc, [k_row0 + off, k_col], k_full.index(stage), k_smem.index(stage))
                mbarrier.wait(v_empty.index(stage), free_phase)
                mbarrier.expect(v_full.index(stage), v_desc.block_type.nbytes)
                tma_load(v_desc, [v_row0 + off, v_col], v_full.index(stage), v_smem.index(stage))
                n += 1

    @gluon.jit
    def _sparse_softmax(s, m_i, l_i, rem, qk_scale, p_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                        s_layout: gl.constexpr, dtype: gl.constexpr):
        """One online-softmax step over the scores of a sub-tile with ``rem`` valid keys (columns
        ``>= rem`` masked to -inf, whatever the excluded keys hold). ``m_i`` starts at a finite floor
        (-1e30), so a row with no valid key yet keeps p = 0 and alpha finite without a test."""
        if rem < BLOCK_N:
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where((cols < rem)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        return m_new, l_i, alpha, p_op

    @gluon.jit
    def _sparse_next(j, sub, kv, count, idx_ptr, valid_ptr, BLOCK_N: gl.constexpr):
        """The cursor ``(kept block j, sub-tile sub, its block's k_valid kv)`` moved to the next sub-tile
        (``j == count`` past the end), branch-free."""
        sub = sub + 1
        done = sub >= _sub_tiles(kv, BLOCK_N)
        j = gl.where(done, j + 1, j)
        sub = gl.where(done, 0, sub)
        kv_next = gl.load(valid_ptr + gl.load(idx_ptr + gl.minimum(j, count - 1)))
        kv = gl.where(done, kv_next, kv)
        return j, sub, kv

    @gluon.jit
    def _sparse_consumer(c: gl.constexpr, o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_full, v_full,
                         k_empty, v_empty, o_row, o_col, lse_row, n_rows, count, idx_ptr, valid_ptr, qk_scale,
                         BLOCK_MC: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
        """Consumer warpgroup ``c`` (query rows ``c·BLOCK_MC ...`` of the tile): the pipelined loop of
        ``"ws"`` (QKᵀ of sub-tile n, then PV of n-1, softmax of n under PV) over the producer's
        sequence of sub-tiles, masking ragged ones. Rows past ``n_rows`` (padding) and rows that saw
        no key store out 0 and lse -inf."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        srow_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = v_smem.dtype
        q_c = q_smem.index(c)
        acc = gl.zeros([BLOCK_MC, D], gl.float32, o_layout)
        m_i = gl.full([BLOCK_MC], -1.0e30, gl.float32, srow_layout)
        l_i = gl.zeros([BLOCK_MC], gl.float32, srow_layout)

        if count > 0:
            s_zero = gl.zeros([BLOCK_MC, BLOCK_N], gl.float32, s_layout)
            j = 0
            sub = 0
            kv = gl.load(valid_ptr + gl.load(idx_ptr))
            # sub-tile 0: QKᵀ alone
            mbarrier.wait(q_bars.index(c), 0)
            mbarrier.wait(k_full.index(0), 0)
            s = warpgroup_mma(q_c, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            mbarrier.arrive(k_empty.index(0), count=1)
            m_i, l_i, alpha, p_op = _sparse_softmax(s, m_i, l_i, kv, qk_scale, p_layout, BLOCK_N, s_layout, dtype)
            j, sub, kv = _sparse_next(j, sub, kv, count, idx_ptr, valid_ptr, BLOCK_N)
            n = 1
            while j < count:
                stage = n % STAGES
                prev = (n - 1) % STAGES
                rem = kv - sub * BLOCK_N
                mbarrier.wait(k_full.index(stage), (n // STAGES) & 1)
                s = warpgroup_mma(q_c, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_full.index(prev), ((n - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
                mbarrier.arrive(k_empty.index(stage), count=1)
                m_i, l_i, alpha, p_new = _sparse_softmax(s, m_i, l_i, rem, qk_scale, p_layout, BLOCK_N, s_layout,
                                                         dtype)
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
                p_op = p_new
                j, sub, kv = _sparse_next(j, sub, kv, count, idx_ptr, valid_ptr, BLOCK_N)
                n += 1
            last = (n - 1) % STAGES
            mbarrier.wait(v_full.index(last), ((n - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(v_empty.index(last), count=1)

        # out = acc / l (TMA store through this consumer's Q buffer), lse = (m + log2 l)·ln2; padded rows
        # and rows with no key: 0 and -inf
        l_o = gl.convert_layout(l_i, orow_layout)
        m_o = gl.convert_layout(m_i, orow_layout)
        offs = gl.arange(0, BLOCK_MC, layout=orow_layout)
        empty = (l_o == 0.0) | (offs >= n_rows - c * BLOCK_MC)
        l_safe = gl.where(empty, 1.0, l_o)
        out = gl.where(empty[:, None], 0.0, acc * (1.0 / l_safe)[:, None])
        q_c.store(out.to(o_desc.dtype))
        fence_async_shared()
        tma_store(o_desc, [o_row + c * BLOCK_MC, o_col], q_c)
        lse = gl.where(empty, float("-inf"), (m_o + gl.log2(l_safe)) * C_LN2)
        gl.store(LSE + lse_row + c * BLOCK_MC + offs, lse)
        tma.store_wait(pendings=0)

    @gluon.jit(do_not_specialize=["s_cnt_b", "s_cnt_h", "s_idx_b", "s_idx_h", "s_idx_m", "s_ord_b", "s_ord_h",
                                  "s_val_b", "s_qv_b", "H", "q_rb", "q_rh", "q_ch", "k_rb", "k_rh", "k_ch", "v_rb",
                                  "v_rh", "v_ch", "o_rb", "o_rh", "o_ch"])
    def _sparse_ws_kernel(q_desc, k_desc, v_desc, o_desc, LSE, KV_COUNT, KV_INDEX, ROW_ORDER, K_VALID, Q_VALID,
                          s_cnt_b, s_cnt_h, s_idx_b, s_idx_h, s_idx_m, s_ord_b, s_ord_h, s_val_b, s_qv_b,
                          H, Sq, qk_scale, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, v_rb, v_rh, v_ch, o_rb, o_rh, o_ch,
                          Q_BLOCK: gl.constexpr, K_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        # Grid (Mq * Q_BLOCK // BLOCK_M, B*H): tile -> query block of rank tile // SUB_M in row_order
        # (heaviest first), sub-tile tile % SUB_M, as the Triton forward (`triton_common.query_tile`).
        # Tensor (b, h, s, d) of q/k/v/out is element [b*rb + h*rh + s, h*ch + d] of its 2-D descriptor.
        gl.static_assert(num_warps == 4, "the default partition is consumer warpgroup 0")
        BLOCK_MC: gl.constexpr = BLOCK_M // 2
        SUB_M: gl.constexpr = Q_BLOCK // BLOCK_M
        tile = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        q_blk = gl.load(ROW_ORDER + b * s_ord_b + h * s_ord_h + tile // SUB_M)
        q_sub = tile % SUB_M
        n_rows = gl.load(Q_VALID + b * s_qv_b + q_blk) - q_sub * BLOCK_M
        count = gl.load(KV_COUNT + b * s_cnt_b + h * s_cnt_h + q_blk)
        count = gl.where(n_rows > 0, count, 0)                 # wholly padded tile: no key loop
        idx_ptr = KV_INDEX + b.to(gl.int64) * s_idx_b + h.to(gl.int64) * s_idx_h + q_blk.to(gl.int64) * s_idx_m
        valid_ptr = K_VALID + b * s_val_b
        row_in = q_blk * Q_BLOCK + q_sub * BLOCK_M             # first query row of the tile in its sequence
        q_row = b * q_rb + h * q_rh + row_in
        o_row = b * o_rb + h * o_rh + row_in
        lse_row = bh.to(gl.int64) * Sq + row_in

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_MC, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, D], v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(2):
            mbarrier.init(q_bars.index(c), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)     # one arrival per consumer warpgroup
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()

        gl.warp_specialize([
            (_sparse_consumer, (0, o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty,
                                o_row, h * o_ch, lse_row, n_rows, count, idx_ptr, valid_ptr, qk_scale,
                                BLOCK_MC, BLOCK_N, D, STAGES)),
            (_sparse_consumer, (1, o_desc, LSE, q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty,
                                o_row, h * o_ch, lse_row, n_rows, count, idx_ptr, valid_ptr, qk_scale,
                                BLOCK_MC, BLOCK_N, D, STAGES)),
            (_sparse_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty,
                                v_empty, q_row, h * q_ch, b * k_rb + h * k_rh, h * k_ch, b * v_rb + h * v_rh,
                                h * v_ch, count, idx_ptr, valid_ptr, K_BLOCK, BLOCK_MC, BLOCK_N, STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

_WS_REGS = (240, 24)   # setmaxnreg of the consumer warpgroups and of the producer partition
SPARSE_CONFIG = (128, 128, 2, 4)   # BLOCK_M (two consumers of 64 rows), BLOCK_N, STAGES, num_warps


def tma_rows(t: torch.Tensor):
    """How a ``[B, H, S, D]`` tensor reads as a 2-D TMA matrix: ``(rows, width, rb, rh, ch)`` with
    element ``(b, h, s, d)`` at ``[b*rb + h*rh + s, h*ch + d]`` of the ``[rows, width]`` matrix at
    ``t.data_ptr()`` (row stride ``width``, the stride of S), or None when no such view exists.

    Covers ``[B, H, S, D]`` contiguous (``rh = S``, ``ch = 0``), transposed ``[B, S, H, D]`` views
    (``rh = 0``, ``ch = D``; diffusers' processors) and slices of fused projections of either kind.
    """
    B, H, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    size = t.element_size()
    if sd != 1 or ss < D or (ss * size) % 16 or t.data_ptr() % 16:
        return None
    if B > 1 and sb % ss:
        return None
    rb = sb // ss if B > 1 else 0
    if H == 1:
        rh, ch = 0, 0
    elif sh % ss == 0:
        rh, ch = sh // ss, 0
    elif 0 < sh and (H - 1) * sh + D <= ss:
        rh, ch = 0, sh
    else:
        return None
    rows = (B - 1) * rb + (H - 1) * rh + S
    if rows >= 2 ** 31 or min(rb, rh, ch) < 0:
        return None
    return rows, ss, rb, rh, ch


def sparse_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> str | None:
    """Why the block-sparse Gluon forward cannot run this call (None: it can). What it runs: Hopper
    (sm90, compute capability 9.x) with Gluon, not under Triton's interpreter; bf16 / fp16; head dim
    64 or 128; plan blocks multiples of 128; no token window and no key bias; q, k, v readable as 2-D
    TMA matrices (`tma_rows`)."""
    why = hopper_unsupported(q, k, v)
    if why is not None:
        return why
    D = q.shape[-1]
    if D not in (64, 128) or k.shape[-1] != D or v.shape[-1] != D:
        return f"head dim {D} (64 or 128 only)"
    why = plan_unsupported(plan)
    if why is not None:
        return why
    for name, t in (("q", q), ("k", k), ("v", v)):
        if tma_rows(t) is None:
            return f"{name} strides {t.stride()} (no 2-D TMA view)"
    return None


def _matrix_desc(t: torch.Tensor, view, block_rows: int, layout):
    rows, width, *_ = view
    return TensorDescriptor(t, [rows, width], [width, 1], [block_rows, t.shape[-1]], layout)


def gluon_sparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, scale: float,
                         launch=None, empty_like=None, empty=None, stages: int | None = None):
    """Block-sparse attention forward over ``plan`` with the warp-specialised Gluon kernel (the
    ``"ws"`` schedule walking the plan's kept key blocks). Same contract as
    `triton_fwd.attention_forward`: q ``[B, H, Sq, D]``, k / v ``[B, H, Sk, D]`` (checked by the
    caller, and supported: `sparse_unsupported`); returns ``out`` (q's dtype, q's strides where
    dense) and ``lse [B, H, Sq]`` float32 (natural log); rows that see no key and rows past
    ``plan.q_valid`` get out 0 and lse -inf. Keys past ``k_valid`` are masked from the scores (any
    value there is ignored) but, as in the Triton forward, their V rows must be finite (a zero
    probability times inf / NaN is NaN).

    ``launch`` / ``empty_like`` / ``empty``: `precompile.launch` and its allocators (the defaults:
    launch, ``torch.empty_like``, ``torch.empty``), so that a compile-only run compiles this kernel.
    ``stages``: slots of the K and V rings (default `SPARSE_CONFIG`'s).
    """
    if not HAS_GLUON:
        raise RuntimeError("gluon_sparse_forward needs Triton with Gluon (triton.experimental.gluon)")
    launch = launch or (lambda kernel, grid, *a, **kw: kernel[grid](*a, **kw))
    empty_like = empty_like or torch.empty_like
    empty = empty or torch.empty
    B, H, Sq, D = q.shape
    block_m, block_n, default_stages, num_warps = SPARSE_CONFIG
    stages = default_stages if stages is None else int(stages)
    out = empty_like(q)
    o_view = tma_rows(out)
    if o_view is None:     # q not dense: out contiguous
        out = empty(B, H, Sq, D, device=q.device, dtype=q.dtype)
        o_view = tma_rows(out)
    lse = empty(B, H, Sq, device=q.device, dtype=torch.float32)
    views = [tma_rows(t) for t in (q, k, v)]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m // 2, D], gdt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, D], gdt)
    q_d = _matrix_desc(q, views[0], block_m // 2, q_layout)
    k_d = _matrix_desc(k, views[1], block_n, kv_layout)
    v_d = _matrix_desc(v, views[2], block_n, kv_layout)
    o_d = _matrix_desc(out, o_view, block_m // 2, q_layout)

    def bstride(t):
        return t.expand(B, H, *t.shape[2:]).stride()

    cs, ix, ro = bstride(plan.kv_count), bstride(plan.kv_index), bstride(plan.row_order)
    val_b = plan.k_valid.expand(B, -1).stride(0)
    qv_b = plan.q_valid.expand(B, -1).stride(0)
    coeffs = [x for view in (views[0], views[1], views[2], o_view) for x in view[2:]]
    grid = (plan.num_q_blocks * (plan.q_block // block_m), B * H)
    launch(_sparse_ws_kernel, grid, q_d, k_d, v_d, o_d, lse,
           plan.kv_count, plan.kv_index, plan.row_order, plan.k_valid, plan.q_valid,
           cs[0], cs[1], ix[0], ix[1], ix[2], ro[0], ro[1], val_b, qv_b,
           H, Sq, float(scale) * LOG2E, *coeffs,
           Q_BLOCK=plan.q_block, K_BLOCK=plan.k_block, BLOCK_M=block_m, BLOCK_N=block_n, D=D, STAGES=stages,
           CONSUMER_REGS=_WS_REGS[0], PRODUCER_REGS=_WS_REGS[1], num_warps=num_warps)
    return out, lse


def tile_loop_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        block_m: int = 128, block_n: int = 128):
    """The kernels' algorithm in torch, in their order of operations (for checking it on any device).

    Per query tile: S(0), its softmax; then per key tile j >= 1: S(j), the PV of tile j-1 (P(j-1) in
    bf16) added to the accumulator, softmax of S(j) against the new max, the accumulator rescaled by
    alpha(j); finally the PV of the last tile. Scores in base 2 with the scale folded into the exp2
    argument. Returns ``out`` (q's dtype) and ``lse`` (float32, natural log), like the launcher.
    """
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    c = scale * LOG2E
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    n_tiles = S // block_n
    for m0 in range(0, S, block_m):
        qt = q[:, :, m0:m0 + block_m].float()
        s = qt @ kf[:, :, :block_n].transpose(-1, -2)
        m_i = s.amax(-1) * c
        p = torch.exp2(s * c - m_i[..., None])
        l_i = p.sum(-1)
        p_op = p.to(q.dtype).float()
        acc = torch.zeros(B, H, block_m, D, device=q.device)
        for j in range(1, n_tiles):
            s = qt @ kf[:, :, j * block_n:(j + 1) * block_n].transpose(-1, -2)
            acc = acc + p_op @ vf[:, :, (j - 1) * block_n:j * block_n]
            m_new = torch.maximum(m_i, s.amax(-1) * c)
            alpha = torch.exp2(m_i - m_new)
            p = torch.exp2(s * c - m_new[..., None])
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None]
            m_i, p_op = m_new, p.to(q.dtype).float()
        acc = acc + p_op @ vf[:, :, (n_tiles - 1) * block_n:n_tiles * block_n]
        out[:, :, m0:m0 + block_m] = (acc / l_i[..., None]).to(q.dtype)
        lse[:, :, m0:m0 + block_m] = (m_i + torch.log2(l_i)) * LN2
    return out, lse


def attention_flops(B: int, H: int, S: int, D: int) -> float:
    """Forward FLOPs of dense attention (two GEMMs): 4·B·H·S²·D."""
    return 4.0 * B * H * S * S * D


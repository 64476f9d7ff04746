"""Attention backward for Hopper (sm90) written in Gluon: the Triton backend's single-pass backward on
Hopper (`triton_bwd.gluon_backward_usable` decides; `gluon_sparse_backward` is its entry).

FA3's layout of work for head dim 128: one program (CTA) owns ``BLOCK_N = 128`` keys of one
(batch, head) and walks query tiles of ``BLOCK_M = 64`` rows. Three partitions:

* a producer (one warpgroup at 24 registers, one thread issuing) loads the program's K and V tiles
  once, then per query step the Q and dO tiles and the step's 64 values of ``lse2`` (lse in log2
  units) and ``delta`` into a ring of ``STAGES`` slots, each slot with a "full" and an "empty"
  mbarrier;
* two consumer warpgroups (240 registers each), warpgroup ``c`` owning keys ``64c ... 64c + 63``. Per
  step, with ``Sᵀ`` and ``dPᵀ`` kept transposed (keys × query rows) so that ``Pᵀ`` and ``dSᵀ`` are
  the register A operands of the dV and dK GEMMs:

      Sᵀ  = K_c Qᵀ                         (wgmma, K and Q from shared memory)
      dPᵀ = V_c dOᵀ                        (wgmma)
      Pᵀ  = exp2(Sᵀ·scale·log2e − lse2)    (lse2 = +inf on rows without keys: P = 0)
      dV_c += Pᵀ dO                        (wgmma, Pᵀ from registers)
      dSᵀ = Pᵀ ∘ (dPᵀ − delta)
      dK_c += dSᵀ Q                        (wgmma, dSᵀ from registers)
      dSᵀ → shared memory (bf16), both warpgroups meet at an mbarrier, then
      dQ[:, 64c ... 64c + 63] = dS · K[:, 64c ... 64c + 63]   (wgmma over all 128 keys, both from shared memory)

  and the dQ half tile (fp32, 64×64) is added to a float32 ``[B·H·S, D]`` buffer by relaxed atomics
  (``red.global.add``). The two warpgroups split dQ by columns, so each dQ element gets one atomic
  add per program and step (as the Triton single pass with 128-key programs does). The dS tile is
  double buffered: a warpgroup writes step ``i``'s half only after it met the other at step ``i-1``,
  which the other reached after its dQ GEMM of step ``i-2`` (the last reader of that buffer) retired.

By default (``overlap``, `_consumer_walk_overlap`) a consumer issues step ``i+1``'s Sᵀ right after step
``i``'s dQ GEMM, so that Sᵀ runs on the tensor cores while step ``i``'s dQ is waited for and added, and
issues ``dPᵀ`` at the start of its step, under the softmax. On an H200 it is 5% faster than the walk
that waits for all of a step's GEMMs first (`_consumer_walk`) on an STA mask at S = 46k in three runs,
and level with it at 720p/121f (within ±2% in two runs, 10% faster in one; benchmarks/NOTES.md v10).

At the end dK (scaled by ``scale``) and dV are written from registers; a small kernel scales the dQ
buffer and casts it. A Triton preprocess kernel computes ``delta = rowsum(dout·out)`` and
``lse2 = lse·log2e`` (+inf where lse = -inf).

Block-sparse walks (``plan`` given): the program of key sub-tile ``t`` of key block ``col_order[t //
(K_BLOCK/128)]`` walks the query blocks of that key block's ``q_index`` list, each only up to
``cdiv(q_valid, 64)`` sub-tiles (padded query rows beyond are never visited; inside a partly valid
sub-tile they have lse = -inf, hence P = 0, and must hold finite q / dout); keys past ``k_valid`` get
P = 0 (their dK / dV are written as zeros). Plans with windows or a key bias are not supported.

Limits: q, k, v, out, dout ``[B, H, S, D]`` contiguous, the same S for queries and keys, bf16 (or
fp16), D = 128; dense: S a multiple of 128; sparse: q_block and k_block multiples of 128 and S =
Nq·q_block = Nk·k_block. Importing this module never fails: without Gluon `HAS_GLUON` is False and the
launcher raises.
"""

from __future__ import annotations

import torch

from .gluon_common import HAS_GLUON, hopper_unsupported, plan_unsupported

if HAS_GLUON:
    from .gluon_common import (TensorDescriptor, cta_barrier, fence_async_shared, gl, gluon, mbarrier, tl, tma,
                               tma_load, triton, warpgroup_mma, warpgroup_mma_wait)

LOG2E = 1.4426950408889634

HAS_TMA_REDUCE = False
if HAS_GLUON:
    try:  # TMA reduce-add from shared memory: later releases have tma.async_atomic_add; Triton 3.6's Gluon
          # has no wrapper, but its builder exposes the op (create_async_tma_reduce)
        tma_reduce_add = getattr(tma, "async_atomic_add", None)
        if tma_reduce_add is None:
            from triton._C.libtriton import ir as _ir
            from triton.experimental.gluon.language._core import builtin as _builtin

            if not hasattr(_ir, "DESCRIPTOR_REDUCE_KIND"):
                raise ImportError("no descriptor reduce kinds")

            @_builtin
            def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
                """``global[coord ...] += src`` (a shared-memory tile) by one bulk tensor reduction."""
                coord = _semantic._convert_to_ir_values(coord, require_i64=False)
                _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                          src.handle)
        HAS_TMA_REDUCE = True
    except Exception:  # noqa: BLE001 - dQ then goes by atomics only
        HAS_TMA_REDUCE = False

__all__ = ["HAS_GLUON", "gluon_attention_backward", "gluon_sparse_backward", "sparse_backward_unsupported",
           "step_table", "tile_loop_reference", "backward_flops", "fixed_point_scales"]

BLOCK_M = 64        # query rows per step
BLOCK_N = 128       # keys per program (two consumer warpgroups of 64)
_REGS = (240, 24)   # setmaxnreg of the consumer worker and of the producer partition
_ROWS = 64          # rows per program of the preprocess and convert kernels
# Fixed-point dQ (``dq_fixed``): each row's contributions are scaled by a power of two so that every partial
# sum of them is at most 2^FIXED_BITS (`fixed_point_scales`), rounded to the nearest integer and summed in
# one int32 per element. Up to rounding of the kernel's own arithmetic (< 1%) and half a unit per term, with at
# most FIXED_MAX_TERMS terms (one per 128-key tile): |Σ| <= 1.01·2^30 + 2^11 < 2^31, no partial sum overflows.
FIXED_BITS = 30
FIXED_MAX_TERMS = 4096                 # key tiles of 128: sequences up to 524,288 tokens
_D = 128            # the head dim the kernel runs

if HAS_GLUON:
    # a consumer warpgroup's wgmma register layouts: Sᵀ / dPᵀ [64 keys, BLOCK_M rows], dK / dV [64 keys, D],
    # the dQ half tile [BLOCK_M rows, 64 columns]; Pᵀ and dSᵀ as register A operands; per-row vectors of Sᵀ
    _S_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16]))
    _ACC_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, _D, 16]))
    _DQ_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N // 2, 16]))
    _A_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_ACC_LAYOUT.value, k_width=2))
    _COL_LAYOUT = gl.constexpr(gl.SliceLayout(0, _S_LAYOUT.value))


if HAS_GLUON:

    # ----------------------------------------------------------------------------------------------
    # Preprocess and dQ convert (plain Triton)
    # ----------------------------------------------------------------------------------------------

    @triton.jit
    def _prep_kernel(O, DO, LSE, DELTA, LSE2, n_rows, D: tl.constexpr, ROWS: tl.constexpr):
        # Grid: (cdiv(n_rows, ROWS),) over the [B·H·S] rows of contiguous out / dout / lse.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = rows < n_rows
        offs = rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
        o = tl.load(O + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + rows, tl.sum(o * do, 1), mask=ok)
        lse = tl.load(LSE + rows, mask=ok, other=0.0)
        tl.store(LSE2 + rows, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=ok)

    @triton.jit
    def _dq_convert_kernel(DQ_ACC, DQ, n_rows, scale, D: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = rows < n_rows
        offs = rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
        acc = tl.load(DQ_ACC + offs, mask=ok[:, None], other=0.0)
        tl.store(DQ + offs, (acc * scale).to(DQ.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _dq_fixed_convert_kernel(DQ_ACC, DQS, DQ, n_rows, scale, D: tl.constexpr, ROWS: tl.constexpr):
        # DQ_ACC [n_rows, D] int32 sums (one rounding to float32) / the row's power-of-two scale (exact)
        # · softmax scale; NaN where the scale is 0 (a non-finite input in the row)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = rows < n_rows
        offs = rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
        acc = tl.load(DQ_ACC + offs, mask=ok[:, None], other=0).to(tl.float32)
        s = tl.load(DQS + rows, mask=ok, other=1.0)
        dq = tl.where(s[:, None] == 0.0, float("nan"), acc / s[:, None] * scale)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=ok[:, None])

    # ----------------------------------------------------------------------------------------------
    # Partitions
    # ----------------------------------------------------------------------------------------------

    @gluon.jit
    def _step_row(SPARSE: gl.constexpr, steps_ptr, i, BLOCK_M: gl.constexpr):
        """First query row (within the sequence) of step ``i``: from the step table, or ``i·BLOCK_M``."""
        if SPARSE:
            return gl.load(steps_ptr + i)
        else:
            return i * BLOCK_M

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, dqs_desc,
                  q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, dqs_smem, kv_bar, full, empty,
                  row_base, key_row0, n_steps, steps_ptr,
                  SPARSE: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, DQ_FIXED: gl.constexpr):
        """K and V once, then per step Q, dO, lse2 and delta (and with ``DQ_FIXED`` the rows' dQ scales)
        into slot ``i % STAGES`` (after both consumers released it; a fresh empty barrier passes the wait
        on parity 1)."""
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma_load(k_desc, [key_row0, 0], kv_bar, k_smem)
        tma_load(v_desc, [key_row0, 0], kv_bar, v_smem)
        nbytes: gl.constexpr = (2 * q_desc.block_type.nbytes + (3 if DQ_FIXED else 2) * lse_desc.block_type.nbytes)
        for i in range(n_steps):
            row = row_base + _step_row(SPARSE, steps_ptr, i, BLOCK_M)
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            bar = full.index(s)
            mbarrier.expect(bar, nbytes)
            tma_load(q_desc, [row, 0], bar, q_smem.index(s))
            tma_load(do_desc, [row, 0], bar, do_smem.index(s))
            tma_load(lse_desc, [row], bar, lse_smem.index(s))
            tma_load(delta_desc, [row], bar, delta_smem.index(s))
            if DQ_FIXED:
                tma_load(dqs_desc, [row], bar, dqs_smem.index(s))

    @gluon.jit
    def _consumer_step(c: gl.constexpr, i, row, dk, dv, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem,
                       dqs_smem, ds_smem, full, empty, ds_bar, DQ_ACC, dq_offs, dq_desc, dq_smem, qk_scale,
                       BLOCK_M: gl.constexpr, BLOCK_KC: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                       DQ_TMA: gl.constexpr, DQ_FIXED: gl.constexpr):
        """Step ``i`` (query rows ``row ...`` of the flat [B·H·S] index) of consumer warpgroup ``c``."""

        s = i % STAGES
        buf = i % 2
        q_s = q_smem.index(s)
        do_s = do_smem.index(s)
        k_c = k_smem.slice(c * BLOCK_KC, BLOCK_KC, dim=0)
        v_c = v_smem.slice(c * BLOCK_KC, BLOCK_KC, dim=0)
        zero = gl.zeros([BLOCK_KC, BLOCK_M], gl.float32, _S_LAYOUT)

        mbarrier.wait(full.index(s), (i // STAGES) & 1)
        st = warpgroup_mma(k_c, q_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_c, do_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        lse2 = lse_smem.index(s).load(_COL_LAYOUT)
        dq_scale = _dq_row_scales(dqs_smem, s, DQ_FIXED)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))
        # P <= 1 (the exact P is, up to rounding): keeps P finite for the zeroed keys past k_valid
        # (S = 0) in rows whose lse is very negative, so that their dS·K adds exactly 0 to dQ
        pt = gl.exp2(gl.minimum(st * qk_scale - lse2[None, :], 0.0))
        pt_op = gl.convert_layout(pt.to(q_s.dtype), _A_LAYOUT)
        dv = warpgroup_mma(pt_op, do_s, dv, is_async=True)
        delta = delta_smem.index(s).load(_COL_LAYOUT)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt,))
        dst = (pt * (dpt - delta[None, :])).to(q_s.dtype)
        ds_half = ds_smem.index(buf).slice(c * BLOCK_KC, BLOCK_KC, dim=0)
        ds_half.store(dst)
        dst_op = gl.convert_layout(dst, _A_LAYOUT)
        dk = warpgroup_mma(dst_op, q_s, dk, is_async=True)
        fence_async_shared()
        mbarrier.arrive(ds_bar, count=1)           # this warpgroup's half of dSᵀ is in shared memory
        mbarrier.wait(ds_bar, i & 1)               # ... and the other's
        dq = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_smem.slice(c * BLOCK_KC, BLOCK_KC, dim=1),
                           gl.zeros([BLOCK_M, BLOCK_KC], gl.float32, _DQ_LAYOUT), use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq))
        mbarrier.arrive(empty.index(s), count=1)   # Q / dO / lse2 / delta of slot s no longer read
        _dq_out(c, dq, row, DQ_ACC, dq_offs, dq_desc, dq_smem, dq_scale, BLOCK_KC, D, DQ_TMA, DQ_FIXED)
        return dk, dv

    @gluon.jit
    def _dq_row_scales(dqs_smem, s, DQ_FIXED: gl.constexpr):
        """The step's rows' fixed-point dQ scales from slot ``s`` (read before the slot is released), as
        a slice of `_DQ_LAYOUT` rows; 1.0 without ``DQ_FIXED``."""
        if DQ_FIXED:
            return dqs_smem.index(s).load(gl.SliceLayout(1, _DQ_LAYOUT))
        else:
            return 1.0

    @gluon.jit
    def _issue_s(c: gl.constexpr, i, q_smem, k_smem, full, BLOCK_M: gl.constexpr, BLOCK_KC: gl.constexpr,
                 STAGES: gl.constexpr):
        """Step ``i``'s Sᵀ = K_c Qᵀ issued (async) once its slot has landed."""
        s = i % STAGES
        mbarrier.wait(full.index(s), (i // STAGES) & 1)
        return warpgroup_mma(k_smem.slice(c * BLOCK_KC, BLOCK_KC, dim=0), q_smem.index(s).permute((1, 0)),
                             gl.zeros([BLOCK_KC, BLOCK_M], gl.float32, _S_LAYOUT), use_acc=False, is_async=True)

    @gluon.jit
    def _issue_dp(c: gl.constexpr, i, do_smem, v_smem, BLOCK_M: gl.constexpr, BLOCK_KC: gl.constexpr,
                  STAGES: gl.constexpr):
        """Step ``i``'s dPᵀ = V_c dOᵀ issued (async; its slot has landed)."""
        return warpgroup_mma(v_smem.slice(c * BLOCK_KC, BLOCK_KC, dim=0), do_smem.index(i % STAGES).permute((1, 0)),
                             gl.zeros([BLOCK_KC, BLOCK_M], gl.float32, _S_LAYOUT), use_acc=False, is_async=True)

    @gluon.jit
    def _dq_out(c: gl.constexpr, dq, row, DQ_ACC, dq_offs, dq_desc, dq_smem, dq_scale, BLOCK_KC: gl.constexpr,
                D: gl.constexpr, DQ_TMA: gl.constexpr, DQ_FIXED: gl.constexpr = False):
        """This warpgroup's dQ half tile (rows ``row ...``) added to the float32 buffer; with ``DQ_FIXED``
        to the int32 buffer as fixed point: each row times its power-of-two ``dq_scale`` (a slice of
        `_DQ_LAYOUT` rows; exact), rounded to the nearest integer (`FIXED_BITS`). Integer additions do
        not depend on their order, so the sums are the same bits whatever order the programs add in."""
        if DQ_FIXED:
            y = dq * dq_scale[:, None]
            dq = gl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [y], dtype=gl.int32,
                                           is_pure=True, pack=1)
        if DQ_TMA:   # through this warpgroup's shared buffer and one bulk reduce-add
            dq_buf = dq_smem.index(c)
            tma.store_wait(0)            # the previous step's reduce has read the buffer
            cta_barrier()
            dq_buf.store(dq)
            fence_async_shared()
            cta_barrier()
            tma_reduce_add(dq_desc, [row, c * BLOCK_KC], dq_buf)
        else:
            gl.atomic_add(DQ_ACC + row.to(gl.int64) * D + dq_offs, dq, sem="relaxed")

    @gluon.jit
    def _consumer_walk_overlap(c: gl.constexpr, dk, dv, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem,
                               dqs_smem, ds_smem, full, empty, ds_bar, DQ_ACC, dq_offs, dq_desc, dq_smem, row_base,
                               n_steps, steps_ptr, qk_scale, SPARSE: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_KC: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                               DQ_TMA: gl.constexpr, DQ_FIXED: gl.constexpr):
        """The walk of `_consumer_walk` with step ``i+1``'s Sᵀ issued before step ``i``'s dQ GEMM is waited
        for, so that it runs on the tensor cores while this warpgroup adds step ``i``'s dQ (FA3's overlap
        across steps); step ``i+1``'s dPᵀ is issued at its start and runs under the softmax. The Q / dO
        slot is released as soon as dV and dK retired (the dQ GEMM reads dSᵀ and K only). wgmma groups
        retire in issue order, so each wait names how many later groups may stay in flight.

        Sᵀ is waited for at the end of its iteration: a wgmma in flight across the loop's back edge makes
        ptxas serialise every wgmma of the kernel, and dPᵀ issued early as well does not fit the
        registers (ptxas serialises for lack of them). The last step issues its own Sᵀ once more instead
        of branching (its slot is never reloaded, its full barrier has passed)."""
        if n_steps > 0:
            st = warpgroup_mma_wait(num_outstanding=0,
                                    deps=(_issue_s(c, 0, q_smem, k_smem, full, BLOCK_M, BLOCK_KC, STAGES),))
            for i in range(n_steps):
                s = i % STAGES
                buf = i % 2
                row = row_base + _step_row(SPARSE, steps_ptr, i, BLOCK_M)
                q_s = q_smem.index(s)
                do_s = do_smem.index(s)
                dpt_acc = _issue_dp(c, i, do_smem, v_smem, BLOCK_M, BLOCK_KC, STAGES)
                lse2 = lse_smem.index(s).load(_COL_LAYOUT)
                pt = gl.exp2(gl.minimum(st * qk_scale - lse2[None, :], 0.0))    # P <= 1: see _consumer_step
                pt_op = gl.convert_layout(pt.to(q_s.dtype), _A_LAYOUT)
                dv = warpgroup_mma(pt_op, do_s, dv, is_async=True)
                delta = delta_smem.index(s).load(_COL_LAYOUT)
                dq_scale = _dq_row_scales(dqs_smem, s, DQ_FIXED)
                dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt_acc,))
                dst = (pt * (dpt - delta[None, :])).to(q_s.dtype)
                ds_smem.index(buf).slice(c * BLOCK_KC, BLOCK_KC, dim=0).store(dst)
                dst_op = gl.convert_layout(dst, _A_LAYOUT)
                dk = warpgroup_mma(dst_op, q_s, dk, is_async=True)
                fence_async_shared()
                mbarrier.arrive(ds_bar, count=1)
                mbarrier.wait(ds_bar, i & 1)
                dq_acc = warpgroup_mma(ds_smem.index(buf).permute((1, 0)),
                                       k_smem.slice(c * BLOCK_KC, BLOCK_KC, dim=1),
                                       gl.zeros([BLOCK_M, BLOCK_KC], gl.float32, _DQ_LAYOUT), use_acc=False,
                                       is_async=True)
                dv, dk, pt_op, dst_op = warpgroup_mma_wait(num_outstanding=1, deps=(dv, dk, pt_op, dst_op))
                mbarrier.arrive(empty.index(s), count=1)   # Q / dO / lse2 / delta of slot s no longer read
                st_acc = _issue_s(c, gl.minimum(i + 1, n_steps - 1), q_smem, k_smem, full, BLOCK_M, BLOCK_KC,
                                  STAGES)
                dq = warpgroup_mma_wait(num_outstanding=1, deps=(dq_acc,))
                _dq_out(c, dq, row, DQ_ACC, dq_offs, dq_desc, dq_smem, dq_scale, BLOCK_KC, D, DQ_TMA, DQ_FIXED)
                st = warpgroup_mma_wait(num_outstanding=0, deps=(st_acc,))
        return dk, dv

    @gluon.jit
    def _zero_rows_past(smem, n_keep, ROWS: gl.constexpr, D: gl.constexpr):
        """Zero the rows ``n_keep ...`` of a warpgroup's K half tile (once per ragged program). Keys past
        k_valid then have S = 0, and their dS·K adds nothing to dQ; their own dK / dV are written as
        zeros. (P of such keys is exp2(−lse2) clamped to 1 by the step, so it stays finite.)"""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        x = smem.load(layout)
        r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        smem.store(gl.where((r < n_keep)[:, None], x, gl.zeros_like(x)))
        fence_async_shared()
        cta_barrier()                   # every warp's rows are written before the first wgmma reads them

    @gluon.jit
    def _consumer_walk(c: gl.constexpr, dk, dv, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, dqs_smem,
                       ds_smem, full, empty, ds_bar, DQ_ACC, dq_offs, dq_desc, dq_smem, row_base, n_steps, steps_ptr,
                       qk_scale, SPARSE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_KC: gl.constexpr,
                       D: gl.constexpr, STAGES: gl.constexpr, DQ_TMA: gl.constexpr, DQ_FIXED: gl.constexpr):
        for i in range(n_steps):
            row = row_base + _step_row(SPARSE, steps_ptr, i, BLOCK_M)
            dk, dv = _consumer_step(c, i, row, dk, dv, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem,
                                    dqs_smem, ds_smem, full, empty, ds_bar, DQ_ACC, dq_offs, dq_desc, dq_smem,
                                    qk_scale, BLOCK_M, BLOCK_KC, D, STAGES, DQ_TMA, DQ_FIXED)
        return dk, dv

    @gluon.jit
    def _consumer(c: gl.constexpr, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, dqs_smem, ds_smem,
                  dq_smem, kv_bar, full, empty, ds_bar, DQ_ACC, dq_desc, DK, DV, row_base, key_row0, rem, n_steps,
                  steps_ptr, qk_scale, sm_scale, SPARSE: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_KC: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, DQ_TMA: gl.constexpr,
                  OVERLAP: gl.constexpr, DQ_FIXED: gl.constexpr):
        dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, _DQ_LAYOUT))
        dq_cols = c * BLOCK_KC + gl.arange(0, BLOCK_KC, layout=gl.SliceLayout(0, _DQ_LAYOUT))
        dq_offs = dq_rows[:, None] * D + dq_cols[None, :]
        dk = gl.zeros([BLOCK_KC, D], gl.float32, _ACC_LAYOUT)
        dv = gl.zeros([BLOCK_KC, D], gl.float32, _ACC_LAYOUT)

        mbarrier.wait(kv_bar, 0)
        if SPARSE:
            if rem < 2 * BLOCK_KC:   # a ragged key tile: see _zero_rows_past
                _zero_rows_past(k_smem.slice(c * BLOCK_KC, BLOCK_KC, dim=0), rem - c * BLOCK_KC, BLOCK_KC, D)
        if OVERLAP:
            dk, dv = _consumer_walk_overlap(c, dk, dv, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem,
                                            dqs_smem, ds_smem, full, empty, ds_bar, DQ_ACC, dq_offs, dq_desc,
                                            dq_smem, row_base, n_steps, steps_ptr, qk_scale, SPARSE, BLOCK_M,
                                            BLOCK_KC, D, STAGES, DQ_TMA, DQ_FIXED)
        else:
            dk, dv = _consumer_walk(c, dk, dv, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, dqs_smem,
                                    ds_smem, full, empty, ds_bar, DQ_ACC, dq_offs, dq_desc, dq_smem, row_base,
                                    n_steps, steps_ptr, qk_scale, SPARSE, BLOCK_M, BLOCK_KC, D, STAGES, DQ_TMA,
                                    DQ_FIXED)
        if DQ_TMA:
            tma.store_wait(0)
        rows = gl.arange(0, BLOCK_KC, layout=gl.SliceLayout(1, _ACC_LAYOUT))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, _ACC_LAYOUT))
        offs = (key_row0 + c * BLOCK_KC + rows).to(gl.int64)[:, None] * D + cols[None, :]
        if SPARSE:   # keys past k_valid: zero gradients
            keep = (c * BLOCK_KC + rows < rem)[:, None]
            dk = gl.where(keep, dk, 0.0)
            dv = gl.where(keep, dv, 0.0)
        gl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty))
        gl.store(DV + offs, dv.to(DV.dtype.element_ty))

    # the plan's strides and H change with the video size: not specialised on (no new variant per size)
    @gluon.jit(do_not_specialize=["s_ns_b", "s_ns_h", "s_st_b", "s_st_h", "s_st_n", "s_ord_b", "s_ord_h", "s_val_b",
                                  "H"])
    def _bwd_kernel(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, dqs_desc, dq_desc, DQ_ACC, DK, DV,
                    N_STEPS, STEPS, COL_ORDER, K_VALID,
                    s_ns_b, s_ns_h, s_st_b, s_st_h, s_st_n, s_ord_b, s_ord_h, s_val_b,
                    H, S, qk_scale, sm_scale,
                    SPARSE: gl.constexpr, DQ_TMA: gl.constexpr, OVERLAP: gl.constexpr, DQ_FIXED: gl.constexpr,
                    K_BLOCK: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        gl.static_assert(num_warps == 4, "the default partition is consumer warpgroup 0")
        BLOCK_KC: gl.constexpr = BLOCK_N // 2
        tile = gl.program_id(0)
        bh = gl.program_id(1)
        row_base = bh * S                       # all tensors are [B·H·S, D] / [B·H·S] views
        if SPARSE:
            SUB_N: gl.constexpr = K_BLOCK // BLOCK_N
            b = bh // H
            h = bh % H
            k_blk = gl.load(COL_ORDER + b * s_ord_b + h * s_ord_h + tile // SUB_N)
            key0 = k_blk * K_BLOCK + (tile % SUB_N) * BLOCK_N
            rem = gl.load(K_VALID + b * s_val_b + k_blk) - (tile % SUB_N) * BLOCK_N   # valid keys here
            n_steps = gl.load(N_STEPS + b * s_ns_b + h * s_ns_h + k_blk)
            n_steps = gl.where(rem > 0, n_steps, 0)                                 # all padding: zeros
            steps_ptr = STEPS + b * s_st_b + h * s_st_h + k_blk * s_st_n
        else:
            key0 = tile * BLOCK_N
            rem = BLOCK_N
            n_steps = S // BLOCK_M
            steps_ptr = STEPS
        key_row0 = row_base + key0

        dt: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, D], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dt, [BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dt, [BLOCK_N, D], v_desc.layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
        if DQ_FIXED:
            dqs_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], dqs_desc.layout)
        else:
            dqs_smem = delta_smem
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dt)
        ds_smem = gl.allocate_shared_memory(dt, [2, BLOCK_N, BLOCK_M], ds_layout)
        if DQ_TMA:   # the bulk reduce-adds' sources: a dQ half tile per consumer warpgroup (float32 or int32)
            dq_smem = gl.allocate_shared_memory(dq_desc.dtype, [2, BLOCK_M, BLOCK_KC], dq_desc.layout)
        else:
            dq_smem = ds_smem
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ds_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(ds_bar, count=2)                  # one arrival per consumer warpgroup
        for s in gl.static_range(STAGES):
            mbarrier.init(full.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (0, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, dqs_smem, ds_smem, dq_smem,
                         kv_bar, full, empty, ds_bar, DQ_ACC, dq_desc, DK, DV, row_base, key_row0, rem, n_steps,
                         steps_ptr, qk_scale, sm_scale, SPARSE, BLOCK_M, BLOCK_KC, D, STAGES, DQ_TMA, OVERLAP,
                         DQ_FIXED)),
            (_consumer, (1, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, dqs_smem, ds_smem, dq_smem,
                         kv_bar, full, empty, ds_bar, DQ_ACC, dq_desc, DK, DV, row_base, key_row0, rem, n_steps,
                         steps_ptr, qk_scale, sm_scale, SPARSE, BLOCK_M, BLOCK_KC, D, STAGES, DQ_TMA, OVERLAP,
                         DQ_FIXED)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, dqs_desc, q_smem, do_smem, k_smem,
                         v_smem, lse_smem, delta_smem, dqs_smem, kv_bar, full, empty, row_base, key_row0, n_steps,
                         steps_ptr, SPARSE, BLOCK_M, STAGES, DQ_FIXED)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------

def _plan_strides(t, B, H):
    """Strides of a [B' or 1, H' or 1, ...] plan tensor broadcast to [B, H, ...] (0 on size-1 dims)."""
    return t.expand(B, H, *t.shape[2:]).stride()


def step_table(plan, block_m: int = BLOCK_M):
    """The walk of every key block as a flat list of query steps (torch ops, no host sync).

    Returns ``n_steps [B', H', Nk]`` int32 and ``steps [B', H', Nk, Nq·q_block/block_m]`` int32: the
    first query row (within the sequence) of each step, kept query blocks in ``q_index`` order, each
    up to its last sub-tile holding a valid row (``q_valid``). ``B'`` is the larger of the plan's index
    and ``q_valid`` batch dims.
    """
    q_index, q_count, q_valid = plan.q_index.long(), plan.q_count.long(), plan.q_valid.long()
    Bp, Hp, Nk, Nq = q_index.shape
    Bs = max(Bp, q_valid.shape[0])
    sub_m = plan.q_block // block_m
    q_index = q_index.expand(Bs, Hp, Nk, Nq)
    kept = torch.arange(Nq, device=q_index.device)[None, None, None, :] < q_count.expand(Bs, Hp, Nk)[..., None]
    qv = q_valid.expand(Bs, -1)
    n_valid = torch.gather(qv[:, None, None, :].expand(Bs, Hp, Nk, qv.shape[1]), 3, q_index)  # rows kept per block
    sub = torch.arange(sub_m, device=q_index.device)
    ok = kept[..., None] & (sub * block_m < n_valid[..., None])                             # [Bs, Hp, Nk, Nq, sub]
    rows = q_index[..., None] * plan.q_block + sub * block_m
    ok = ok.reshape(Bs, Hp, Nk, Nq * sub_m)
    rows = rows.reshape(Bs, Hp, Nk, Nq * sub_m)
    order = torch.sort((~ok).to(torch.int8), dim=-1, stable=True).indices                   # kept steps first
    steps = torch.gather(rows, -1, order).to(torch.int32)
    return ok.sum(-1).to(torch.int32), steps


def gluon_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             dout: torch.Tensor, lse: torch.Tensor, scale: float | None = None, plan=None,
                             stages: int = 2, dq_reduce: str = "atomic", steps=None, compile_only: bool = False,
                             dlse=None, launch=None, overlap: bool = True, dq_fixed: bool = False):
    """dq, dk, dv of attention ``out = softmax(q kᵀ·scale) v`` (``lse [B, H, S]`` float32, natural log,
    from the forward) given ``dout``, on Hopper through the Gluon kernel.

    q, k, v, out, dout: ``[B, H, S, D]`` contiguous, bf16 (or fp16), D = 128. ``plan``: None (dense, S
    a multiple of 128) or a `BlockSparsePlan` without windows or key bias, q_block and k_block multiples
    of 128, covering S exactly. ``stages``: depth of the Q/dO ring. ``dq_reduce``: ``"atomic"`` (dQ half
    tiles added by ``red.global.add`` from registers) or ``"tma"`` (through shared memory and one bulk
    tensor reduce-add per half tile). ``steps``: `step_table` of ``plan``, if already built (it depends
    on the plan only). ``compile_only``: compile the main kernel for the active target and return it
    instead of launching (tensors may be meta tensors). ``dlse``: gradient of ``lse`` ``[B, H, S]`` (it
    shifts the row term: ``delta ← delta − dlse``). ``overlap``: issue each step's Sᵀ before the previous
    step's dQ GEMM is waited for (`_consumer_walk_overlap`). ``dq_fixed``: accumulate dQ deterministically
    in fixed point (`fixed_point_scales`): the same bits in every run, one int32 sum per element
    (`FIXED_BITS`; sequences up to `FIXED_MAX_TERMS`·128 tokens).
    ``launch``: `precompile.launch` (compiles only inside `precompile.compile_only`); default: launch.
    """
    if not HAS_GLUON:
        raise RuntimeError("gluon_attention_backward needs Triton with Gluon (triton.experimental.gluon)")
    B, H, S, D = q.shape
    for name, t in (("k", k), ("v", v), ("out", out), ("dout", dout)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("bf16 or fp16 inputs only")
    if D != 128:
        raise ValueError(f"head dim {D} not supported (128)")
    if not all(t.is_contiguous() for t in (q, k, v, out, dout)):
        raise ValueError("q, k, v, out, dout must be contiguous")
    if lse.shape != (B, H, S) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [B, H, S], got {lse.dtype} {tuple(lse.shape)}")
    if dq_reduce not in ("atomic", "tma"):
        raise ValueError(f"dq_reduce must be 'atomic' or 'tma', got {dq_reduce!r}")
    if dq_reduce == "tma" and not HAS_TMA_REDUCE:
        raise RuntimeError("this Triton's Gluon has no TMA reduce-add")
    if dq_fixed and S > FIXED_MAX_TERMS * BLOCK_N:
        raise ValueError(f"fixed-point dQ sums at most {FIXED_MAX_TERMS} key tiles per row (S <= "
                         f"{FIXED_MAX_TERMS * BLOCK_N}), got S={S}")
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    if plan is None:
        if S % BLOCK_N:
            raise ValueError(f"S={S} must be a multiple of {BLOCK_N}")
        sparse, k_block = False, BLOCK_N
        dummy = torch.zeros(1, device=dev, dtype=torch.int32)
        n_steps = step_rows = col_order = k_valid = dummy
        strides = (0,) * 8
        n_tiles = S // BLOCK_N
    else:
        why = _plan_unsupported(plan, S)
        if why is not None:
            raise ValueError(f"the Gluon backward does not run {why}")
        sparse, k_block = True, plan.k_block
        n_steps, step_rows = step_table(plan) if steps is None else steps
        col_order, k_valid = plan.col_order, plan.k_valid
        ns, st, co = _plan_strides(n_steps, B, H), _plan_strides(step_rows, B, H), _plan_strides(col_order, B, H)
        strides = (ns[0], ns[1], st[0], st[1], st[2], co[0], co[1], k_valid.expand(B, -1).stride(0))
        n_tiles = plan.num_k_blocks * (k_block // BLOCK_N)

    n_rows = B * H * S
    delta = torch.empty(n_rows, device=dev, dtype=torch.float32)
    lse2 = torch.empty(n_rows, device=dev, dtype=torch.float32)
    dq_acc = torch.zeros(n_rows, D, device=dev, dtype=torch.int32 if dq_fixed else torch.float32)
    dqs = torch.empty(n_rows, device=dev, dtype=torch.float32) if dq_fixed else delta
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    m_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gdt)
    n_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gdt)
    r_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M], gl.float32)
    dq_tma = dq_reduce == "tma"
    dq_smem_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N // 2],
                                                          gl.int32 if dq_fixed else gl.float32)
    dq_d = TensorDescriptor(dq_acc, [n_rows, D], [D, 1], [BLOCK_M, BLOCK_N // 2], dq_smem_layout)

    def desc2(t, rows, layout):
        t2 = t.view(n_rows, D)
        return TensorDescriptor(t2, [n_rows, D], [D, 1], [rows, D], layout)

    def desc1(t):
        return TensorDescriptor(t, [n_rows], [1], [BLOCK_M], r_layout)

    args = (desc2(q, BLOCK_M, m_layout), desc2(dout, BLOCK_M, m_layout), desc2(k, BLOCK_N, n_layout),
            desc2(v, BLOCK_N, n_layout), desc1(lse2), desc1(delta), desc1(dqs),
            dq_d, dq_acc, dk, dv,
            n_steps, step_rows, col_order, k_valid, *strides, H, S, scale * LOG2E, scale)
    meta = dict(SPARSE=sparse, DQ_TMA=dq_tma, OVERLAP=bool(overlap), DQ_FIXED=bool(dq_fixed), K_BLOCK=k_block,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D, STAGES=int(stages), CONSUMER_REGS=_REGS[0],
                PRODUCER_REGS=_REGS[1], num_warps=4)
    grid = (n_tiles, B * H)
    if compile_only:
        return _bwd_kernel.warmup(*args, grid=grid, **meta)
    launch = launch or (lambda kernel, g, *a, **kw: kernel[g](*a, **kw))
    row_grid = (triton.cdiv(n_rows, _ROWS),)
    launch(_prep_kernel, row_grid, out, dout, lse, delta, lse2, n_rows, D=D, ROWS=_ROWS)
    if dlse is not None:
        delta.sub_(dlse.reshape(n_rows))
    if dq_fixed:
        dqs.copy_(fixed_point_scales(k, v, dout, delta.view(B, H, S)).reshape(n_rows))
    launch(_bwd_kernel, grid, *args, **meta)
    dq = torch.empty_like(q)
    if dq_fixed:
        launch(_dq_fixed_convert_kernel, row_grid, dq_acc, dqs, dq, n_rows, scale, D=D, ROWS=_ROWS)
    else:
        launch(_dq_convert_kernel, row_grid, dq_acc, dq, n_rows, scale, D=D, ROWS=_ROWS)
    return dq, dk, dv


def fixed_point_scales(k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per query row, the power of two that turns its dQ contributions into fixed point, float32
    ``[B, H, S]`` (0 where the inputs are not finite: those rows' dq become NaN).

    Every partial sum of row ``i``'s dQ contributions (``Σ_j dS_ij k_j`` over any set of keys, with
    ``dS_ij = P_ij (dP_ij − δ_i)``, ``Σ_j P_ij ≤ 1``, ``|dP_ij| ≤ |dO_i| |v_j|``) is at most, per coordinate,
    ``max|k| · (|dO_i| · max_j |v_j| + |δ_i|)`` (maxima over the (batch, head)); that bound rounded up to
    a power of two ``2^e`` gives the scale ``2^(FIXED_BITS − e)``: scaled, every partial sum is at most
    2^FIXED_BITS and the integer sum keeps ``FIXED_BITS`` = 30 bits below the bound. Rows whose bound is 0
    (no gradient: every contribution is exactly 0) get 2^126; bounds below 2^-96 keep fewer bits (the
    scale stays a normal float32).

    k, v, dout ``[B, H, S, D]``; delta ``[B, H, S]`` (rowsum(dout·out), shifted by an lse gradient).
    """
    B, H, S, D = k.shape
    kmin, kmax = torch.aminmax(k.reshape(B, H, S * D), dim=-1)                                 # one pass
    kmax = torch.maximum(kmax, -kmin).float()                                                 # [B, H]
    vmax = torch.linalg.vector_norm(v, dim=-1, dtype=torch.float32).amax(-1)                  # [B, H]
    dnorm = torch.linalg.vector_norm(dout, dim=-1, dtype=torch.float32)                       # [B, H, S]
    bound = kmax[..., None] * (dnorm * vmax[..., None] + delta.float().abs())
    exp = torch.ceil(torch.log2(bound)).clamp(min=-96.0, max=128.0)    # 2^-98 <= scale <= 2^126
    scale = torch.ldexp(torch.ones_like(bound), (FIXED_BITS - exp).to(torch.int32))
    return torch.where(torch.isfinite(bound), scale, torch.zeros_like(scale))


_STEPS_ATTR = "_gluon_bwd_steps"


def sparse_backward_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> str | None:
    """Why the block-sparse Gluon backward cannot run this call (None: it can): Hopper (sm90) with Gluon,
    not under Triton's interpreter; bf16 / fp16; head dim 128; q, k, v of one shape (self-attention
    over one sequence, as many key heads as query heads); plan blocks multiples of 128 covering the
    sequence exactly; no token window, no key bias."""
    why = hopper_unsupported(q, k, v)
    if why is not None:
        return why
    if q.shape[-1] != 128:
        return f"head dim {q.shape[-1]} (128 only)"
    if k.shape != q.shape or v.shape != q.shape:
        return "q, k, v of different shapes"
    return _plan_unsupported(plan, q.shape[2])


def _plan_unsupported(plan, S: int) -> str | None:
    """`gluon_common.plan_unsupported` and a plan covering the ``S`` rows of queries and keys exactly."""
    if plan.num_q_blocks * plan.q_block != S or plan.num_k_blocks * plan.k_block != S:
        return "a plan that does not cover the sequence exactly"
    return plan_unsupported(plan, BLOCK_N)


def _steps_for(plan, compile_only: bool):
    """`step_table` of ``plan``, built once and kept on the plan (it depends on the plan only); meta
    tensors of its shapes when only compiling."""
    if compile_only:
        Bp = max(plan.q_index.shape[0], plan.q_valid.shape[0])
        Hp, Nk, Nq = plan.q_index.shape[1:]
        n = Nq * (plan.q_block // BLOCK_M)
        return (torch.empty(Bp, Hp, Nk, dtype=torch.int32, device="meta"),
                torch.empty(Bp, Hp, Nk, n, dtype=torch.int32, device="meta"))
    cached = getattr(plan, _STEPS_ATTR, None)
    if cached is None:
        cached = step_table(plan)
        object.__setattr__(plan, _STEPS_ATTR, cached)
    return cached


def gluon_sparse_backward(q, k, v, out, lse, dout, plan, scale: float, dlse=None, launch=None,
                          compile_only: bool = False, stages: int = 2, overlap: bool = True, dq_fixed: bool = False):
    """dq, dk, dv of `gluon_fwd` / `triton_fwd`'s block-sparse ``out`` over ``plan`` (checked by the caller:
    `sparse_backward_unsupported`), the Triton backward's contract: any strides; query rows past
    ``plan.q_valid`` contribute nothing and get dq 0, whatever q / dout hold there (they are zeroed in
    the kernel's copies of q and dout); keys past ``k_valid`` get dk = dv = 0 (their k and v must be
    finite, as in the forward). dQ goes by TMA reduce-add where this Triton's Gluon has it, else by atomics.
    ``compile_only``: inside `precompile.compile_only` (tensors become meta tensors, ``launch`` compiles).
    ``stages`` / ``overlap`` / ``dq_fixed``: `gluon_attention_backward`'s (``dq_fixed``: the bit-reproducible
    backward)."""
    if compile_only:
        def dense(t):
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        q_c, k_c, v_c, o_c, do_c = (dense(t) for t in (q, k, v, out, dout))
        lse = dense(lse)
    else:
        row_ok = plan.query_valid()[:, None, :, None]                 # [Bq, 1, Sq, 1]
        q_c = torch.where(row_ok, q, 0.0).contiguous()
        do_c = torch.where(row_ok, dout, 0.0).contiguous()
        k_c, v_c, o_c = (t.contiguous() for t in (k, v, out))
        lse = lse.contiguous()
    mode = "tma" if HAS_TMA_REDUCE else "atomic"
    # compiling only, the launches (through ``launch``: `precompile.launch`) compile all three kernels
    return gluon_attention_backward(q_c, k_c, v_c, o_c, do_c, lse, scale, plan=plan, dq_reduce=mode,
                                    steps=_steps_for(plan, compile_only), dlse=dlse, launch=launch,
                                    stages=stages, overlap=overlap, dq_fixed=dq_fixed)


def tile_loop_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                        lse: torch.Tensor, scale: float | None = None, block_m: int = BLOCK_M,
                        block_n: int = BLOCK_N, dq_fixed: bool = False, key_tiles=None):
    """The kernel's algorithm in torch, in its order of operations and roundings (any device, dense).

    Per key tile of ``block_n`` keys and per query step of ``block_m`` rows: Sᵀ and dPᵀ in float32,
    Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), Pᵀ rounded to the input dtype for dV, dSᵀ rounded for dK and
    for dQ (which adds dS·K into a float32 buffer, or with ``dq_fixed`` as fixed point: each row's part
    scaled by `fixed_point_scales`, rounded to the nearest integer, summed in int32). ``key_tiles``: the
    order the key tiles are walked in (default ascending; the order of dQ's additions). Returns dq, dk,
    dv in the inputs' dtype.
    """
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    dt = q.dtype
    delta = (out.float() * dout.float()).sum(-1)
    lse2 = torch.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    dq_acc = torch.zeros(B, H, S, D, dtype=torch.int32 if dq_fixed else torch.float32, device=q.device)
    dqs = fixed_point_scales(k, v, dout, delta) if dq_fixed else None
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    for n0 in (range(0, S, block_n) if key_tiles is None else [t * block_n for t in key_tiles]):
        kt, vt = k[:, :, n0:n0 + block_n].float(), v[:, :, n0:n0 + block_n].float()
        dk_acc = torch.zeros(B, H, block_n, D, device=q.device)
        dv_acc = torch.zeros(B, H, block_n, D, device=q.device)
        for m0 in range(0, S, block_m):
            qt, dot = q[:, :, m0:m0 + block_m].float(), dout[:, :, m0:m0 + block_m].float()
            st = kt @ qt.transpose(-1, -2)                                   # [N, M]
            dpt = vt @ dot.transpose(-1, -2)
            pt = torch.exp2(st * (scale * LOG2E) - lse2[:, :, None, m0:m0 + block_m])
            dv_acc += pt.to(dt).float() @ dot
            dst = (pt * (dpt - delta[:, :, None, m0:m0 + block_m])).to(dt).float()
            dk_acc += dst @ qt
            part = dst.transpose(-1, -2) @ kt
            if dq_fixed:
                part = torch.round(part * dqs[:, :, m0:m0 + block_m, None]).to(torch.int32)
            dq_acc[:, :, m0:m0 + block_m] += part
        dk[:, :, n0:n0 + block_n] = (dk_acc * scale).to(dt)
        dv[:, :, n0:n0 + block_n] = dv_acc.to(dt)
    if dq_fixed:
        dq = torch.where(dqs[..., None] == 0, float("nan"), dq_acc.float() / dqs[..., None] * scale)
        return dq.to(dt), dk, dv
    return (dq_acc * scale).to(dt), dk, dv


def backward_flops(B: int, H: int, S: int, D: int) -> float:
    """FLOPs of the dense attention backward as usually counted (2.5× the forward's 4·B·H·S²·D)."""
    return 10.0 * B * H * S * S * D

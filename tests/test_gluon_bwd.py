"""Gluon sm90 backward prototype: import guard, its algorithm and step table (torch, any device), sm90
compilation without a GPU (needs Gluon) and, on a Hopper GPU, the kernel itself."""

import pytest
import torch

from video_sparse_attn import BlockSparsePlan
from video_sparse_attn.kernels import gluon_bwd as gb


def _grads(q, k, v, dout, scale):
    """float32 autograd of dense attention."""
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) * scale
    out = torch.softmax(s, -1) @ vf
    out.backward(dout.float())
    return out.detach(), torch.logsumexp(s, -1).detach(), (qf.grad, kf.grad, vf.grad)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_import_without_gluon_is_safe():
    assert isinstance(gb.HAS_GLUON, bool)
    if not gb.HAS_GLUON:
        x = torch.zeros(1, 1, 128, 128, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError):
            gb.gluon_attention_backward(x, x, x, x, x, torch.zeros(1, 1, 128))


def test_gluon_bwd_tile_loop_reference_matches_autograd():
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 384, 128, dtype=torch.bfloat16) for _ in range(4))
    scale = 128 ** -0.5
    out, lse, ref = _grads(q, k, v, dout, scale)
    got = gb.tile_loop_reference(q, k, v, out.to(q.dtype), dout, lse, scale)
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-2


@pytest.mark.parametrize("dout_scale,q_scale", [(1.0, 1.0), (1e5, 1.0), (1e-7, 1.0), (1.0, 8.0)],
                         ids=["unit", "large", "tiny", "peaked"])
def test_fixed_point_dq_reference_is_order_free_and_accurate(dout_scale, q_scale):
    """dQ as fixed point (`fixed_point_scales`, one int32 sum per element): the same bits whatever order
    the key tiles add in (float32 additions do depend on it), and as close to float64 autograd as the
    float32 dQ, from huge to tiny gradients and with peaked attention (no overflow, no precision lost to
    the fixed point that bf16 would keep)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 512, 128, dtype=torch.bfloat16) for _ in range(3))
    q = (q.float() * q_scale).to(torch.bfloat16)
    dout = (torch.randn(1, 2, 512, 128) * dout_scale).to(torch.bfloat16)
    scale = 128 ** -0.5
    out, lse, ref = _grads(q, k, v, dout, scale)
    out = out.to(q.dtype)
    fixed = gb.tile_loop_reference(q, k, v, out, dout, lse, scale, dq_fixed=True)
    fixed_rev = gb.tile_loop_reference(q, k, v, out, dout, lse, scale, dq_fixed=True, key_tiles=[3, 1, 0, 2])
    float_dq, float_dk, float_dv = gb.tile_loop_reference(q, k, v, out, dout, lse, scale)
    assert torch.equal(fixed[0], fixed_rev[0])
    assert torch.equal(fixed[1], float_dk) and torch.equal(fixed[2], float_dv)    # dK / dV: the same path
    assert torch.isfinite(fixed[0]).all()
    assert _rel(fixed[0], ref[0]) < 1e-2
    assert abs(_rel(fixed[0], ref[0]) - _rel(float_dq, ref[0])) < 1e-3
    # elementwise against float64: no farther than the float32 path, up to one bf16 rounding and the fixed
    # point's own quantum (half a unit per 128-key term, a unit being 1 / the row's scale)
    fx, fl, r = fixed[0].double(), float_dq.double(), ref[0].double()
    delta = (out.double() * dout.double()).sum(-1)
    quantum = scale / gb.fixed_point_scales(k, v, dout, delta.float()).double()[..., None]
    tol = (fl - r).abs() + 2.0 ** -7 * torch.maximum(fx.abs(), fl.abs()) + 0.5 * (512 // gb.BLOCK_N) * quantum
    assert ((fx - r).abs() <= tol).all()


def test_fixed_point_scales_bound_every_partial_sum():
    """Powers of two; every running sum of a row's per-tile dQ contributions (float64) stays at most
    2^FIXED_BITS once scaled, and with half a unit of rounding per term below 2^31 (the int32 sum);
    zero rows get 2^126, rows with a non-finite input 0."""
    torch.manual_seed(2)
    B, H, S, D = 1, 2, 256, 128
    q, k, v, dout = (torch.randn(B, H, S, D, dtype=torch.bfloat16) for _ in range(4))
    dout[0, 0, 5] = 0.0
    dout[0, 1, 7, 3] = float("nan")
    scale = D ** -0.5
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(s, -1)
    out = p @ v.double()
    delta = (out * dout.double()).sum(-1)
    dqs = gb.fixed_point_scales(k, v, dout, delta.float())
    ok = dqs > 0
    assert torch.equal(torch.exp2(torch.log2(dqs[ok]).round()), dqs[ok])
    assert dqs[0, 0, 5] == 2.0 ** 126 and dqs[0, 1, 7] == 0 and ok.sum() == B * H * S - 1
    ds = p * ((dout.double() @ v.double().transpose(-1, -2)) - delta[..., None])
    parts = torch.stack([ds[..., t:t + 64] @ k.double()[:, :, t:t + 64] for t in range(0, S, 64)])  # [tiles,B,H,S,D]
    y = parts * dqs.double()[None, ..., None]
    running = y.cumsum(0)
    finite = torch.isfinite(running)
    assert running[finite].abs().max() <= 2.0 ** gb.FIXED_BITS
    assert running[finite].abs().max() > 2.0 ** (gb.FIXED_BITS - 13)   # not so loose that precision is lost
    assert torch.round(y).cumsum(0)[finite].abs().max() < 2.0 ** 31
    # the worst case the constants allow: every term at the bound (1% over it for the kernel's own
    # rounding) and half a unit of rounding each, FIXED_MAX_TERMS terms
    assert 1.01 * 2 ** gb.FIXED_BITS + gb.FIXED_MAX_TERMS / 2 < 2 ** 31


def test_step_table_matches_the_walk():
    """Each key block's steps: its kept query blocks in q_index order, sub-tiles of 64 rows up to the
    last one holding a valid row (q_valid), then padding."""
    torch.manual_seed(0)
    B, H, N, blk = 2, 3, 5, 256
    mask = torch.rand(B, H, N, N) < 0.5
    q_valid = torch.randint(1, blk + 1, (B, N), dtype=torch.int32)
    plan = BlockSparsePlan.from_block_mask(mask, blk, blk, q_valid=q_valid)
    n_steps, steps = gb.step_table(plan)
    for b in range(B):
        for h in range(H):
            for n in range(N):
                want = []
                for j in range(int(plan.q_count[b, h, n])):
                    qb = int(plan.q_index[b, h, n, j])
                    want += [qb * blk + s * 64 for s in range(-(-int(plan.q_valid[b, qb]) // 64))]
                assert int(n_steps[b, h, n]) == len(want)
                assert steps[b, h, n, :len(want)].tolist() == want


@pytest.mark.skipif(not gb.HAS_GLUON, reason="needs Triton with Gluon")
def test_gluon_bwd_compiles_for_sm90():
    """Dense and sparse variants, both dQ reductions, both walks and the fixed-point dQ compile for sm90
    without a GPU within 227 KiB of shared memory; under Triton 3.6 (what the GPU machine runs) the
    dense stepwise float ones without stack (spills; later ptxas bundles spill a few bytes). In a child
    process: the CPU suite runs Triton's interpreter, Gluon has none."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    dq = ["atomic"] + (["tma"] if gb.HAS_TMA_REDUCE else [])
    p = subprocess.run([sys.executable, str(root / "scripts" / "gluon_bwd_compile_check.py"), "--stages", "2",
                        "--sparse", "--dq", *dq, "--overlap", "0", "1", "--fixed"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    found = re.findall(r"\[(\w+):\w+:stages\d+(:overlap)?(:fixed)?\] compiled for sm90: num_warps=\d+ shared=(\d+) "
                       r"B.*?STACK:(\d+)", p.stdout, re.S)
    assert len(found) == 8 * len(dq), p.stdout
    assert all(int(shared) <= 232448 for *_, shared, _ in found), p.stdout
    if re.search(r"^triton 3\.6\.", p.stdout, re.M):
        assert all(stack == "0" for kind, ov, fx, _, stack in found if kind == "dense" and not ov and not fx), p.stdout


_HOPPER = torch.cuda.is_available() and gb.HAS_GLUON and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("dq_reduce", ["atomic", "tma"])
def test_gluon_backward_dense_gpu(dq_reduce):
    if dq_reduce == "tma" and not gb.HAS_TMA_REDUCE:
        pytest.skip("no TMA reduce-add in this Triton's Gluon")
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = 128 ** -0.5
    out, lse, ref = _grads(q, k, v, dout, scale)
    got = gb.gluon_attention_backward(q, k, v, out.to(q.dtype), dout, lse, scale, dq_reduce=dq_reduce)
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        assert _rel(g, r) < 1e-2


def _ragged_case(seed: int, H: int, q_ragged, drop_keys=()):
    """A random plan of six 384-token blocks (B=1, D=128, bf16, every query keeps key block 0): key blocks
    2 / 5 ragged (200 / 64 keys), query blocks ragged as ``q_ragged`` ``{block: rows}``, key blocks in
    ``drop_keys`` kept by no query and key block 4, if dropped, kept by query block 1 alone. Returns
    the plan, q, k, v, dout, and the Triton forward's out (contiguous), lse and scale."""
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options
    from video_sparse_attn.kernels.triton_fwd import attention_forward

    torch.manual_seed(seed)
    B, N, blk = 1, 6, 384
    mask = torch.rand(B, H, N, N, device="cuda") < 0.5
    mask[..., 0] = True
    for j in drop_keys:
        mask[..., j] = False
    if 4 in drop_keys:
        mask[..., 1, 4] = True
    k_valid = torch.full((1, N), blk, dtype=torch.int32, device="cuda")
    k_valid[0, 2], k_valid[0, 5] = 200, 64
    q_valid = torch.full((1, N), blk, dtype=torch.int32, device="cuda")
    for i, rows in q_ragged.items():
        q_valid[0, i] = rows
    plan = BlockSparsePlan.from_block_mask(mask, blk, blk, k_valid, q_valid)
    q, k, v, dout = (torch.randn(B, H, N * blk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = 128 ** -0.5
    out, lse = attention_forward(q, k, v, plan, scale, resolve_kernel_options(None))
    return plan, q, k, v, dout, out.contiguous(), lse, scale


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("dq_reduce", ["atomic", "tma"])
def test_gluon_backward_sparse_gpu(dq_reduce):
    """Against the Triton backward on a random plan of 384-token blocks with ragged key blocks and
    padded query rows."""
    if dq_reduce == "tma" and not gb.HAS_TMA_REDUCE:
        pytest.skip("no TMA reduce-add in this Triton's Gluon")
    from video_sparse_attn.kernels.triton_bwd import attention_backward
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options

    plan, q, k, v, dout, out, lse, scale = _ragged_case(0, 4, {1: 100, 4: 300})
    ref = attention_backward(q, k, v, out, lse, dout, plan, scale, resolve_kernel_options(None))
    got = gb.gluon_attention_backward(q, k, v, out, dout, lse, scale, plan=plan, dq_reduce=dq_reduce)
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        assert _rel(g, r) < 1e-2


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("dq_reduce", ["atomic", "tma"])
def test_gluon_backward_schedules_agree(dq_reduce):
    """Ring depth 2 / 3 and the walk that issues the next Sᵀ early (``overlap``) compute the same dK and
    dV bits (the same products in the same order) and dQ up to the order of its additions, on a plan
    with key blocks no query keeps (no steps), kept once (one step), ragged ones and padded queries;
    and dense."""
    if dq_reduce == "tma" and not gb.HAS_TMA_REDUCE:
        pytest.skip("no TMA reduce-add in this Triton's Gluon")
    plan, q, k, v, dout, out, lse, scale = _ragged_case(2, 3, {1: 100, 4: 0}, drop_keys=(3, 4))
    for p in (plan, None):
        runs = {(st, ov): gb.gluon_attention_backward(q, k, v, out, dout, lse, scale, plan=p, dq_reduce=dq_reduce,
                                                      stages=st, overlap=ov)
                for st in (2, 3) for ov in (False, True)}
        dq0, dk0, dv0 = runs[(2, False)]
        for key, (dq, dk, dv) in runs.items():
            assert torch.equal(dk, dk0) and torch.equal(dv, dv0), key
            assert _rel(dq, dq0) < 1e-4, (key, _rel(dq, dq0))


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("plan_b", [1, 2], ids=["broadcast", "per_batch"])
def test_wired_backward_ignores_padded_rows_and_matches_triton(plan_b):
    """The Triton backend's backward on Hopper (Gluon, option ``gluon``) against the Triton kernels
    (``gluon=False``): NaN in every padded query row of q and dout (the Triton kernels need finite values
    in padded rows of partly valid sub-tiles, so they get zeros there), large values in k / v past
    k_valid, ragged and empty key blocks, an lse gradient, B=2. It is the Gluon kernel that runs."""
    from video_sparse_attn.kernels.triton_bwd import gluon_backward_usable
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    B, H, N, blk, D = 2, 3, 6, 384, 128
    mask = torch.rand(plan_b, H, N, N, device="cuda", generator=g) < 0.5
    mask[..., 0] = True
    k_valid = torch.full((plan_b, N), blk, dtype=torch.int32, device="cuda")
    k_valid[:, 2], k_valid[:, 5], k_valid[:, 4] = 200, 64, 0
    q_valid = torch.full((plan_b, N), blk, dtype=torch.int32, device="cuda")
    q_valid[:, 1], q_valid[:, 3], q_valid[:, 4] = 100, 0, 300
    plan = BlockSparsePlan.from_block_mask(mask, blk, blk, k_valid, q_valid)
    q, k, v, dout = (torch.randn(B, H, N * blk, D, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    dlse = torch.randn(B, H, N * blk, device="cuda", generator=g)
    pad_q = ~plan.query_valid().expand(B, -1)[:, None, :, None]
    pad_k = ~plan.token_valid().expand(B, -1)[:, None, :, None]
    k.masked_fill_(pad_k, 300.0)
    v.masked_fill_(pad_k, -50.0)
    assert gluon_backward_usable(q, k, v, plan, resolve_kernel_options(None))
    results = {}
    for gluon in (True, False):
        fill = float("nan") if gluon else 0.0
        qi = q.masked_fill(pad_q, fill).requires_grad_()
        ki, vi = (x.detach().requires_grad_() for x in (k, v))
        out, lse = block_sparse_attention_triton(qi, ki, vi, plan, kernel_options={"gluon": gluon})
        assert not out.isnan().any()
        results[gluon] = torch.autograd.grad((out, lse), (qi, ki, vi), (dout.masked_fill(pad_q, fill), dlse))
    for name, a, b in zip(("dq", "dk", "dv"), results[True], results[False]):
        assert not a.isnan().any(), name
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))
    assert (results[True][0][pad_q.expand_as(q)] == 0).all()
    assert (results[True][1][pad_k.expand_as(k)] == 0).all() and (results[True][2][pad_k.expand_as(v)] == 0).all()


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
def test_wired_backward_finite_when_every_score_is_very_negative():
    """Rows whose every score is far below -88 (natural log) with a ragged key block: the zeroed keys past
    k_valid must not overflow P (exp of -lse) into inf and NaN gradients."""
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    B, H, N, blk, D = 1, 2, 3, 384, 128
    mask = torch.ones(B, H, N, N, dtype=torch.bool, device="cuda")
    k_valid = torch.tensor([[blk, 150, blk]], dtype=torch.int32, device="cuda")
    plan = BlockSparsePlan.from_block_mask(mask, blk, blk, k_valid)
    q = torch.full((B, H, N * blk, D), 4.0, device="cuda", dtype=torch.bfloat16)
    k = torch.full_like(q, -4.0) + 0.01 * torch.randn_like(q)          # scores ≈ -181
    v, dout = torch.randn_like(q), torch.randn_like(q)
    results = {}
    for gluon in (True, False):
        qi, ki, vi = (x.detach().requires_grad_() for x in (q, k, v))
        out, lse = block_sparse_attention_triton(qi, ki, vi, plan, kernel_options={"gluon": gluon})
        assert (lse < -100).all()
        results[gluon] = torch.autograd.grad(out, (qi, ki, vi), dout)
    for name, a, b in zip(("dq", "dk", "dv"), results[True], results[False]):
        assert torch.isfinite(a).all(), name
        if name != "dq":   # dq = Σ dS k with Σ dS = 0 and k ≈ -4 everywhere: rounding noise, in both kernels
            assert _rel(a, b) < 2e-2, (name, _rel(a, b))


def test_backward_support_reasons(monkeypatch):
    """What the wired Gluon backward refuses (so the Triton kernels run instead), the device half answered
    as a Hopper GPU would: one reason per limit, None for a call it runs."""
    import dataclasses

    monkeypatch.setattr(gb, "hopper_unsupported", lambda q, k, v: None)
    plan = BlockSparsePlan.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 384, 384)
    q = torch.zeros(1, 2, 768, 128, dtype=torch.bfloat16)
    assert gb.sparse_backward_unsupported(q, q, q, plan) is None
    assert "head dim" in gb.sparse_backward_unsupported(q[..., :64], q[..., :64], q[..., :64], plan)
    assert "shapes" in gb.sparse_backward_unsupported(q, q[:, :1], q[:, :1], plan)
    small = BlockSparsePlan.from_block_mask(torch.ones(1, 1, 12, 12, dtype=torch.bool), 64, 64)
    assert "multiples of 128" in gb.sparse_backward_unsupported(q, q, q, small)
    assert "cover" in gb.sparse_backward_unsupported(q[:, :, :384], q[:, :, :384], q[:, :, :384], plan)
    assert "window" in gb.sparse_backward_unsupported(q, q, q, dataclasses.replace(plan, window_hi=0))
    bias = dataclasses.replace(plan, key_bias=torch.zeros(1, 768))
    assert "bias" in gb.sparse_backward_unsupported(q, q, q, bias)


def test_step_table_kept_on_the_plan_and_its_compile_only_shapes():
    """The step table is built once per plan (kept on it); compiling only, meta tensors of the same shapes
    and dtypes stand in for it."""
    mask = torch.rand(2, 3, 4, 5) < 0.5
    q_valid = torch.tensor([[384, 100, 0, 384]], dtype=torch.int32)
    plan = BlockSparsePlan.from_block_mask(mask, 384, 384, q_valid=q_valid)
    first = gb._steps_for(plan, False)
    assert gb._steps_for(plan, False) is first
    meta = gb._steps_for(plan, True)
    for real, stand_in in zip(first, meta):
        assert stand_in.device.type == "meta" and stand_in.shape == real.shape and stand_in.dtype == real.dtype


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
def test_fixed_point_backward_is_bit_reproducible():
    """``dq_fixed``: three runs give the same bits (dense and a ragged plan); dK / dV are the stepwise
    walk's bits, dQ the float32 path's up to rounding; a NaN in one row of dout makes that row's dq NaN
    (its scale is 0), not 0. Both reductions (int32 atomics, TMA reduce-add) give the same bits."""
    plan, q, k, v, dout, out, lse, scale = _ragged_case(3, 4, {1: 100, 4: 300})
    modes = ("tma", "tma", "atomic") if gb.HAS_TMA_REDUCE else ("atomic", "atomic")
    for p in (plan, None):
        runs = [gb.gluon_attention_backward(q, k, v, out, dout, lse, scale, plan=p, dq_reduce=mode, dq_fixed=True)
                for mode in modes]
        for r in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))
        dq_f, dk_f, dv_f = gb.gluon_attention_backward(q, k, v, out, dout, lse, scale, plan=p, overlap=False)
        assert torch.equal(runs[0][1], dk_f) and torch.equal(runs[0][2], dv_f)
        assert torch.isfinite(runs[0][0]).all() and _rel(runs[0][0], dq_f) < 1e-3
    bad = dout.clone()
    bad[0, 1, 700, 5] = float("nan")
    for mode in set(modes):
        dq = gb.gluon_attention_backward(q, k, v, out, bad, lse, scale, dq_reduce=mode, dq_fixed=True)[0]
        assert torch.isnan(dq[0, 1, 700]).all() and torch.isfinite(dq[0, 0]).all()


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
def test_fixed_point_backward_limits_its_sequence(monkeypatch):
    """Past `FIXED_MAX_TERMS` key tiles the int32 sum could overflow: the kernel refuses, and the
    deterministic backward takes the Triton two passes there instead."""
    from video_sparse_attn.kernels.triton_bwd import gluon_backward_usable
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options

    plan, q, k, v, dout, out, lse, scale = _ragged_case(2, 2, {})
    options = resolve_kernel_options(None)
    assert gluon_backward_usable(q, k, v, plan, options, deterministic=True)
    monkeypatch.setattr(gb, "FIXED_MAX_TERMS", q.shape[2] // gb.BLOCK_N - 1)
    assert not gluon_backward_usable(q, k, v, plan, options, deterministic=True)
    assert gluon_backward_usable(q, k, v, plan, options, deterministic=False)
    with pytest.raises(ValueError, match="key tiles"):
        gb.gluon_attention_backward(q, k, v, out, dout, lse, scale, plan=plan, dq_fixed=True)


@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU and Gluon")
def test_wired_deterministic_backward_runs_gluon_fixed_point():
    """``deterministic=True`` on Hopper: the Gluon single pass in fixed point, the same bits twice, and
    the Triton two-pass kernels' gradients (``gluon=False``) up to rounding."""
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    plan, q, k, v, dout, _, _, _ = _ragged_case(4, 2, {2: 50})
    grads = {}
    for key, opts in (("a", {}), ("b", {}), ("triton", {"gluon": False})):
        qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = block_sparse_attention_triton(qi, ki, vi, plan, kernel_options=opts, deterministic=True)
        grads[key] = torch.autograd.grad(out, (qi, ki, vi), dout)
    assert all(torch.equal(a, b) for a, b in zip(grads["a"], grads["b"]))
    for a, b in zip(grads["a"], grads["triton"]):
        assert _rel(a, b) < 2e-2

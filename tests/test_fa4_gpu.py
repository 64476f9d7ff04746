"""FlashAttention-4 backend vs float64 references on the GPU (skipped without CUDA, sm90, or the extra)."""

import dataclasses

import pytest
import torch

from helpers import assert_grads_match, block_window_reference, rel_l2
from video_sparse_attn import BlockSparsePlan, SSTAConfig, block_sparse_attention, ssta_attention
from video_sparse_attn.kernels.registry import fa4_importable

pytestmark = pytest.mark.gpu


def _skip_unless_fa4():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the fa4 backend is run on sm90 here")
    reason = fa4_importable()
    if reason:
        pytest.skip(reason)


def _random_plan(B, H, Mq, Nk, qb, kb, density, device, broadcast):
    Bp, Hp = (1, 1) if broadcast else (B, H)
    mask = torch.rand(Bp, Hp, Mq, Nk, device=device) < density
    mask[..., 0, :] = True                     # one dense row
    mask[..., 1, :] = False                    # one empty row
    k_valid = torch.randint(0, kb + 1, (B, Nk), device=device, dtype=torch.int32)
    k_valid[:, 0] = kb
    q_valid = torch.randint(0, qb + 1, (B, Mq), device=device, dtype=torch.int32)
    q_valid[:, 2] = qb
    return BlockSparsePlan.from_block_mask(mask, qb, kb, k_valid, q_valid)


def _errors(fn, ref_fn, q, k, v, g):
    """(kernel error, PyTorch-in-dtype error) of out and of dq, dk, dv, each vs the float64 result."""
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = ref_fn(qd, kd, vd)
    ref_g = torch.autograd.grad((ref * g.double()).sum(), (qd, kd, vd))
    ql, kl, vl = (x.detach().float().requires_grad_() for x in (q, k, v))
    low, _ = ref_fn(ql, kl, vl)            # the torch backend in float32 on dtype-rounded inputs
    low = low.to(q.dtype)
    low_g = [x.to(q.dtype) for x in torch.autograd.grad((low.float() * g.float()).sum(), (ql, kl, vl))]
    out, lse = fn(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse[lse > float("-inf")]).all()
    got_g = torch.autograd.grad((out * g).sum(), (q, k, v))
    pairs = [(out, low, ref)] + list(zip(got_g, low_g, ref_g))
    return [(rel_l2(a, r), rel_l2(b, r)) for a, b, r in pairs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("qb, kb", [(128, 128), (384, 384), (256, 128)])
@pytest.mark.parametrize("broadcast", [False, True])
def test_fa4_matches_float64(dtype, D, qb, kb, broadcast):
    _skip_unless_fa4()
    torch.manual_seed(0)
    B, H, Mq, Nk = 2, 3, 5, 6
    plan = _random_plan(B, H, Mq, Nk, qb, kb, 0.4, "cuda", broadcast)
    q = torch.randn(B, Mq * qb, H, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()  # [B,S,H,D] view
    k = torch.randn(B, H, Nk * kb, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Nk * kb, D, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(B, H, Mq * qb, D, device="cuda", dtype=dtype)
    errs = _errors(lambda *x: block_sparse_attention(*x, plan, backend="fa4"),
                   lambda *x: block_sparse_attention(*x, plan.to("cuda"), backend="torch"), q, k, v, g)
    for name, (e, e_torch) in zip(("out", "dq", "dk", "dv"), errs):
        assert e <= 2 * e_torch + 1e-3, (name, e, e_torch)
    # rows past q_valid: out 0 and lse -inf, as the plan defines
    out, lse = block_sparse_attention(q, k, v, plan, backend="fa4")
    pad = ~plan.query_valid()
    assert (out.transpose(1, 2)[pad.expand(B, -1)] == 0).all()
    assert torch.isneginf(lse.transpose(1, 2)[pad.expand(B, -1)]).all()


def test_fa4_lse_gradient():
    _skip_unless_fa4()
    torch.manual_seed(1)
    B, H, M, bs, D = 1, 2, 4, 128, 128
    plan = _random_plan(B, H, M, M, bs, bs, 0.6, "cuda", False)
    q, k, v = (torch.randn(B, H, M * bs, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gl = torch.randn(B, H, M * bs, device="cuda")
    _, lse = block_sparse_attention(q, k, v, plan, backend="fa4")
    got = torch.autograd.grad((lse.masked_fill(torch.isinf(lse), 0) * gl).sum(), (q, k))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    _, lse_ref = block_sparse_attention(qd, kd, vd, plan, backend="torch")
    ref = torch.autograd.grad((lse_ref.masked_fill(torch.isinf(lse_ref), 0) * gl.double()).sum(), (qd, kd))
    for a, r in zip(got, ref):
        assert rel_l2(a, r) < 3e-2


@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_ssta_attention_fa4_equals_torch_backend(pad):
    """Padding-free SSTA through FA4 (384-token tiles, odd grid, text) vs the padded torch computation.
    STA masks (no data-dependent selection) so that both runs keep the very same blocks."""
    _skip_unless_fa4()
    torch.manual_seed(2)
    thw, L = (7, 11, 13), 200
    S = thw[0] * thw[1] * thw[2] + L
    q, k, v = (torch.randn(1, 4, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    tm = torch.zeros(1, L, dtype=torch.bool, device="cuda")
    tm[:, :150] = True
    cfg = SSTAConfig(tile_thw=(6, 8, 8), kernel_thw=(1, 1, 3), sparse_type="sta", pad_type=pad, caller_rules=False)
    out = ssta_attention(q, k, v, thw, cfg, L, tm, backend="fa4")
    ref = ssta_attention(*(x.double() for x in (q, k, v)), thw, cfg, L, tm, backend="torch", padding_free=False)
    assert rel_l2(out, ref) < 1.5e-2
    assert_grads_match(out, (q, k, v), ref, 3e-2)


def test_auto_picks_fa4_on_sm90():
    _skip_unless_fa4()
    from video_sparse_attn.attention import resolve_backend

    q = torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    plan = BlockSparsePlan.dense(1, 1, 1, 1, 128, device="cuda")
    assert resolve_backend("auto", q, plan) == "fa4"
    assert resolve_backend("auto", q.float(), plan) == "triton"          # fa4 runs half types only
    small = BlockSparsePlan.dense(1, 1, 8, 8, 16, device="cuda")
    assert resolve_backend("auto", q, small) == "triton"                   # 16-token blocks: not fa4


@pytest.mark.parametrize("window_hi", [None, 0])
def test_fa4_custom_ops_compile_fullgraph(window_hi):
    """Under torch.compile(fullgraph=True) the FA4 backend runs as custom ops (block lists built in the
    graph, with the window's row bounds when causal): the same output, lse and gradients as eager."""
    _skip_unless_fa4()
    torch._dynamo.reset()
    torch.manual_seed(3)
    plan = dataclasses.replace(_random_plan(1, 2, 4, 4, 128, 128, 0.6, "cuda", False), window_hi=window_hi)
    q, k, v = (torch.randn(1, 2, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def f(q, k, v, plan):
        out, lse = block_sparse_attention(q, k, v, plan, backend="fa4")
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*x, plan)
        g = torch.autograd.grad((out.float() ** 2).sum() + (lse ** 2).sum(), x)
        results.append((out, lse, g))
    (o1, l1, g1), (o2, l2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(g1, g2):            # dq is accumulated with atomics: equal up to summation order
        assert rel_l2(a, b) < 1e-2
    torch._dynamo.reset()


@pytest.mark.parametrize("Sq, Sk, kw", [
    (640, 640, dict(causal=True)), (500, 777, dict(causal=True)), (777, 500, dict(causal=True)),
    (700, 700, dict(window_size=(200, 0))), (600, 650, dict(window_size=(150, 100))),
    (384, 400, dict(causal=True, window_size=(300, -1))),
])
@pytest.mark.parametrize("qb, kb", [(128, 128), (256, 384)])
def test_fa4_causal_and_window_match_float64(Sq, Sk, kw, qb, kb):
    """Token-level causal / sliding windows through FA4 (diagonal sub-blocks masked by the mask_mod,
    ragged lengths), forward, backward and the lse, vs float64 dense attention."""
    _skip_unless_fa4()
    torch.manual_seed(Sq + Sk)
    B, H, D = 2, 2, 128
    mask = torch.rand(B, H, -(-Sq // qb), -(-Sk // kb), device="cuda") < 0.8
    q = torch.randn(B, H, Sq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, H, Sk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn(B, H, Sq, D, device="cuda", dtype=torch.bfloat16)
    errs = _errors(lambda *x: block_sparse_attention(*x, mask, q_block=qb, k_block=kb, backend="fa4", **kw),
                   lambda *x: block_sparse_attention(*x, mask, q_block=qb, k_block=kb, backend="torch", **kw),
                   q, k, v, g)
    for name, (e, e_torch) in zip(("out", "dq", "dk", "dv"), errs):
        assert e <= 2 * e_torch + 1e-3, (name, e, e_torch)
    out, lse = block_sparse_attention(q, k, v, mask, q_block=qb, k_block=kb, backend="fa4", **kw)
    ref, ref_lse = block_window_reference(q, k, v, mask, qb, kb, **kw)
    ok = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), ok)                  # rows that see no key: -inf
    assert rel_l2(lse[ok], ref_lse[ok]) < 1e-2 and rel_l2(out, ref) < 2e-2
    gl = torch.randn_like(lse).masked_fill(~ok, 0)
    got = torch.autograd.grad((lse.masked_fill(~ok, 0) * gl).sum(), (q, k))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    _, lse_d = block_window_reference(qd, kd, vd, mask, qb, kb, **kw)
    exp = torch.autograd.grad((lse_d.masked_fill(~ok, 0) * gl.double()).sum(), (qd, kd))
    for a, r in zip(got, exp):
        assert rel_l2(a, r) < 3e-2


def test_fa4_window_runs_under_auto():
    _skip_unless_fa4()
    from video_sparse_attn.attention import resolve_backend

    q = torch.randn(1, 1, 256, 128, device="cuda", dtype=torch.bfloat16)
    plan = dataclasses.replace(BlockSparsePlan.dense(1, 1, 2, 2, 128, device="cuda"), window_hi=0)
    assert resolve_backend("auto", q, plan) == "fa4"

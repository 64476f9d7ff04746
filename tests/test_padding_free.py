"""Padding-free SSTA equals the padded computation: outputs and gradients, every pad type, odd grids."""

import pytest
import torch

from helpers import assert_grads_match, rel_l2
from video_sparse_attn import SSTAConfig, ssta_attention
from video_sparse_attn.padding_free import add_zero_keys

CASES = [  # thw, tile, text_len, sparse_type
    ((3, 5, 7), (2, 4, 4), 11, "ssta"),
    ((5, 6, 5), (2, 4, 4), 0, "sta"),
    ((2, 9, 6), (2, 4, 4), 40, "dense"),
    ((4, 3, 10), (4, 4, 2), 19, "block_attn"),
]


def _inputs(thw, text_len, B=2, H=2, D=8):
    S = thw[0] * thw[1] * thw[2] + text_len
    return [torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("thw, tile, text_len, sparse_type", CASES)
@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_padding_free_equals_padded_torch_backend(thw, tile, text_len, sparse_type, pad):
    q, k, v = _inputs(thw, text_len)
    tm = None
    if text_len:
        tm = torch.zeros(q.shape[0], text_len, dtype=torch.bool)
        tm[0, : text_len - 3] = True
        tm[1, : max(1, text_len // 2)] = True
    cfg = SSTAConfig(tile_thw=tile, kernel_thw=(1, 3, 1), topk=2, sparse_type=sparse_type, pad_type=pad,
                     caller_rules=False)
    g = torch.randn_like(q)
    outs, grads = [], []
    for pf in (False, True):
        out, info = ssta_attention(q, k, v, thw, cfg, text_len, tm, backend="torch", return_info=True,
                                   padding_free=pf, strict_tiles=False)   # a tile longer than h on purpose
        outs.append(out)
        grads.append(torch.autograd.grad((out * g).sum(), (q, k, v)))
        if pf:   # padded query rows and padded video keys are really dropped from the plan
            assert int(info.plan.q_valid.sum()) == q.shape[2]
            skipped = int((info.plan.k_valid < info.plan.k_block).sum())
            assert (skipped > 0) == info.layout.has_video_padding or pad == "mask"
            assert (info.plan.key_bias is not None) == (pad == "repeat" and info.layout.has_video_padding)
    assert rel_l2(outs[1], outs[0]) < 1e-12
    for a, b in zip(grads[1], grads[0]):
        assert rel_l2(a, b) < 1e-10


REPEAT_CASES = [  # thw, tile, text_len, text mask: tiles overhanging in t, h, w and all three (corners)
    ((3, 5, 7), (2, 4, 4), 11, True),
    ((3, 5, 7), (2, 4, 4), 11, False),
    ((5, 6, 4), (2, 4, 4), 0, False),
    ((4, 9, 5), (4, 4, 4), 19, True),
]


def _repeat_cfg(tile, sparse_type="ssta"):
    return SSTAConfig(tile_thw=tile, kernel_thw=(1, 1, 3), topk=2, sparse_type=sparse_type, pad_type="repeat",
                      caller_rules=False)


def _text_mask(B, L):
    if not L:
        return None
    tm = torch.zeros(B, L, dtype=torch.bool)
    tm[0, : L - 3] = True
    tm[1, : max(1, L // 2)] = True
    return tm


@pytest.mark.parametrize("thw, tile, text_len, with_mask", REPEAT_CASES)
def test_repeat_keys_skipped_exactly_torch_backend(thw, tile, text_len, with_mask):
    """pad_type="repeat", padding-free: only the real keys are loaded, each weighted by its multiplicity
    (`TileLayout.key_bias`); output and gradients of q, k, v equal the padded computation (float64)."""
    q, k, v = _inputs(thw, text_len)
    tm = _text_mask(2, text_len) if with_mask else None
    cfg = _repeat_cfg(tile)
    out, info = ssta_attention(q, k, v, thw, cfg, text_len, tm, backend="torch", return_info=True)
    ref = ssta_attention(q, k, v, thw, cfg, text_len, tm, backend="torch", padding_free=False)
    lay = info.layout
    assert info.plan.key_bias is not None and info.plan.key_bias.dtype == torch.float64
    assert torch.equal(info.plan.k_valid, lay.key_valid(None, "cpu", padding_free=True))
    assert int(info.plan.k_valid[0, : lay.num_video_blocks].sum()) == lay.num_video_tokens   # no copy is a key
    assert rel_l2(out, ref) < 1e-12
    assert_grads_match(out, (q, k, v), ref, 1e-10)


@pytest.mark.interpreter
@pytest.mark.parametrize("thw, tile, text_len, with_mask, dtype", [
    (*REPEAT_CASES[0], torch.float32), (*REPEAT_CASES[1], torch.float16), (*REPEAT_CASES[2], torch.float32),
    (*REPEAT_CASES[3], torch.float32)])
def test_repeat_keys_skipped_exactly_triton_interpreter(thw, tile, text_len, with_mask, dtype):
    """The same through the Triton kernels (interpreted; fp32 / fp16, the interpreter's bf16 dot is
    wrong): the bias reaches the forward and both backward kernels."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in _inputs(thw, text_len, D=16))
    tm = _text_mask(2, text_len) if with_mask else None
    cfg = _repeat_cfg(tile)
    out, info = ssta_attention(q, k, v, thw, cfg, text_len, tm, backend="triton", return_info=True)
    assert info.plan.key_bias is not None and info.plan.key_bias.dtype == torch.float32
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = ssta_attention(qd, kd, vd, thw, cfg, text_len, tm, backend="torch", padding_free=False)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_l2(out, ref) < tol
    assert_grads_match(out, (q, k, v), ref, tol, ref_inputs=(qd, kd, vd))


def test_repeat_keys_stay_keys_on_a_backend_without_key_bias(monkeypatch):
    """A backend that cannot add the bias (`BackendSpec.key_bias` False, as FA4) loads the copies as keys:
    no bias in the plan, every slot of a tile a key, the same result."""
    import dataclasses

    from video_sparse_attn.kernels import registry

    thw, tile, L, _ = REPEAT_CASES[0]
    q, k, v = _inputs(thw, L)
    cfg = _repeat_cfg(tile)
    with_bias = ssta_attention(q, k, v, thw, cfg, L, backend="torch")
    monkeypatch.setitem(registry.BACKENDS, "torch", dataclasses.replace(registry.BACKENDS["torch"], key_bias=False))
    out, info = ssta_attention(q, k, v, thw, cfg, L, backend="torch", return_info=True)
    assert info.plan.key_bias is None and (info.plan.k_valid == info.layout.tile_volume).all()
    assert int(info.plan.q_valid.sum()) == q.shape[2]                  # padded queries are still skipped
    assert rel_l2(out, with_bias) < 1e-12


def test_repeat_keys_skipped_in_a_forward_only_where_that_pays(monkeypatch):
    """`BackendSpec.key_bias_forward` False (Triton: its forward is slower with the bias): the copies are
    skipped only when a backward follows (inputs that need gradients, grad mode on); a forward alone
    loads them. Both give the same output."""
    import dataclasses

    from video_sparse_attn.kernels import registry

    thw, tile, L, _ = REPEAT_CASES[0]
    q, k, v = _inputs(thw, L)
    cfg = _repeat_cfg(tile)
    monkeypatch.setitem(registry.BACKENDS, "torch",
                        dataclasses.replace(registry.BACKENDS["torch"], key_bias_forward=False))
    trained, info = ssta_attention(q, k, v, thw, cfg, L, backend="torch", return_info=True)
    assert info.plan.key_bias is not None                               # a backward follows: skipped
    with torch.no_grad():
        served, info = ssta_attention(q, k, v, thw, cfg, L, backend="torch", return_info=True)
    assert info.plan.key_bias is None and (info.plan.k_valid == info.layout.tile_volume).all()
    detached = [x.detach() for x in (q, k, v)]
    info = ssta_attention(*detached, thw, cfg, L, backend="torch", return_info=True)[1]
    assert info.plan.key_bias is None                                   # no input needs a gradient
    assert rel_l2(served, trained.detach()) < 1e-12
    assert registry.BACKENDS["triton"].key_bias and not registry.BACKENDS["triton"].key_bias_forward


def test_a_dropped_or_misplaced_key_bias_is_caught(monkeypatch):
    """The equality above depends on the bias: without it, or with it on text slots too, the result
    moves far from the padded computation."""
    from video_sparse_attn import layout as layout_mod

    thw, tile, L, _ = REPEAT_CASES[0]
    q, k, v = _inputs(thw, L)
    cfg = _repeat_cfg(tile, "dense")
    ref = ssta_attention(q, k, v, thw, cfg, L, backend="torch", padding_free=False)
    real = layout_mod.TileLayout.key_bias
    lay = layout_mod.TileLayout(thw, tile, L, "repeat")
    text = torch.arange(lay.padded_len) >= lay.num_video_blocks * lay.block_size
    for wrong in (lambda self, d, dt=torch.float32: torch.zeros_like(real(self, d, dt)),
                  lambda self, d, dt=torch.float32: real(self, d, dt) + text.to(dt) * 0.7):
        monkeypatch.setattr(layout_mod.TileLayout, "key_bias", wrong)
        assert rel_l2(ssta_attention(q, k, v, thw, cfg, L, backend="torch"), ref) > 1e-3


def test_add_zero_keys_matches_explicit_zero_keys():
    """Appending n explicit zero keys (logit 0, value 0) to dense attention == the LSE correction."""
    B, H, S, D, blk = 1, 2, 12, 4, 4
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    n = torch.tensor([[[0.0, 3.0, 7.0]]], dtype=torch.float64).expand(1, H, 3)
    s = q @ k.transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v
    got, got_lse = add_zero_keys(out, lse, n, blk)
    n_row = n.repeat_interleave(blk, -1)
    ref_lse = torch.logaddexp(lse, torch.log(n_row))                        # n = 0 → log 0 = -inf: unchanged
    ref = out * torch.exp(lse - ref_lse)[..., None]
    assert rel_l2(got, ref) < 1e-14 and rel_l2(got_lse, ref_lse) < 1e-14
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    a = torch.autograd.grad((got * g).sum() + (got_lse * gl).sum(), (q, k, v), retain_graph=True)
    b = torch.autograd.grad((ref * g).sum() + (ref_lse * gl).sum(), (q, k, v))
    for x, y in zip(a, b):
        assert rel_l2(x, y) < 1e-12


def test_add_zero_keys_keyless_rows_stay_finite():
    out = torch.zeros(1, 1, 4, 2, dtype=torch.float64, requires_grad=True)
    lse = torch.full((1, 1, 4), float("-inf"), dtype=torch.float64, requires_grad=True)
    n = torch.tensor([[[0.0, 5.0]]], dtype=torch.float64)
    o, l_ = add_zero_keys(out, lse, n, 2)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.isinf(l_[..., :2]).all() and torch.allclose(l_[..., 2:], torch.log(torch.tensor(5.0)).double())
    go, gl = torch.autograd.grad((o.sum() + l_[..., 2:].sum()), (out, lse))
    assert torch.isfinite(go).all() and torch.isfinite(gl).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_padding_free_through_triton_interpreter(pad):
    """The Triton kernels (interpreted, fp32) with padded query rows skipped and zero keys added back
    equal the padded torch computation: outputs and gradients."""
    thw, tile, L = (3, 5, 6), (2, 4, 4), 9
    q, k, v = (x.detach().float().requires_grad_() for x in _inputs(thw, L, B=1, H=2, D=16))
    cfg = SSTAConfig(tile_thw=tile, kernel_thw=(1, 1, 1), sparse_type="sta", pad_type=pad, caller_rules=False)
    out = ssta_attention(q, k, v, thw, cfg, L, backend="triton")
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = ssta_attention(qd, kd, vd, thw, cfg, L, backend="torch", padding_free=False)
    assert rel_l2(out, ref) < 1e-5
    assert_grads_match(out, (q, k, v), ref, 1e-5, ref_inputs=(qd, kd, vd))


@pytest.mark.gpu
@pytest.mark.parametrize("pad, backend", [("zero", "auto"), ("repeat", "auto"), ("repeat", "triton")])
def test_bf16_padding_free_gradients_on_gpu(pad, backend):
    """bf16 through a GPU backend, padding-free, on a grid whose padding copies one token many times
    (text padding, repeat padding: through Triton its copies are skipped, their weight a key bias):
    gradients within bf16 error of the float64 padded result."""
    thw, L = (5, 9, 11), 70
    S = thw[0] * thw[1] * thw[2] + L
    q, k, v = (torch.randn(1, 2, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cfg = SSTAConfig(tile_thw=(2, 8, 8), kernel_thw=(1, 1, 1), sparse_type="sta", pad_type=pad, caller_rules=False)
    out, info = ssta_attention(q, k, v, thw, cfg, L, backend=backend, return_info=True)
    if backend == "triton":
        assert info.plan.key_bias is not None
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = ssta_attention(qd, kd, vd, thw, cfg, L, backend="torch", padding_free=False)
    assert rel_l2(out, ref) < 1e-2
    assert_grads_match(out, (q, k, v), ref, 2e-2, ref_inputs=(qd, kd, vd))


@pytest.mark.interpreter
@pytest.mark.parametrize("grid, tile, L, D, bshd", [((3, 5, 6), (2, 4, 4), 7, 16, False),
                                                    ((2, 3, 5), (2, 3, 3), 20, 24, True)])
def test_fused_untile_with_zero_keys_kernels(grid, tile, L, D, bshd):
    """The fused Triton untile + zero-key correction (interpreted, fp32) equals `untile(add_zero_keys(...))`
    in float64, forward and both gradients; keyless rows (lse = -inf), head-broadcast counts, and a
    ``[B, S, H, D]``-strided result when asked for."""
    from video_sparse_attn import TileLayout
    from video_sparse_attn.kernels.triton_untile import untile_scaled_bwd, untile_scaled_fwd

    lay = TileLayout(grid, tile, L, "zero")
    B, H, P, bs = 2, 3, lay.padded_len, lay.block_size
    x = torch.randn(B, P, H, D, dtype=torch.float64).transpose(1, 2) if bshd else torch.randn(B, H, P, D).double()
    lse = torch.randn(B, H, P, dtype=torch.float64)
    lse[0, 0, :5] = float("-inf")
    n = torch.randint(0, 5, (1, H, P // bs)).double()
    x.requires_grad_()
    lse.requires_grad_()
    idx = lay.indices("cpu")
    like = torch.empty(B, lay.seq_len, H, D).transpose(1, 2) if bshd else torch.empty(B, H, lay.seq_len, D)
    y = untile_scaled_fwd(x.detach().float(), lse.detach().float(), n.float(), idx["inverse"], bs, like)
    ref = lay.untile(add_zero_keys(x, lse, n, bs)[0])
    assert y.stride() == like.stride()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    dx_ref, dl_ref = torch.autograd.grad(ref, (x, lse), g)
    dx, dl = untile_scaled_bwd(g.float(), x.detach().float(), lse.detach().float(), n.float(), idx["owner"], bs)
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dl.double(), dl_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key_tile", [16, 32])
def test_zero_keys_loaded_by_whole_key_tiles_stay_exact(monkeypatch, key_tile):
    """A backend that computes keys in tiles (`BackendSpec.key_tile`, FA4: 128) loads the zero keys of a
    tile it loads anyway and skips the rest: still equal to the padded computation (float64)."""
    import dataclasses

    from video_sparse_attn.kernels import registry

    monkeypatch.setitem(registry.BACKENDS, "torch", dataclasses.replace(registry.BACKENDS["torch"], key_tile=key_tile))
    thw, tile, L = (3, 5, 7), (2, 4, 4), 11          # tiles of 32 keys holding 8 to 32 real tokens
    q, k, v = _inputs(thw, L)
    cfg = SSTAConfig(tile_thw=tile, kernel_thw=(1, 3, 3), topk=2, pad_type="zero", caller_rules=False)
    out = ssta_attention(q, k, v, thw, cfg, L, backend="torch")
    ref = ssta_attention(q, k, v, thw, cfg, L, backend="torch", padding_free=False)
    assert rel_l2(out, ref) < 1e-12
    assert_grads_match(out, (q, k, v), ref, 1e-12)


def test_fa4_loads_whole_key_tiles_so_video_keys_need_no_mask_blocks():
    """At 720p/121f with 384-token tiles (3 FA4 sub-blocks), loading zero keys by whole 128-token tiles
    leaves no partly valid video key sub-block: FA4 runs no mask block (with single keys it runs many)."""
    from video_sparse_attn import BlockSparsePlan, TileLayout
    from video_sparse_attn.kernels.fa4 import fa4_block_lists
    from video_sparse_attn.kernels.registry import BACKENDS

    thw = (31, 45, 80)
    cfg = SSTAConfig().for_thw(thw)
    lay = TileLayout(thw, cfg.tile_thw, 1985, cfg.pad_type)
    N, bs = lay.num_blocks, lay.block_size
    mask = torch.rand(1, 1, N, N) < 0.2
    mask[..., N - lay.num_text_blocks:] = True
    counts = {}
    for key_tile in (1, BACKENDS["fa4"].key_tile):
        plan = BlockSparsePlan.from_block_mask(mask, bs, bs, lay.key_valid(None, "cpu", True, key_tile),
                                               lay.query_valid("cpu"))
        lists = fa4_block_lists(plan, 1, cache=False)
        counts[key_tile] = (int(lists.fwd[0].sum()), int(lists.bwd[0].sum()))
        assert torch.equal(lay.zero_keys("cpu", key_tile)[: lay.num_video_blocks],
                           (lay.tile_volume - plan.k_valid[0, : lay.num_video_blocks]).float())
    assert counts[128] == (0, 0) and min(counts[1]) > 0

"""The text-first block order (`BackendSpec.text_first`, `TileLayout.to_text_first`): SSTA run with its
text blocks first equals the tile-order run — outputs, lse and gradients, every pad type, padded and
padding-free, with and without tile means — and the layout's text-first indices are the rotation."""

import dataclasses

import pytest
import torch

from helpers import rel_l2
from video_sparse_attn import SSTAConfig, TileLayout, ssta_attention
from video_sparse_attn.kernels import registry

CASES = [  # thw, tile, text_len, sparse_type, adaptive_pool (sub-cube pooling: the selection reads q_t itself)
    ((3, 5, 7), (2, 4, 4), 11, "ssta", None),
    ((4, 3, 10), (4, 4, 2), 40, "block_attn", None),
    ((3, 5, 6), (2, 4, 4), 19, "ssta", (2, 2, 2)),
    ((2, 9, 6), (2, 4, 4), 33, "dense", None),
]


@pytest.fixture
def torch_text_first(monkeypatch):
    """The torch backend declared ``text_first`` (as FA4 is), so that the CPU suite runs that order."""
    spec = dataclasses.replace(registry.BACKENDS["torch"], text_first=True)
    monkeypatch.setitem(registry.BACKENDS, "torch", spec)
    return spec


def _run(q, k, v, thw, cfg, L, tm, pf, g, glse):
    out, lse, info = ssta_attention(q, k, v, thw, cfg, L, tm, backend="torch", return_info=True, return_lse=True,
                                    padding_free=pf, strict_tiles=False)
    grads = torch.autograd.grad((out * g).sum() + (torch.where(lse.isfinite(), lse, 0) * glse).sum(), (q, k, v))
    return out, lse, grads, info


@pytest.mark.parametrize("thw, tile, L, sparse_type, pool", CASES)
@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
@pytest.mark.parametrize("pf", [False, True], ids=["padded", "padding_free"])
def test_text_first_equals_tile_order(thw, tile, L, sparse_type, pool, pad, pf, monkeypatch):
    torch.manual_seed(0)
    S = thw[0] * thw[1] * thw[2] + L
    q, k, v = (torch.randn(2, 2, S, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    tm = torch.zeros(2, L, dtype=torch.bool)
    tm[0, : L - 3] = True
    tm[1, : L // 2] = True
    extra = {} if pool is None else {"adaptive_pool": pool, "sampling_type": "similarity"}
    cfg = SSTAConfig(tile_thw=tile, kernel_thw=(1, 3, 1), topk=2, sparse_type=sparse_type, pad_type=pad,
                     caller_rules=False, **extra)
    g, glse = torch.randn_like(q), torch.randn(q.shape[:3], dtype=torch.float64)
    ref = _run(q, k, v, thw, cfg, L, tm, pf, g, glse)
    monkeypatch.setitem(registry.BACKENDS, "torch", dataclasses.replace(registry.BACKENDS["torch"], text_first=True))
    got = _run(q, k, v, thw, cfg, L, tm, pf, g, glse)
    layout = got[3].layout
    assert got[3].text_first and not ref[3].text_first
    assert torch.equal(got[3].block_mask, ref[3].block_mask)                       # the mask stays in tile order
    assert torch.equal(got[3].plan.q_valid, layout.to_text_first(ref[3].plan.q_valid))
    assert torch.equal(got[3].plan.kv_count, layout.to_text_first(ref[3].plan.kv_count))
    assert rel_l2(got[0], ref[0]) < 1e-12
    assert torch.equal(got[1].isfinite(), ref[1].isfinite())
    fin = ref[1].isfinite()
    assert rel_l2(got[1][fin], ref[1][fin]) < 1e-12
    for a, b in zip(got[2], ref[2]):
        assert rel_l2(a, b) < 1e-10


def test_text_first_without_text_is_tile_order(torch_text_first):
    q, k, v = (torch.randn(1, 2, 3 * 5 * 7, 8, dtype=torch.float64) for _ in range(3))
    cfg = SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 3, 1), topk=2, caller_rules=False)
    out, info = ssta_attention(q, k, v, (3, 5, 7), cfg, backend="torch", return_info=True, strict_tiles=False)
    assert not info.text_first


@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_text_first_indices_are_the_rotation(pad):
    """Each per-slot index is the block-order one rotated by the text slots; tiling in text-first order is
    the rotation of tiling in block order, untile inverts it, tile means are the same (video tile order)."""
    lay = TileLayout((3, 5, 7), (2, 4, 4), 23, pad)
    a, b = lay.indices("cpu"), lay.indices("cpu", text_first=True)
    for name in ("src", "kernel_src", "owner", "key_mult", "key_bias"):
        assert torch.equal(b[name], lay.to_text_first(a[name], slots=True)), name
    assert torch.equal(b["query_valid"], lay.to_text_first(a["query_valid"]))
    x = torch.randn(2, 3, lay.seq_len, 4)
    y, m = lay.tile_with_means(x)
    y_tf, m_tf = lay.tile_with_means(x, text_first=True)
    assert torch.equal(y_tf, lay.to_text_first(y, 2, slots=True))
    assert torch.equal(m_tf, m)
    assert torch.equal(lay.untile(y_tf, text_first=True), x)
    # duplicates (repeat copies, text padding copies) sum their gradients to the same tokens
    xg = x.double().requires_grad_()
    g = torch.randn(y.shape, dtype=torch.float64)
    (ga,) = torch.autograd.grad((lay.tile(xg) * g).sum(), xg)
    (gb,) = torch.autograd.grad((lay.tile(xg, text_first=True) * lay.to_text_first(g, 2, slots=True)).sum(), xg)
    assert torch.allclose(ga, gb, rtol=0, atol=1e-12)


@pytest.mark.interpreter
def test_gather_means_from_a_later_group():
    """The Triton gather's means of groups ``mean_group0 ...`` (the video tiles behind the text blocks)."""
    from video_sparse_attn.kernels.triton_gather import gather_rows_with_means

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lay = TileLayout((3, 5, 6), (2, 4, 4), 40, "zero")
    x = torch.randn(1, 2, lay.seq_len, 16, device=dev)
    src = lay.indices(dev, text_first=True)["kernel_src"]
    y, means = gather_rows_with_means(x, src, lay.block_size, lay.num_video_blocks, lay.tile_volume,
                                      lay.num_text_blocks)
    _, ref_means = lay.tile_with_means(x.cpu())
    torch.testing.assert_close(means.cpu(), ref_means, rtol=1e-5, atol=1e-6)


def test_text_first_compiles_fullgraph(torch_text_first, monkeypatch):
    """Under `torch.compile(fullgraph=True)` the text-first indices are built in the graph (static shapes):
    the compiled text-first call equals the eager tile-order one, forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 3, 1), topk=2, caller_rules=False)
    thw, L = (3, 6, 8), 7
    q, k, v = (torch.randn(2, 2, 3 * 6 * 8 + L, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    tm = torch.arange(L)[None] < torch.tensor([[7], [3]])
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda q, k, v: ssta_attention(q, k, v, thw, cfg, L, tm, backend="torch"),
                             fullgraph=True, dynamic=False, backend=cnt)
    g = torch.randn_like(q)
    out = compiled(q, k, v)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    monkeypatch.setitem(registry.BACKENDS, "torch", dataclasses.replace(torch_text_first, text_first=False))
    ref = ssta_attention(q, k, v, thw, cfg, L, tm, backend="torch")
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    assert cnt.frame_count == 1
    assert rel_l2(out, ref) < 1e-12
    for a, b in zip(grads, ref_grads):
        assert rel_l2(a, b) < 1e-10

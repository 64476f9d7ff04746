"""Tile reorder / inverse, padding values, and per-block key validity."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from video_sparse_attn import TileLayout

GRIDS = [((4, 8, 8), (2, 4, 4)), ((5, 9, 10), (4, 4, 4)), ((3, 9, 13), (2, 4, 4)), ((1, 5, 7), (1, 4, 4)),
         ((7, 3, 2), (2, 4, 4))]


def _reference_tile(x, grid, tile, text_len, pad):
    """Pad (zero or replicate) each axis, reorder tiles with einops, pad text by its last token."""
    B, H, S, D = x.shape
    t, h, w = grid
    vid = x[:, :, : t * h * w].reshape(B * H, t, h, w, D).permute(0, 4, 1, 2, 3)
    pads = [(-g) % s for g, s in zip(grid, tile)]
    vid = F.pad(vid, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate" if pad == "repeat" else "constant")
    vid = vid.permute(0, 2, 3, 4, 1)
    vid = rearrange(vid, "b (nt tt) (nh th) (nw tw) d -> b (nt nh nw tt th tw) d", tt=tile[0], th=tile[1], tw=tile[2])
    vid = vid.reshape(B, H, -1, D)
    bs = tile[0] * tile[1] * tile[2]
    text = x[:, :, t * h * w:]
    if text_len:
        extra = (-text_len) % bs
        text = torch.cat([text, text[:, :, -1:].expand(B, H, extra, D)], dim=2)
    return torch.cat([vid, text], dim=2)


@pytest.mark.parametrize("grid, tile", GRIDS)
@pytest.mark.parametrize("pad", ["zero", "repeat"])
@pytest.mark.parametrize("text_len", [0, 5, 32])
def test_tile_matches_pad_and_einops(grid, tile, pad, text_len):
    x = torch.randn(2, 3, grid[0] * grid[1] * grid[2] + text_len, 4, dtype=torch.float64)
    lay = TileLayout(grid, tile, text_len, pad)
    y = lay.tile(x)
    assert y.shape[2] == lay.padded_len
    ref = _reference_tile(x, grid, tile, text_len, pad)
    # slots inside a tile hold the tile's raster positions permuted (real tokens first)
    bs, Nv = lay.block_size, lay.num_video_blocks
    perm = (torch.arange(Nv)[:, None] * bs + lay.indices("cpu")["slot_raster"]).flatten()
    ref = torch.cat([ref[:, :, perm], ref[:, :, Nv * bs:]], dim=2)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(lay.untile(y), x, rtol=0, atol=0)


@pytest.mark.parametrize("grid, tile", GRIDS)
def test_mask_layout_puts_valid_tokens_first(grid, tile):
    text_len = 21
    x = torch.randn(1, 2, grid[0] * grid[1] * grid[2] + text_len, 4)
    lay = TileLayout(grid, tile, text_len, "mask")
    ref = _reference_tile(x, grid, tile, text_len, "zero")
    y = lay.tile(x)
    bs, Nv = lay.block_size, lay.num_video_blocks
    k_valid = lay.key_valid(None, "cpu")[0]
    for n in range(Nv):
        blk, rblk = y[0, :, n * bs:(n + 1) * bs], ref[0, :, n * bs:(n + 1) * bs]
        c = int(k_valid[n])
        assert torch.all(blk[:, c:] == 0)
        # the valid slots hold exactly the tile's real tokens, in raster order
        assert torch.equal(blk[:, :c], rblk[:, lay.indices("cpu")["slot_raster"][n, :c]])
    assert int(k_valid[:Nv].sum()) == grid[0] * grid[1] * grid[2]
    assert k_valid[Nv:].tolist() == [min(bs, text_len - j * bs) for j in range(lay.num_text_blocks)]
    torch.testing.assert_close(lay.untile(y), x, rtol=0, atol=0)


def test_key_valid_with_text_mask_counts_per_sample():
    lay = TileLayout((2, 4, 4), (2, 4, 4), 40, "mask")
    tm = torch.zeros(3, 40, dtype=torch.bool)
    tm[0, :40] = True
    tm[1, :33] = True
    tm[2, :0] = True
    kv = lay.key_valid(tm, "cpu")
    assert kv.tolist() == [[32, 32, 8], [32, 32, 1], [32, 0, 0]]
    assert TileLayout((2, 4, 4), (2, 4, 4), 40, "zero").key_valid(tm, "cpu").tolist() == [[32, 32, 32]]


@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_query_valid_key_valid_and_zero_keys_per_pad_type(pad):
    lay = TileLayout((3, 5, 4), (2, 4, 4), 40, pad)              # tiles: 2 x 2 x 1 = 4, 32 tokens each
    real = [32, 8, 16, 4]                                          # real tokens of each video tile
    assert lay.query_valid("cpu").tolist() == [real + [32, 8]]     # text: 40 = 32 + 8
    kv_pf = lay.key_valid(None, "cpu", padding_free=True).tolist()
    kv = lay.key_valid(None, "cpu").tolist()
    zk = lay.zero_keys("cpu").tolist()
    if pad == "zero":
        assert kv == [[32] * 6] and kv_pf == [real + [32, 32]]
        assert zk == [0.0, 24.0, 16.0, 28.0, 0.0, 0.0]
    elif pad == "repeat":
        assert kv == [[32] * 6] and kv_pf == [real + [32, 32]] and zk == [0.0] * 6
    else:
        assert kv == kv_pf == [real + [32, 8]] and zk == [0.0] * 6
    # the first `real` slots of every tile are real tokens, the rest padding
    src = lay.indices("cpu")["src"][: 4 * 32].view(4, 32)
    zero_pos = set(lay.indices("cpu")["zero_pos"].tolist())
    for n, c in enumerate(real):
        if pad != "repeat":
            assert all(n * 32 + i in zero_pos for i in range(c, 32))
            assert not any(n * 32 + i in zero_pos for i in range(c))
        assert len(set(src[n, :c].tolist())) == c


def test_sequence_mismatch_is_reported_with_both_numbers():
    lay = TileLayout((2, 4, 4), (2, 4, 4), 8)
    with pytest.raises(ValueError, match=r"sequence length 39 != t\*h\*w \+ text_len = 2\*4\*4 \+ 8 = 40"):
        lay.tile(torch.zeros(1, 1, 39, 4))


def test_tile_accepts_strided_views():
    x = torch.randn(2, 40, 3, 8)  # diffusers layout [B, S, H, D]
    lay = TileLayout((2, 4, 4), (2, 4, 4), 8, "zero")
    torch.testing.assert_close(lay.tile(x.transpose(1, 2)), lay.tile(x.transpose(1, 2).contiguous()))


@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_tile_and_untile_gradients(pad):
    grid, tile, L = (3, 3, 5), (2, 2, 4), 7
    x = torch.randn(1, 2, 45 + L, 2, dtype=torch.float64, requires_grad=True)
    lay = TileLayout(grid, tile, L, pad)
    assert torch.autograd.gradcheck(lambda a: lay.tile(a), (x,), fast_mode=True)
    y = torch.randn(1, 2, lay.padded_len, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: lay.untile(a), (y,), fast_mode=True)


def test_tile_of_bf16_rows_uses_the_same_values():
    x = torch.randn(1, 3, 4 * 8 * 8 + 3, 16, dtype=torch.bfloat16)
    lay = TileLayout((4, 8, 8), (2, 4, 4), 3)
    ref = _reference_tile(x.double(), (4, 8, 8), (2, 4, 4), 3, "zero").bfloat16()
    assert torch.equal(lay.tile(x), ref)
    assert torch.equal(lay.tile(x.transpose(1, 2).contiguous().transpose(1, 2)), ref)


@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_half_precision_gradients_of_copied_tokens_are_summed_in_float32(pad):
    """A token copied into many slots (repeat padding, text padding) gets the sum of their gradients,
    accumulated in float32 and rounded once: close to the float64 sum even with hundreds of copies."""
    lay = TileLayout((1, 2, 3), (4, 8, 8), 3, pad)                  # one 256-token tile, 6 real tokens
    x = torch.randn(1, 2, 6 + 3, 8, dtype=torch.float64)
    g = torch.rand(1, 2, lay.padded_len, 8, dtype=torch.float64) + 0.5       # same-sign: no cancellation
    ref = torch.autograd.grad((lay.tile(x.requires_grad_()) * g).sum(), x)[0]
    xb = x.detach().bfloat16().requires_grad_()
    got = torch.autograd.grad((lay.tile(xb) * g.bfloat16()).sum(), xb)[0].double()
    err = ((got - ref).abs() / ref.abs()).max()
    assert err < 8e-3, float(err)                                    # one bf16 rounding of the sum
    copies = 253 + (250 if pad == "repeat" else 0)                  # text padding (+ repeated video)
    assert lay.indices("cpu")["dup_slots"].numel() == copies


def test_block_slots_and_video_padding_are_static_facts():
    from video_sparse_attn.layout import block_slots

    assert [block_slots(n) for n in (1, 16, 18, 384)] == [16, 16, 32, 384]
    assert not TileLayout((6, 8, 8), (6, 8, 8), 5).has_video_padding
    assert TileLayout((5, 8, 8), (6, 8, 8), 5).has_video_padding
    assert TileLayout((2, 3, 3), (2, 3, 3)).block_size == 32 and not TileLayout((2, 3, 3), (2, 3, 3)).has_video_padding


# ---------------------------------------------------------------- repeat padding: copies and their weight
REPEAT_GRIDS = [((3, 5, 7), (2, 4, 4)),      # overhang in t, h and w: a corner tile of copies of one token
                ((5, 9, 10), (4, 4, 4)), ((1, 5, 7), (1, 4, 4)), ((7, 3, 2), (2, 4, 4)),
                ((3, 3, 3), (2, 2, 2)), ((4, 8, 8), (2, 4, 4))]   # the last: no padding at all


def _repeat_sources(grid, tile):
    """Brute force over the padded grid: ``(tile id, source token, real)`` of every position, where the
    source of a position past the grid is its coordinate clamped into it (repeat padding, axis by axis)."""
    t, h, w = grid
    Tt, Th, Tw = tile
    nt, nh, nw = (-(-g // s) for g, s in zip(grid, tile))
    out = []
    for T in range(nt * Tt):
        for Y in range(nh * Th):
            for X in range(nw * Tw):
                tile_id = ((T // Tt) * nh + Y // Th) * nw + X // Tw
                src = (min(T, t - 1) * h + min(Y, h - 1)) * w + min(X, w - 1)
                out.append((tile_id, src, T < t and Y < h and X < w))
    return out


@pytest.mark.parametrize("grid, tile", REPEAT_GRIDS)
def test_repeat_copies_lie_in_their_tokens_tile_and_the_bias_counts_them(grid, tile):
    """Every repeat copy lies in the tile of the token it copies (a tile's padding along an axis is
    shorter than the tile), and `key_bias` is log(1 + copies) on each real token's slot, 0 elsewhere."""
    lay = TileLayout(grid, tile, 21, "repeat")
    n_real = lay.num_video_tokens
    positions = _repeat_sources(grid, tile)
    own_tile = {src: tid for tid, src, real in positions if real}
    assert len(own_tile) == n_real
    assert all(own_tile[src] == tid for tid, src, _ in positions)  # the same-tile claim
    mult = torch.zeros(n_real, dtype=torch.float64)
    for _, src, _ in positions:
        mult[src] += 1
    idx = lay.indices("cpu")
    bias = lay.key_bias("cpu")
    assert bias.dtype == torch.float32 and bias.shape == (lay.padded_len,)
    expected = torch.zeros(lay.padded_len, dtype=torch.float64)
    expected[idx["inverse"][:n_real]] = mult.log()
    torch.testing.assert_close(bias.double(), expected, rtol=1e-7, atol=0)
    torch.testing.assert_close(lay.key_bias("cpu", torch.float64), expected, rtol=1e-15, atol=0)
    # the kept keys of each tile weigh as all its slots; text slots carry no bias
    bs, Nv = lay.block_size, lay.num_video_blocks
    kv = lay.key_valid(None, "cpu", padding_free=True)[0]
    assert kv[:Nv].tolist() == idx["video_valid"].tolist() and (kv[Nv:] == lay.tile_volume).all()
    weight = bias[: Nv * bs].view(Nv, bs).double().exp()
    for n in range(Nv):
        assert float(weight[n, : int(kv[n])].sum()) == pytest.approx(lay.tile_volume, rel=1e-6)
    assert (bias[Nv * bs:] == 0).all()
    for pad in ("zero", "mask"):                                    # no copies: no bias
        assert (TileLayout(grid, tile, 21, pad).key_bias("cpu") == 0).all()


def test_key_bias_traces_under_compile():
    """The multiplicities are built with static-shape ops: a compiled graph computes the same bias."""
    lay = TileLayout((3, 5, 7), (2, 4, 4), 9, "repeat")

    def bias(x):    # under compile the layout builds its indices in the graph (`TileLayout.indices`)
        return lay.key_bias(x.device) + x

    got = torch.compile(bias, backend="aot_eager", fullgraph=True)(torch.zeros(()))
    torch.testing.assert_close(got, lay.key_bias("cpu"), rtol=0, atol=0)

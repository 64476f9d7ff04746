"""Tiles of any volume (not a multiple of 16): each tile is stored in a block rounded up to 16 slots
whose tail takes part in nothing. The block mask and the output equal the released semantics,
computed here directly on the semantic sequence of tiles of ``Tt*Th*Tw`` tokens."""

import math

import pytest
import torch

from helpers import assert_grads_match, dense_masked_attention, rel_l2
from test_layout import _reference_tile
from video_sparse_attn import SSTAConfig, TileLayout, ssta_attention

TILES = [(2, 3, 3), (1, 2, 5), (3, 1, 1)]          # 18, 10, 3 tokens → blocks of 32, 16, 16 slots


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_layout_stores_tiles_in_rounded_blocks(tile, pad):
    grid, L = (3, 5, 7), 11
    lay = TileLayout(grid, tile, L, pad)
    bs_t, bs = math.prod(tile), lay.block_size
    assert bs == -(-bs_t // 16) * 16 and lay.num_text_blocks == -(-L // bs_t)
    x = torch.randn(2, 2, 105 + L, 4, dtype=torch.float64)
    y, means = lay.tile_with_means(x)
    assert y.shape[2] == lay.padded_len and torch.equal(lay.untile(y), x)
    blocks = y.view(2, 2, lay.num_blocks, bs, 4)
    assert (blocks[:, :, :, bs_t:] == 0).all()                                  # the storage tail
    ref = _reference_tile(x, grid, tile, L, "zero" if pad == "mask" else pad)  # semantic sequence
    Nv = lay.num_video_blocks
    ref_means = ref[:, :, : Nv * bs_t].reshape(2, 2, Nv, bs_t, 4).mean(3)
    torch.testing.assert_close(means.double(), ref_means, rtol=1e-6, atol=1e-6)
    real = lay.indices("cpu")["video_valid"]
    assert int(real.sum()) == 105
    assert lay.query_valid("cpu").tolist() == [real.tolist() + [min(bs_t, L - j * bs_t) for j in range(lay.num_text_blocks)]]
    kv = lay.key_valid(None, "cpu")[0].tolist()
    assert kv[Nv:] == ([bs_t] * lay.num_text_blocks if pad != "mask" else lay.query_valid("cpu")[0, Nv:].tolist())


def _semantic_reference(q, k, v, thw, tile, L, pad, block_mask):
    """float64 attention over the semantic sequence (padded tiles of bs_t tokens, text padded by
    repeating its last token) with ``block_mask`` expanded to tokens, read back in token order."""
    B, H, S, D = q.shape
    bs_t = math.prod(tile)
    qs, ks, vs = (_reference_tile(x.double(), thw, tile, L, pad) for x in (q, k, v))
    pos = torch.arange(S, dtype=torch.float64).view(1, 1, S, 1) + 1
    slot_tok = _reference_tile(pos, thw, tile, L, "zero")[0, 0, :, 0].long() - 1      # -1: padding slot
    tok = block_mask.repeat_interleave(bs_t, -2).repeat_interleave(bs_t, -1)
    s = (qs @ ks.transpose(-1, -2)) / math.sqrt(D)
    out = torch.softmax(s.masked_fill(~tok, float("-inf")), -1) @ vs
    first = torch.full((S,), -1, dtype=torch.long)
    for slot in range(slot_tok.numel() - 1, -1, -1):                              # first slot of each token
        if slot_tok[slot] >= 0:
            first[slot_tok[slot]] = slot
    return out[:, :, first]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("pad", ["zero", "repeat"])
@pytest.mark.parametrize("sparse_type", ["ssta", "sta"])
def test_sparse_output_equals_the_semantics(tile, pad, sparse_type):
    torch.manual_seed(sum(tile))
    thw, L = (3, 5, 7), 11
    q, k, v = (torch.randn(1, 2, 105 + L, 8, dtype=torch.float64) for _ in range(3))
    cfg = SSTAConfig(tile_thw=tile, kernel_thw=(1, 3, 3), topk=3, sparse_type=sparse_type, pad_type=pad,
                     caller_rules=False)
    for padding_free in (True, False):
        out, info = ssta_attention(q, k, v, thw, cfg, L, backend="torch", return_info=True,
                                   padding_free=padding_free, strict_tiles=False)
        ref = _semantic_reference(q, k, v, thw, tile, L, pad, info.block_mask[0])
        assert rel_l2(out, ref) < 1e-12


@pytest.mark.parametrize("tile", TILES)
def test_every_block_kept_with_mask_padding_is_dense_attention(tile):
    thw, L = (3, 5, 7), 11
    q, k, v = (torch.randn(2, 2, 105 + L, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cfg = SSTAConfig(tile_thw=tile, sparse_type="dense", pad_type="mask", caller_rules=False)
    out = ssta_attention(q, k, v, thw, cfg, L, backend="torch")
    ref = dense_masked_attention(q, k, v)
    assert rel_l2(out, ref) < 1e-12
    assert_grads_match(out, (q, k, v), ref, 1e-10)


@pytest.mark.interpreter
@pytest.mark.parametrize("pad", ["zero", "mask"])
def test_any_tile_through_triton_interpreter(pad):
    thw, L, tile = (3, 5, 7), 11, (2, 3, 3)
    q, k, v = (torch.randn(1, 2, 105 + L, 16) for _ in range(3))
    cfg = SSTAConfig(tile_thw=tile, kernel_thw=(1, 3, 3), sparse_type="sta", pad_type=pad, caller_rules=False)
    out = ssta_attention(q, k, v, thw, cfg, L, backend="triton", strict_tiles=False)
    ref = ssta_attention(q.double(), k.double(), v.double(), thw, cfg, L, backend="torch", padding_free=False,
                         strict_tiles=False)
    assert rel_l2(out, ref) < 1e-5

"""Block masks: STA window, selection, text rules, shared heads — against slow per-element references."""

import itertools
import math

import numpy as np
import pytest
import torch

from video_sparse_attn import SSTAConfig, TileLayout, build_block_mask
from video_sparse_attn.masks import sta_window_mask
from video_sparse_attn.masks.selection import tile_representatives


@pytest.mark.parametrize("tiles, kernel", [((3, 3, 4), (1, 3, 3)), ((2, 5, 1), (3, 2, 5)), ((4, 4, 4), (3, 3, 3)),
                                           ((1, 2, 6), (7, 1, 4))])
def test_sta_window_matches_definition(tiles, kernel):
    m = sta_window_mask(tiles, kernel)
    coords = list(itertools.product(*(range(n) for n in tiles)))
    for qi, (a, b, c) in enumerate(coords):
        for ki, (x, y, z) in enumerate(coords):
            keep = True
            for q_, k_, n, K in ((a, x, tiles[0], kernel[0]), (b, y, tiles[1], kernel[1]), (c, z, tiles[2], kernel[2])):
                r = K // 2
                centre = int(np.clip(q_, r, n - 1 - r))
                keep &= abs(centre - k_) <= r
            assert bool(m[qi, ki]) == keep, (qi, ki)


def _naive_importance_mask(q_rep, k_rep, topk, lam):
    """One (b, h) at a time, explicit loops: the importance score's definition."""
    Nv = q_rep.shape[0]
    qn = [x / x.norm() for x in q_rep.double()]
    kn = [x / x.norm() for x in k_rep.double()]
    red = [sum((kn[i] @ kn[j] + 1) / 2 for i in range(Nv) if i != j) / max(Nv - 1, 1) for j in range(Nv)]
    mask = torch.zeros(Nv, Nv, dtype=torch.bool)
    for i in range(Nv):
        score = torch.stack([lam * (qn[i] @ kn[j] + 1) / 2 - (1 - lam) * red[j] for j in range(Nv)])
        mask[i, score.argsort(descending=True)[: min(topk, Nv)]] = True
    return mask


@pytest.mark.parametrize("share", [False, True])
def test_block_attn_selection_matches_naive(share):
    thw, tile, L = (4, 6, 9), (2, 4, 4), 10
    cfg = SSTAConfig(tile_thw=tile, sparse_type="block_attn", topk=3, mask_share_within_head=share, caller_rules=False)
    B, H, D = 2, 3, 8
    q, k = torch.randn(2, B, H, math.prod(thw) + L, D).unbind(0)
    m = build_block_mask(q, k, thw, cfg, L)
    assert m.shape == (B, 1 if share else H, 13, 13)
    lay = TileLayout(thw, tile, L)
    nvt = lay.num_video_blocks * lay.block_size
    qr = tile_representatives(lay.tile(q)[:, :, :nvt], lay, None, share)
    kr = tile_representatives(lay.tile(k)[:, :, :nvt], lay, None, share)
    for b in range(B):
        for h in range(m.shape[1]):
            assert torch.equal(m[b, h, :12, :12], _naive_importance_mask(qr[b, h], kr[b, h], 3, 0.7))
    assert m[..., 12:, :].all() and m[..., :, 12:].all()


def test_similarity_threshold_row_counts_are_clamped():
    thw, tile = (6, 8, 16), (2, 4, 4)
    cfg = SSTAConfig(tile_thw=tile, sparse_type="block_attn", sampling_type="similarity", threshold=0.9,
                     topk=10, caller_rules=False)
    q, k = torch.randn(2, 1, 2, math.prod(thw), 16).unbind(0)
    counts = build_block_mask(q, k, thw, cfg).sum(-1)
    assert counts.min() >= 8 and counts.max() <= 10
    # a threshold of ~0 keeps the minimum, 8, everywhere
    cfg0 = cfg.replace(threshold=1e-9)
    assert (build_block_mask(q, k, thw, cfg0).sum(-1) == 8).all()


def test_union_contains_window_and_selection():
    thw, tile = (4, 8, 12), (2, 4, 4)
    q, k = torch.randn(2, 1, 2, math.prod(thw), 8).unbind(0)
    base = dict(tile_thw=tile, kernel_thw=(1, 1, 3), topk=2, caller_rules=False)
    ssta = build_block_mask(q, k, thw, SSTAConfig(**base))
    sta = build_block_mask(q, k, thw, SSTAConfig(**base, sparse_type="sta"))
    sel = build_block_mask(q, k, thw, SSTAConfig(**base, sparse_type="block_attn"))
    assert torch.equal(ssta, sta | sel)


def test_text_validity_rule():
    thw, tile, L = (2, 4, 8), (2, 4, 4), 80  # Nv = 2, bs = 32, Nt = 3
    q, k = torch.randn(2, 2, 1, math.prod(thw) + L, 8).unbind(0)
    tm = torch.zeros(2, L, dtype=torch.bool)
    tm[0, :33] = True   # keep 2 text blocks → cut = 4
    tm[1, :0] = True    # keep max(1, 0) = 1 → cut = 3
    cfg = SSTAConfig(tile_thw=tile, kernel_thw=(3, 3, 3), topk=1, caller_rules=False)   # ssta, window covers the grid
    m = build_block_mask(q, k, thw, cfg, L, tm)
    expect0 = torch.ones(5, 5, dtype=torch.bool)
    expect0[:, 4] = False
    expect0[4] = torch.tensor([0, 0, 0, 0, 1], dtype=torch.bool)
    assert torch.equal(m[0, 0], expect0)
    assert m[1, 0, :, 3:].sum() == 2 and m[1, 0, 3, 3] and m[1, 0, 4, 4]
    # exact mode: rows past the cut attend to every valid block instead of only themselves
    mx = build_block_mask(q, k, thw, cfg.replace(pad_type="mask"), L, tm)
    assert mx[0, 0, 4].tolist() == [True, True, True, True, False]
    # without use_text_mask nothing is cut
    assert build_block_mask(q, k, thw, cfg.replace(use_text_mask=False), L, tm).all(-1)[..., 2:].all()
    # the reference cuts text blocks in ssta only: sta / block_attn keep every text block (visible padding);
    # with mask padding the cut runs (it changes no output there)
    for kind in ("sta", "block_attn"):
        assert build_block_mask(q, k, thw, cfg.replace(sparse_type=kind), L, tm)[..., 2:].all()
        cut = build_block_mask(q, k, thw, cfg.replace(sparse_type=kind, pad_type="mask"), L, tm)
        assert torch.equal(cut[..., 2:], mx[..., 2:]) and torch.equal(cut[..., 2:, :], mx[..., 2:, :])


def test_dense_mode_keeps_everything():
    q, k = torch.randn(2, 2, 2, 8 * 8 * 2 + 7, 16).unbind(0)
    m = build_block_mask(q, k, (2, 8, 8), SSTAConfig(tile_thw=(2, 4, 4), sparse_type="dense", caller_rules=False), 7)
    assert m.all()

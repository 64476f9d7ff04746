"""The SSTA semantics rule by rule, against a slow float64 re-implementation written from the rules
themselves (tile partition and padding, text padding, STA window, top-k scores, threshold, adaptive
pooling, union, text rules, shared heads), plus hand-built cases where one rule decides the result.

The reference here shares no code with the package: the sequence comes from `F.pad` + einops
(`test_layout._reference_tile`), pooling from `F.adaptive_avg_pool3d`, every score from its formula.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import rel_l2
from test_layout import _reference_tile
from video_sparse_attn import SSTAConfig, build_block_mask, ssta_attention

# ---------------------------------------------------------------------------------------------- reference


def _ref_sta(tiles, kernel):
    """[Nv, Nv] bool: per axis the centre is clip(a, K//2, n-1-K//2) (numpy's clip), keep |centre-x| <= K//2."""
    coords = [(a, b, c) for a in range(tiles[0]) for b in range(tiles[1]) for c in range(tiles[2])]
    m = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            m[i, j] = all(abs(int(np.clip(a, K // 2, n - 1 - K // 2)) - x) <= K // 2
                          for a, x, n, K in zip(qc, kc, tiles, kernel))
    return m


def _ref_reps(x, thw, cfg, L):
    """Tile representatives [B, H(or 1), Nv, F] in float64 from the padded, tile-ordered sequence."""
    tile = cfg.tile_thw
    pad = "zero" if cfg.pad_type == "mask" else cfg.pad_type
    seq = _reference_tile(x.double(), thw, tile, L, pad)
    B, H, _, D = seq.shape
    bs = math.prod(tile)
    Nv = math.prod(-(-g // s) for g, s in zip(thw, tile))
    vid = seq[:, :, : Nv * bs].reshape(B, H, Nv, *tile, D)
    pool = cfg.adaptive_pool or ((2, 2, 2) if cfg.threshold > 0 else None)
    if cfg.sampling_type == "importance" or pool is None:
        reps = vid.mean(dim=(3, 4, 5))
    else:
        cube = vid.permute(0, 1, 2, 6, 3, 4, 5).reshape(B * H * Nv, D, *tile)
        reps = F.adaptive_avg_pool3d(cube, pool).reshape(B, H, Nv, -1)          # sub-cubes, concatenated
    return reps.mean(dim=1, keepdim=True) if cfg.mask_share_within_head else reps


def _ref_selection(qr, kr, cfg):
    """(scores [Nv, Nv], k per row [Nv]) of one (b, h): the kept columns are the k best of each row."""
    Nv = qr.shape[0]
    if cfg.sampling_type == "importance":
        qn = [r / r.norm() for r in qr]
        kn = [r / r.norm() for r in kr]
        red = [sum((kn[i] @ kn[j] + 1) / 2 for i in range(Nv) if i != j) / (Nv - 1) if Nv > 1 else 0.0
               for j in range(Nv)]
        lam = cfg.lambda_
        s = torch.tensor([[lam * (qn[i] @ kn[j] + 1) / 2 - (1 - lam) * red[j] for j in range(Nv)]
                          for i in range(Nv)], dtype=torch.float64)
        return s, [min(cfg.topk, Nv)] * Nv
    gate = qr @ kr.T
    if cfg.threshold == 0:
        return gate, [min(cfg.topk, Nv)] * Nv
    p = torch.softmax(gate / 0.01, dim=-1)
    ks = []
    for row in p:
        csum = torch.cumsum(row.sort(descending=True).values, 0)
        hit = [n for n in range(Nv) if csum[n] >= cfg.threshold]
        k = hit[0] + 1 if hit else cfg.topk
        ks.append(min(max(k, 8), cfg.topk, Nv))
    return p, ks


def reference_mask(q, k, thw, cfg, L=0, text_mask=None):
    """(mask [B, Hm, N, N], scores [B, Hm, Nv, Nv] or None, ks [B, Hm, Nv] or None, sta [Nv, Nv])."""
    B, H = q.shape[:2]
    tile = cfg.tile_thw
    bs = math.prod(tile)
    tiles = tuple(-(-g // s) for g, s in zip(thw, tile))
    Nv, Nt = math.prod(tiles), -(-L // bs)
    N = Nv + Nt
    kind = cfg.sparse_type
    sta = _ref_sta(tiles, cfg.kernel_thw)
    Hm = 1 if cfg.mask_share_within_head or kind in ("sta", "dense") else H
    mask = torch.ones(B, Hm, N, N, dtype=torch.bool)           # text rows and columns: all kept
    scores = ks = None
    if kind in ("ssta", "block_attn"):
        qr, kr = _ref_reps(q, thw, cfg, L), _ref_reps(k, thw, cfg, L)
        scores = torch.zeros(B, Hm, Nv, Nv, dtype=torch.float64)
        ks = torch.zeros(B, Hm, Nv, dtype=torch.long)
    for b in range(B):
        for h in range(Hm):
            if kind == "dense":
                video = torch.ones(Nv, Nv, dtype=torch.bool)
            else:
                video = sta.clone() if kind in ("ssta", "sta") else torch.zeros(Nv, Nv, dtype=torch.bool)
            if scores is not None:
                s, kk = _ref_selection(qr[b, h], kr[b, h], cfg)
                scores[b, h], ks[b, h] = s, torch.tensor(kk)
                for i in range(Nv):
                    video[i, s[i].argsort(descending=True)[: kk[i]]] = True   # union with the window
            mask[b, h, :Nv, :Nv] = video
    rule = cfg.use_text_mask and text_mask is not None and Nt > 0 and (
        kind in ("ssta", "dense") or cfg.pad_type == "mask")
    if rule:
        for b in range(B):
            cut = Nv + max(1, -(-int(text_mask[b].sum()) // bs))
            for h in range(Hm):
                mask[b, h, cut:, :] = False
                mask[b, h, :, cut:] = False
                for i in range(cut, N):
                    if cfg.pad_type == "mask":     # exact mode: the row sees every valid block instead
                        mask[b, h, i, :cut] = True
                    else:
                        mask[b, h, i, i] = True
    return mask, scores, ks, sta


def reference_output(q, k, v, thw, cfg, L, text_mask, block_mask, scale=None):
    """float64 attention over the padded tile-ordered sequence with ``block_mask [B, Hm, N, N]``
    expanded to tokens (padding visible as keys, except with ``pad_type="mask"``), in token order."""
    B, H, S, D = q.shape
    tile = cfg.tile_thw
    bs = math.prod(tile)
    pad = "zero" if cfg.pad_type == "mask" else cfg.pad_type
    qs, ks_, vs = (_reference_tile(x.double(), thw, tile, L, pad) for x in (q, k, v))
    pos = torch.arange(S, dtype=torch.float64).view(1, 1, S, 1) + 1
    slot_tok = _reference_tile(pos, thw, tile, L, "zero")[0, 0, :, 0].long() - 1    # -1: video padding
    n_slots = slot_tok.numel()
    nvid = math.prod(thw)
    Nv_tok = n_slots - (-(-L // bs)) * bs
    slot_idx = torch.arange(n_slots)
    is_copy = (slot_idx >= Nv_tok) & (slot_idx - Nv_tok >= L)                      # text padding copies
    tok = block_mask.expand(B, H, -1, -1).repeat_interleave(bs, -2).repeat_interleave(bs, -1)
    if cfg.pad_type == "mask":
        valid = (slot_tok >= 0) & ~is_copy
        valid = valid[None].expand(B, -1).clone()
        if text_mask is not None:
            for b in range(B):
                valid[b] &= ~((slot_idx >= Nv_tok) & (slot_idx - Nv_tok >= int(text_mask[b].sum())))
        tok = tok & valid[:, None, None, :]
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = (qs @ ks_.transpose(-1, -2)) * scale
    out = torch.softmax(s.masked_fill(~tok, float("-inf")), -1) @ vs
    first = torch.full((S,), -1, dtype=torch.long)
    for slot in range(n_slots - 1, -1, -1):
        if slot_tok[slot] >= 0 and not is_copy[slot]:
            first[slot_tok[slot]] = slot
    assert (first[:nvid] >= 0).all()
    return out[:, :, first]


def assert_masks_match(ours, ref, scores, ks, sta, cfg, Nv, atol=1e-6):
    """Equal, except video×video selections outside the window whose score ties the row's k-th best."""
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    for b, h, i, j in (ours != ref).nonzero().tolist():
        assert i < Nv and j < Nv and scores is not None, f"non-selection block differs at {(b, h, i, j)}"
        assert not (cfg.sparse_type == "ssta" and sta[i, j]), (b, h, i, j)
        row = scores[b, h, i]
        kth = row.sort(descending=True).values[ks[b, h, i] - 1]
        assert abs(float(row[j] - kth)) <= atol, f"non-tie difference at {(b, h, i, j)}: {row[j]} vs {kth}"


def _text_mask(B, L, counts):
    tm = torch.zeros(B, L, dtype=torch.bool)
    for b, c in enumerate(counts):
        tm[b, :c] = True
    return tm


# ---------------------------------------------------------------------------------------------- sweep

_T = dict(caller_rules=False)
CASES = {   # name: (thw, config, text_len, valid counts per batch or None)
    "ssta_zero_text_cut": ((3, 5, 7), SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 3, 3), topk=3, **_T), 11, [11, 4]),
    "ssta_repeat_shared_lam02": ((3, 5, 7), SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 1, 3), topk=2, lambda_=0.2,
                                                       pad_type="repeat", mask_share_within_head=True, **_T), 9, [1, 9]),
    "ssta_lam0_redundancy_only": ((4, 4, 6), SSTAConfig(tile_thw=(2, 2, 2), kernel_thw=(3, 1, 1), topk=4, lambda_=0.0,
                                                        **_T), 5, None),
    "block_attn_lam1_text_kept": ((3, 6, 6), SSTAConfig(tile_thw=(2, 2, 4), sparse_type="block_attn", topk=3,
                                                        lambda_=1.0, **_T), 20, [3, 20]),
    "sta_even_kernel_text_kept": ((5, 6, 9), SSTAConfig(tile_thw=(2, 2, 2), kernel_thw=(2, 3, 6), sparse_type="sta",
                                                        **_T), 13, [2, 13]),
    "block_attn_similarity": ((3, 5, 7), SSTAConfig(tile_thw=(2, 2, 4), sparse_type="block_attn", topk=4,
                                                    sampling_type="similarity", **_T), 6, None),
    "ssta_threshold_uneven_pool": ((6, 7, 10), SSTAConfig(tile_thw=(3, 3, 5), kernel_thw=(1, 1, 1), topk=10,
                                                          sampling_type="similarity", threshold=0.9, **_T), 7, [7, 2]),
    "block_attn_similarity_pool_122": ((4, 6, 9), SSTAConfig(tile_thw=(2, 3, 3), sparse_type="block_attn", topk=5,
                                                             sampling_type="similarity", adaptive_pool=(1, 2, 2),
                                                             **_T), 0, None),
    "block_attn_threshold_shared": ((6, 7, 10), SSTAConfig(tile_thw=(3, 3, 5), sparse_type="block_attn", topk=10,
                                                           sampling_type="similarity", threshold=0.9,
                                                           mask_share_within_head=True, **_T), 0, None),
    "dense_zero_text_cut": ((2, 5, 6), SSTAConfig(tile_thw=(2, 2, 4), sparse_type="dense", **_T), 17, [17, 5]),
    "ssta_mask_pad_shared": ((3, 5, 7), SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 3, 1), topk=3, pad_type="mask",
                                                   mask_share_within_head=True, **_T), 21, [21, 0]),
    "sta_mask_pad_text_cut": ((3, 5, 7), SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 1, 3), sparse_type="sta",
                                                    pad_type="mask", **_T), 21, [5, 21]),
    "ssta_no_text_mask_rule": ((3, 5, 7), SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 3, 3), topk=2,
                                                     use_text_mask=False, **_T), 11, [3, 11]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_block_mask_and_output_follow_the_rules(name):
    thw, cfg, L, counts = CASES[name]
    B, H, D = 2, 2, 8
    torch.manual_seed(len(name))
    q, k, v = torch.randn(3, B, H, math.prod(thw) + L, D, dtype=torch.float64).unbind(0)
    if cfg.threshold > 0:
        # a gate of order 0.01: softmax(gate / 0.01) spread, so k per row varies (head means are smaller)
        q = q * (0.02 if cfg.mask_share_within_head else 0.01)
    tm = None if counts is None else _text_mask(B, L, counts)
    out, info = ssta_attention(q, k, v, thw, cfg, L, tm, backend="torch", return_info=True, strict_tiles=False,
                               validate=False)
    Nv = info.layout.num_video_blocks
    ref, scores, ks, sta = reference_mask(q, k, thw, cfg, L, tm)
    ours = info.block_mask.expand(B, *info.block_mask.shape[1:])
    assert_masks_match(ours, ref, scores, ks, sta, cfg, Nv)
    assert ours.any(-1).all()                                   # every row keeps at least one block
    if cfg.threshold > 0:
        assert len(set(ks.flatten().tolist())) > 2, "the case should exercise several row counts"
    exp = reference_output(q, k, v, thw, cfg, L, tm, info.block_mask)
    assert rel_l2(out, exp) < 1e-10
    assert abs(float(info.density) - float(info.block_mask.double().mean())) < 1e-7
    # build_block_mask gives the same mask
    assert torch.equal(build_block_mask(q, k, thw, cfg, L, tm), ours)


# ---------------------------------------------------------------------------------------------- one rule each


def test_tile_representatives_and_scores_are_float32_for_bf16_inputs():
    """Tile means in float32: key tiles whose means differ by multiples of 2^-11 (below bf16 resolution
    at 1.0; their sums, 16 + o/128, all round to 16 in bf16 too, so bf16 means would all tie) are ranked
    exactly; the top 3 are the tiles with the largest offsets."""
    thw, tile, D = (1, 4, 32), (1, 4, 4), 4                     # 8 tiles of 16 tokens along w
    offset = [3, 0, 6, 1, 7, 2, 5, 4]                             # tile j: one token 1 + offset/128, the rest 1
    q = torch.zeros(1, 1, 128, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 4, 32, D)
    k[..., 0] = 1.0
    for j, o in enumerate(offset):
        k[0, 0, 0, 4 * j, 0] = 1 + o / 128                          # exact in bf16
    k = k.reshape(1, 1, 128, D)
    cfg = SSTAConfig(tile_thw=tile, sparse_type="block_attn", sampling_type="similarity", topk=3, **_T)
    best = sorted(range(8), key=lambda j: -offset[j])[:3]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        qd, kd = q.to(dtype), k.to(dtype)
        assert torch.equal(qd.double(), q.double()) and torch.equal(kd.double(), k.double())
        m = build_block_mask(qd, kd, thw, cfg)
        _, info = ssta_attention(qd, kd, kd, thw, cfg, backend="torch", return_info=True)
        for mask in (m, info.block_mask):
            for i in range(8):
                assert mask[0, 0, i].nonzero().flatten().tolist() == sorted(best), (dtype, i)


@pytest.mark.parametrize("sampling", ["importance", "similarity"])
def test_half_inputs_select_as_their_float32_values(sampling):
    """The selection reads half inputs in float32: the mask of bf16 q, k is the mask of the same values
    given as float32."""
    thw, L = (4, 8, 8), 5
    cfg = SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 1, 1), topk=3, sampling_type=sampling, **_T)
    q, k = (torch.randn(2, 2, 256 + L, 16).bfloat16() for _ in range(2))
    assert torch.equal(build_block_mask(q, k, thw, cfg, L), build_block_mask(q.float(), k.float(), thw, cfg, L))


def test_importance_normalises_without_epsilon():
    """A query tile whose mean is ~1e-15 still has a unit direction. Key tiles e0, e1, (e0+e1)/√2 have
    redundancies 0.68, 0.68, 0.85; the query along (e0+e1)/√2 selects tile 2 (score 0.444 vs 0.395).
    With an epsilon in the norm the query's similarity would flatten to 0.5 and tile 0 or 1 would win."""
    thw, tile, D = (1, 4, 12), (1, 4, 4), 4
    u = torch.tensor([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2)
    q = torch.zeros(1, 1, 4, 12, D)
    q[0, 0, :, 0:4] = 1e-15 * u                                  # tile 0: a tiny mean, direction u
    q[0, 0, :, 4:] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    k = torch.zeros(1, 1, 4, 12, D)
    k[0, 0, :, 0:4, 0] = 1.0
    k[0, 0, :, 4:8, 1] = 1.0
    k[0, 0, :, 8:12] = u
    q, k = q.reshape(1, 1, 48, D), k.reshape(1, 1, 48, D)
    cfg = SSTAConfig(tile_thw=tile, sparse_type="block_attn", topk=1, **_T)
    m = build_block_mask(q, k, thw, cfg)
    assert m[0, 0, 0].tolist() == [False, False, True]
    ref, *_ = reference_mask(q, k, thw, cfg)
    assert torch.equal(m, ref)


@pytest.mark.parametrize("cfg, expected", [
    (SSTAConfig(tile_thw=(1, 2, 2), sparse_type="block_attn", topk=5, **_T), 5),
    (SSTAConfig(tile_thw=(1, 2, 2), sparse_type="block_attn", topk=40, **_T), 16),          # min(topk, Nv)
    (SSTAConfig(tile_thw=(1, 2, 2), sparse_type="block_attn", topk=5, sampling_type="similarity", **_T), 5),
    # all p = 1/16: the cumulative sum first reaches 0.7 at position 11 → k = 12
    (SSTAConfig(tile_thw=(1, 2, 2), sparse_type="block_attn", topk=14, sampling_type="similarity",
                threshold=0.7, **_T), 12),
    (SSTAConfig(tile_thw=(1, 2, 2), sparse_type="block_attn", topk=10, sampling_type="similarity",
                threshold=0.7, **_T), 10),                                                 # clamped to topk
    (SSTAConfig(tile_thw=(1, 2, 2), sparse_type="block_attn", topk=14, sampling_type="similarity",
                threshold=0.1, **_T), 8),                                                  # clamped up to 8
    (SSTAConfig(tile_thw=(1, 2, 2), sparse_type="block_attn", topk=5, sampling_type="similarity",
                threshold=0.1, **_T), 5),                                                  # [8, 5] → topk
])
def test_tied_scores_keep_exactly_k_per_row(cfg, expected):
    """Every score ties (constant q and k): each row still keeps exactly its k columns."""
    thw = (1, 8, 8)                                              # 16 tiles
    q = torch.ones(1, 2, 64, 4)
    m = build_block_mask(q, q.clone(), thw, cfg)
    assert (m.sum(-1) == expected).all(), m.sum(-1)


def test_threshold_row_counts_follow_the_cumulative_mass():
    """Per row, the kept count is the reference's k_i (first position where the sorted softmax mass
    reaches the threshold, plus one, clamped to [8, topk]); rows differ."""
    thw, L = (4, 8, 8), 0
    cfg = SSTAConfig(tile_thw=(2, 2, 2), sparse_type="block_attn", topk=20, sampling_type="similarity",
                     threshold=0.9, **_T)                         # 32 tiles, 8·D features each
    q, k = torch.randn(2, 1, 2, 256, 8, dtype=torch.float64).unbind(0)
    q = q * 0.002                                                 # gate / 0.01 of order 1: p spread
    m = build_block_mask(q, k, thw, cfg, L)
    ref, p, ks, sta = reference_mask(q, k, thw, cfg, L)
    # no row sits on the threshold (float32 vs float64 cumulative sums would then disagree)
    csum = p.sort(dim=-1, descending=True).values.cumsum(-1)
    assert ((csum - 0.9).abs() > 1e-5).all()
    assert torch.equal(m.sum(-1), ks)
    assert len(set(ks.flatten().tolist())) > 3
    assert_masks_match(m, ref, p, ks, sta, cfg, 32)


def test_sta_window_at_grid_edges_by_hand():
    """5 tiles along w, window 3: the window is shifted, not shrunk, at both edges; window 4 acts like 5
    (all of the axis); window 7 on 5 tiles covers everything."""
    def rows(kernel_w):
        q = torch.randn(1, 1, 20, 4)
        cfg = SSTAConfig(tile_thw=(1, 1, 4), kernel_thw=(1, 1, kernel_w), sparse_type="sta", **_T)
        return ["".join("#" if x else "." for x in r) for r in build_block_mask(q, q, (1, 1, 20), cfg)[0, 0].tolist()]
    assert rows(3) == ["###..", "###..", ".###.", "..###", "..###"]
    assert rows(1) == ["#....", ".#...", "..#..", "...#.", "....#"]
    assert rows(4) == ["#####"] * 5 and rows(7) == ["#####"] * 5
    assert rows(2) == ["###..", "###..", ".###.", "..###", "..###"]


def test_text_rows_see_everything_and_video_rows_see_text_in_every_sparse_type():
    thw, L = (2, 4, 8), 40                                      # Nv = 4 (tile 2x2x4), Nt = 3
    q, k = torch.randn(2, 1, 2, 64 + L, 8).unbind(0)
    for kind in ("ssta", "sta", "block_attn"):
        cfg = SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 1, 1), topk=1, sparse_type=kind, **_T)
        m = build_block_mask(q, k, thw, cfg, L)
        assert m[..., 4:, :].all() and m[..., :, 4:].all(), kind
        assert not m[..., :4, :4].all(), kind                   # the video part is sparse


def test_shared_heads_with_text_mask_broadcast_one_mask_per_batch_element():
    """mask_share_within_head with a text mask: one [B, 1, N, N] mask, cut per element, applied to
    every head (the output equals the reference over that mask for every head)."""
    thw, L = (2, 4, 8), 40                                      # Nv = 4, Nt = 3 blocks of 16
    cfg = SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 1, 1), topk=2, mask_share_within_head=True, **_T)
    q, k, v = torch.randn(3, 2, 3, 64 + L, 8, dtype=torch.float64).unbind(0)
    tm = _text_mask(2, L, [40, 3])                              # cut = Nv + 3, Nv + 1
    out, info = ssta_attention(q, k, v, thw, cfg, L, tm, backend="torch", return_info=True)
    m = info.block_mask
    assert m.shape == (2, 1, 7, 7)
    assert m[0, 0, :, 4:].all() and m[0, 0, 4:, :].all()
    assert m[1, 0, :, 5:].sum() == 2 and m[1, 0, 5, 5] and m[1, 0, 6, 6] and not m[1, 0, 5:, :5].any()
    ref, scores, ks, sta = reference_mask(q, k, thw, cfg, L, tm)
    assert_masks_match(m, ref, scores, ks, sta, cfg, 4)
    assert rel_l2(out, reference_output(q, k, v, thw, cfg, L, tm, m)) < 1e-10


def test_visible_padding_counts_in_the_softmax():
    """zero: padded video keys give logit 0 and value 0; repeat: copies of the last slice; text padding
    repeats the last text token in every pad type but mask. Checked on one dense row set by hand: a grid
    of one real token per tile axis overhang, every block kept."""
    thw, L, tile = (1, 1, 3), 1, (1, 1, 4)                      # 3 real video tokens + 1 pad; text 1 + 3 copies
    q, k, v = torch.randn(3, 1, 1, 4, 2, dtype=torch.float64).unbind(0)
    cfg = SSTAConfig(tile_thw=tile, sparse_type="dense", **_T)
    scale = 1 / math.sqrt(2)
    for pad in ("zero", "repeat", "mask"):
        out = ssta_attention(q, k, v, thw, cfg.replace(pad_type=pad), L, backend="torch", strict_tiles=False)
        kv_video = {"zero": (torch.zeros(1, 2), torch.zeros(1, 2)), "repeat": (k[0, 0, 2:3], v[0, 0, 2:3]),
                    "mask": (torch.zeros(0, 2), torch.zeros(0, 2))}[pad]
        copies = 3 if pad != "mask" else 0
        keys = torch.cat([k[0, 0, :3], kv_video[0].double(), k[0, 0, 3:4].expand(1 + copies, 2)])
        vals = torch.cat([v[0, 0, :3], kv_video[1].double(), v[0, 0, 3:4].expand(1 + copies, 2)])
        exp = torch.softmax(q[0, 0] @ keys.T * scale, -1) @ vals
        assert rel_l2(out[0, 0], exp) < 1e-12, pad


@pytest.mark.parametrize("pad", ["zero", "mask"])
def test_only_the_count_of_valid_text_tokens_matters(pad):
    """A text mask is read as its count V_b (valid tokens taken as a prefix): a scattered mask with the
    same count gives the same block mask and output (given scale honoured too)."""
    thw, L = (2, 4, 8), 40
    cfg = SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 1, 3), topk=2, pad_type=pad, **_T)
    q, k, v = torch.randn(3, 1, 2, 64 + L, 8, dtype=torch.float64).unbind(0)
    prefix = _text_mask(1, L, [18])
    scattered = torch.zeros(1, L, dtype=torch.bool)
    scattered[0, torch.randperm(L)[:18]] = True
    outs = [ssta_attention(q, k, v, thw, cfg, L, tm, scale=0.5, backend="torch", return_info=True, validate=False)
            for tm in (prefix, scattered)]
    assert torch.equal(outs[0][1].block_mask, outs[1][1].block_mask)
    assert rel_l2(outs[1][0], outs[0][0]) < 1e-14
    exp = reference_output(q, k, v, thw, cfg, L, prefix, outs[0][1].block_mask, scale=0.5)
    assert rel_l2(outs[0][0], exp) < 1e-10


@pytest.mark.parametrize("t, topk, expected", [(31, 64, 32), (32, 64, 64), (61, 64, 64), (1, 64, 32), (5, 7, 3)])
def test_caller_rules_halve_topk_up_to_31_frames(t, topk, expected):
    c = SSTAConfig(topk=topk).for_thw((t, 45, 80))
    assert c.topk == expected and not c.caller_rules
    if t == 1:
        assert c.tile_thw == (1, 16, 24) and c.kernel_thw == (1, 1, 1)
    else:
        assert c.tile_thw == (6, 8, 8) and c.kernel_thw == (3, 3, 3)

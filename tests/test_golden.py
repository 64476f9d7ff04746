"""The reference cases in tests/golden: block masks (modulo top-k ties) and outputs."""

import os

import pytest
import torch

from helpers import golden_cases, load_golden, rel_l2
from video_sparse_attn import TileLayout, ssta_attention
from video_sparse_attn.masks import sta_window_mask
from video_sparse_attn.masks.selection import importance_scores, tile_representatives

CASES = golden_cases()


def test_all_golden_files_present():
    assert len(CASES) == 7, CASES


def _selection_scores(t, config, layout):
    """Per-(b, h) selection scores, to decide whether a mask difference is a top-k tie."""
    nvt = layout.num_video_blocks * layout.block_size
    q_rep = tile_representatives(layout.tile(t["q"])[:, :, :nvt], layout, config.pool_thw, config.mask_share_within_head)
    k_rep = tile_representatives(layout.tile(t["k"])[:, :, :nvt], layout, config.pool_thw, config.mask_share_within_head)
    if config.sampling_type == "importance":
        return importance_scores(q_rep, k_rep, config.lambda_)
    gate = q_rep @ k_rep.transpose(-1, -2)
    # with a threshold the selection sorts p = softmax(gate / 0.01): ties are ties of p
    return torch.softmax(gate / 0.01, dim=-1) if config.threshold > 0 else gate


def _assert_masks_equal_modulo_ties(ours, expected, t, config, layout):
    expected = expected.expand_as(ours) if expected.dim() == 4 else expected[None, None].expand_as(ours)
    diff = ours != expected
    if not diff.any():
        return
    # every differing block must be a video×video selection where the score ties the k-th best
    Nv = layout.num_video_blocks
    assert not diff[..., Nv:, :].any() and not diff[..., :, Nv:].any(), "text blocks differ"
    scores = _selection_scores(t, config, layout).expand(ours.shape[0], ours.shape[1], Nv, Nv)
    sta = sta_window_mask(layout.tiles_thw, config.kernel_thw)
    for b, h, i, j in diff.nonzero().tolist():
        assert not (config.sparse_type != "block_attn" and sta[i, j]), (b, h, i, j)
        row = scores[b, h, i]
        kept = expected[b, h, i, :Nv] & ~sta[i] if config.sparse_type != "block_attn" else expected[b, h, i, :Nv]
        kth = row[kept].min()
        assert torch.isclose(row[j], kth, rtol=0, atol=1e-6), f"non-tie difference at {(b, h, i, j)}"


@pytest.mark.parametrize("path", CASES, ids=lambda p: os.path.basename(p)[:-12])
def test_golden_case(path):
    t, params, config = load_golden(path)
    out, info = ssta_attention(t["q"], t["k"], t["v"], tuple(params["thw"]), config, params["text_len"],
                               t.get("text_mask"), backend="torch", return_info=True)
    layout = TileLayout(tuple(params["thw"]), config.tile_thw, params["text_len"], config.pad_type)
    _assert_masks_equal_modulo_ties(info.block_mask, t["block_mask"], t, config, layout)
    assert rel_l2(out, t["out"]) < 1e-5
    assert abs(float(info.density) - params["density"]) < 1e-6

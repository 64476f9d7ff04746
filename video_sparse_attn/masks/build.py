"""`build_block_mask`: the SSTA block mask in tile order, batched, with no host synchronisation."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config import SSTAConfig
from ..layout import TileLayout
from ..validation import validate_inputs
from .selection import importance_topk, similarity_threshold, similarity_topk, tile_representatives
from .sta import sta_window_mask
from .text import apply_text_validity, assemble_with_text

__all__ = ["build_block_mask", "block_mask_from_tiled", "text_rule_applies"]


def text_rule_applies(config: SSTAConfig) -> bool:
    """Whether the text-validity block rule (`apply_text_validity`) runs for ``config`` (given a text mask).

    The reference applies it in ``ssta`` only: in ``sta`` and ``block_attn`` with ``zero`` / ``repeat``
    padding every text block stays visible, invalid tokens included. ``dense`` keeps it (it is ``ssta``
    with every video block kept). With ``pad_type="mask"`` it runs for every sparse type: invalid text
    keys are excluded token by token there anyway, so cutting the blocks that hold none changes no
    output, only skips work.
    """
    if not config.use_text_mask:
        return False
    return config.sparse_type in ("ssta", "dense") or config.pad_type == "mask"


def _selection(q_video, k_video, layout: TileLayout, config: SSTAConfig, q_means=None, k_means=None) -> torch.Tensor:
    share = config.mask_share_within_head
    pool = config.pool_thw
    if pool is None and q_means is not None and k_means is not None:
        q_rep, k_rep = (m.mean(dim=1, keepdim=True) if share else m for m in (q_means, k_means))
    else:
        q_rep = tile_representatives(q_video, layout, pool, share)
        k_rep = tile_representatives(k_video, layout, pool, share)
    if config.sampling_type == "importance":
        return importance_topk(q_rep, k_rep, config.topk, config.lambda_)
    if config.threshold > 0:
        return similarity_threshold(q_rep, k_rep, config.topk, config.threshold)
    return similarity_topk(q_rep, k_rep, config.topk)


@torch.no_grad()
def block_mask_from_tiled(q_t: torch.Tensor, k_t: torch.Tensor, layout: TileLayout, config: SSTAConfig,
                          text_mask: Optional[torch.Tensor] = None, q_means: Optional[torch.Tensor] = None,
                          k_means: Optional[torch.Tensor] = None, text_first: bool = False) -> torch.Tensor:
    """Block mask from block-ordered ``q_t, k_t [B, H, N*bs, D]`` (see `build_block_mask`; ``text_first``:
    q_t and k_t are in the text-first order, `TileLayout.to_text_first`; the mask is in block order
    either way).

    ``q_means, k_means [B, H, Nv, D]`` float32 tile means (from `TileLayout.tile_with_means`) are used
    when given and the selection needs plain means, so q and k are not read a second time.
    """
    B, H = q_t.shape[:2]
    Nv, Nt = layout.num_video_blocks, layout.num_text_blocks
    dev = q_t.device
    kind = config.sparse_type
    if kind == "dense":
        video = torch.ones(1, 1, Nv, Nv, dtype=torch.bool, device=dev)
    else:
        video = None
        if kind in ("ssta", "sta"):
            video = sta_window_mask(layout.tiles_thw, config.kernel_thw, dev)[None, None]
        if kind in ("ssta", "block_attn"):
            v0 = Nt * layout.block_size if text_first else 0
            nvt = Nv * layout.block_size
            sel = _selection(q_t[:, :, v0:v0 + nvt], k_t[:, :, v0:v0 + nvt], layout, config, q_means, k_means)
            video = sel if video is None else (video | sel)
    mask = assemble_with_text(video, Nt)
    if text_rule_applies(config) and text_mask is not None and Nt > 0:
        mask = apply_text_validity(mask, Nv, layout.tile_volume, text_mask.to(dev),
                                   exact=config.pad_type == "mask")
    return mask


def build_block_mask(q: torch.Tensor, k: torch.Tensor, thw: Tuple[int, int, int], config: SSTAConfig = SSTAConfig(),
                     text_len: int = 0, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SSTA block mask of ``q, k [B, H, S, D]`` (S = t*h*w + text_len, video first).

    Returns bool ``[B, H or 1, N, N]`` in tile order, ``N = Nv + Nt`` (video tiles in raster
    order, then text blocks). H is 1 for ``mask_share_within_head`` and for masks that do not depend
    on q/k (``sta``, ``dense``); a batch dim that does not depend on the data is an expanded view.
    """
    thw, text_len = validate_inputs(q, k, k, thw, config, text_len, text_mask)
    layout = TileLayout(tuple(thw), config.tile_thw, text_len, config.pad_type)
    mask = block_mask_from_tiled(layout.tile(q), layout.tile(k), layout, config, text_mask)
    return mask.expand(q.shape[0], *mask.shape[1:])

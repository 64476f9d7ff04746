"""Block masks in tile order: STA window, top-k selection, text rules, and their union."""

from .build import block_mask_from_tiled, build_block_mask
from .selection import importance_topk, similarity_threshold, similarity_topk, tile_representatives
from .sta import sta_window_mask
from .text import apply_text_validity, assemble_with_text

__all__ = [
    "build_block_mask", "block_mask_from_tiled", "sta_window_mask", "tile_representatives",
    "importance_topk", "similarity_topk", "similarity_threshold", "assemble_with_text",
    "apply_text_validity",
]

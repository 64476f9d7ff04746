"""video_sparse_attn: Selective and Sliding Tile Attention (SSTA) for video diffusion transformers.

Data flows config → layout → masks → plan → kernels → processors.
"""

from .config import SSTAConfig
from .plan import BlockSparsePlan
from .layout import TileLayout
from .masks import build_block_mask
from .attention import SSTAInfo, block_sparse_attention, ssta_attention
from .processors import SSTAAttnProcessor, SSTASchedule, disable_ssta, enable_ssta
from .varlen import block_sparse_attention_varlen
from .warmup import warmup

__all__ = [
    "SSTAConfig", "TileLayout", "build_block_mask", "BlockSparsePlan", "block_sparse_attention",
    "ssta_attention", "SSTAInfo", "SSTAAttnProcessor", "SSTASchedule", "enable_ssta", "disable_ssta",
    "warmup", "block_sparse_attention_varlen",
]
__version__ = "0.1.0"

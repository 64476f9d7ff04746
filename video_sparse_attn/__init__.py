"""video_sparse_attn: Selective and Sliding Tile Attention (SSTA) for video diffusion transformers.

Data flows config → layout → masks → plan → kernels → processors.
"""

from .config import SSTAConfig
from .plan import BlockSparsePlan
from .attention import block_sparse_attention

__all__ = ["SSTAConfig", "BlockSparsePlan", "block_sparse_attention"]
__version__ = "0.1.0"

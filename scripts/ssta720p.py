"""The HunyuanVideo-1.5 720p/121f SSTA problem the benchmark scripts share: thw (31, 45, 80), tiles
6×8×8, the released config for that grid (`SSTAConfig().for_thw`, ``pad_type`` replaceable), 1,985
text tokens of which 1,200 valid, random q / k / v ``[1, H, S, D]`` (seed 0), its tile layout, the
block-ordered tensors and the block mask; and the plans built from it (padded, or padding-free as
`ssta_attention` builds it for a backend).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

THW, TEXT, VALID = (31, 45, 80), 1985, 1200


class Problem(NamedTuple):
    cfg: object
    layout: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    text_mask: torch.Tensor          # [1, TEXT] bool, VALID valid tokens first
    tiled: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    mask: torch.Tensor               # [1, H, N, N] bool block mask

    @property
    def kept(self) -> int:
        """Kept (query block, key block) pairs over the heads."""
        return int(self.mask.expand(1, self.q.shape[1], -1, -1).sum())

    def flop(self, head_dim: int) -> float:
        """Forward FLOPs of the padded plan's kept blocks (4·kept·bs²·D)."""
        bs = self.layout.block_size
        return 4.0 * self.kept * bs * bs * head_dim


def build(heads: int = 16, head_dim: int = 128, pad_type: Optional[str] = None, device="cuda",
          dtype=torch.bfloat16, requires_grad: bool = False) -> Problem:
    from video_sparse_attn import SSTAConfig, TileLayout
    from video_sparse_attn.masks.build import block_mask_from_tiled

    torch.manual_seed(0)
    cfg = SSTAConfig().for_thw(THW)
    if pad_type is not None:
        cfg = cfg.replace(pad_type=pad_type)
    S = math.prod(THW) + TEXT
    q, k, v = (torch.randn(1, heads, S, head_dim, device=device, dtype=dtype, requires_grad=requires_grad)
               for _ in range(3))
    tm = torch.zeros(1, TEXT, dtype=torch.bool, device=device)
    tm[:, :VALID] = True
    layout = TileLayout(THW, cfg.tile_thw, TEXT, cfg.pad_type)
    with torch.no_grad():
        tiled = tuple(layout.tile(x.detach()) for x in (q, k, v))
        mask = block_mask_from_tiled(*tiled[:2], layout, cfg, tm)
    return Problem(cfg, layout, q, k, v, tm, tiled, mask)


def padded_plan(p: Problem):
    """The plan of the padded blocks (every slot of a kept tile is a key; text validity as the layout says)."""
    from video_sparse_attn import BlockSparsePlan

    bs = p.layout.block_size
    return BlockSparsePlan.from_block_mask(p.mask, bs, bs, p.layout.key_valid(p.text_mask, p.q.device))


def padding_free_plan(p: Problem, backend: str, backward: bool = True):
    """The plan `ssta_attention` runs padding-free on ``backend``: padded query rows skipped, zero keys by
    the backend's key tiles, ``repeat`` copies with a key bias where the backend adds one (on Triton only
    when a ``backward`` follows)."""
    from video_sparse_attn import BlockSparsePlan
    from video_sparse_attn.attention import _key_args
    from video_sparse_attn.kernels.registry import BACKENDS

    bs, dev = p.layout.block_size, p.q.device
    k_valid, key_bias = _key_args(p.layout, BACKENDS[backend], p.q, p.text_mask, True, backward=backward)
    return BlockSparsePlan.from_block_mask(p.mask, bs, bs, k_valid, p.layout.query_valid(dev), key_bias=key_bias)

"""Sparse attention during training: the one seam that installs SSTA, and the sparsity ramp.

A ramp starts dense and narrows toward the target config (VSA-style sparsity annealing):
``warmup_steps`` dense steps (`SSTAConfig.as_dense`: every block, padding masked), then over ``ramp_steps`` the top-k shrinks from every tile to
``target.topk`` and the STA window from the whole tile grid to ``target.kernel_thw``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from ..config import SSTAConfig
from ..layout import TileLayout

__all__ = ["SparsityRamp", "set_sparse_attention", "remove_sparse_attention"]


class SparsityRamp:
    """Config per optimizer step: dense, then linearly sparser, then ``target``.

    Args:
        target: the config training ends with (saved beside the weights).
        grid_thw: token grid ``(t, h, w)`` of the training latents (after patchify).
        warmup_steps: steps run with ``sparse_type="dense"``.
        ramp_steps: steps over which top-k and window shrink to the target (0 = jump).
    """

    def __init__(self, target: SSTAConfig, grid_thw: Tuple[int, int, int], warmup_steps: int = 0,
                 ramp_steps: int = 0):
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(f"warmup_steps and ramp_steps must be >= 0, got {warmup_steps}, {ramp_steps}")
        self.target, self.grid_thw = target, tuple(grid_thw)
        self.warmup_steps, self.ramp_steps = warmup_steps, ramp_steps
        resolved = target.for_thw(self.grid_thw)  # topk / tile actually used at this grid
        self._tiles = TileLayout(self.grid_thw, resolved.tile_thw).tiles_thw
        self._topk_scale = max(1, target.topk) / max(1, resolved.topk)  # undo the caller rules' halving

    def config_at(self, step: int) -> SSTAConfig:
        """The config for optimizer step ``step`` (0-based)."""
        if self.target.sparse_type == "dense" or step >= self.warmup_steps + self.ramp_steps:
            return self.target
        if step < self.warmup_steps:
            return self.target.as_dense()
        f = (step - self.warmup_steps + 1) / (self.ramp_steps + 1)  # in (0, 1): never fully dense
        n_tiles = math.prod(self._tiles)
        full_topk = math.ceil(n_tiles * self._topk_scale)
        topk = max(self.target.topk, round(full_topk + f * (self.target.topk - full_topk)))
        window = tuple(
            max(k, round(2 * n + 1 + f * (k - (2 * n + 1))))  # 2n+1 covers an axis of n tiles
            for k, n in zip(self.target.kernel_thw, self._tiles, strict=True))
        return self.target.replace(topk=int(topk), kernel_thw=window)


def set_sparse_attention(transformer: torch.nn.Module, config: Optional[SSTAConfig],
                         backend: str = "auto", stats: Any = None) -> None:
    """Install SSTA processors with ``config`` on ``transformer`` (None → the stock processors).

    Calling it again with another config replaces the installed one (``enable_ssta`` called again
    replaces its previous settings); the ramp does this between optimizer steps. ``stats``: an
    optional `video_sparse_attn.processors.SSTAStats` that records each call's block density.
    """
    if getattr(transformer, "_vsa_training_config", None) is None and config is None:
        return  # stock processors in place and wanted
    from ..processors import disable_ssta, enable_ssta

    if config is None:
        disable_ssta(transformer)
    else:
        enable_ssta(transformer, config, backend=backend, stats=stats)
    transformer._vsa_training_config = config


def remove_sparse_attention(transformer: torch.nn.Module) -> None:
    """Restore the stock processors if `set_sparse_attention` installed SSTA."""
    set_sparse_attention(transformer, None)

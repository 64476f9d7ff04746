"""Input checks shared by `ssta_attention` and `build_block_mask`: caller mistakes become clear errors."""

from __future__ import annotations

from typing import Sequence

import torch

from .config import SSTAConfig

__all__ = ["validate_inputs"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_inputs(q, k, v, thw, config, text_len, text_mask) -> None:
    """Caller mistakes → ValueError / TypeError naming the problem."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, D] (4-D), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if min(q.shape) < 1:
        raise ValueError(f"q has an empty dimension: {tuple(q.shape)}")
    if not isinstance(config, SSTAConfig):
        raise TypeError(f"config must be an SSTAConfig, got {type(config).__name__}")
    if not isinstance(thw, Sequence) or len(thw) != 3 or any(
        isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in thw
    ):
        raise ValueError(f"thw must be three positive ints (t, h, w), got {thw!r}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    S = q.shape[2]
    t, h, w = thw
    if S != t * h * w + text_len:
        raise ValueError(
            f"sequence length S={S} does not match the grid: t*h*w + text_len = {t}*{h}*{w} + {text_len} "
            f"= {t * h * w + text_len}"
        )
    if text_mask is not None:
        if not isinstance(text_mask, torch.Tensor):
            raise TypeError(f"text_mask must be a tensor, got {type(text_mask).__name__}")
        if text_len == 0:
            raise ValueError("text_mask given but text_len == 0")
        if tuple(text_mask.shape) != (q.shape[0], text_len):
            raise ValueError(f"text_mask must be [B, text_len] = [{q.shape[0]}, {text_len}], got {tuple(text_mask.shape)}")
        if text_mask.dtype.is_floating_point or text_mask.dtype.is_complex:
            raise TypeError(f"text_mask must be bool or integer (True/1 = valid), got {text_mask.dtype}")
        if text_mask.device != q.device:
            raise ValueError(f"text_mask is on {text_mask.device} but q is on {q.device}")

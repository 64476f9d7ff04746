"""STA: the sliding 3-D window of key tiles around each query tile (static per shape)."""

from __future__ import annotations

import functools
from typing import Tuple

import torch

__all__ = ["sta_window_mask"]


def _axis_window(n: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [n, n]: query tile a keeps key tile x along one axis.

    The window centre is clamped so it never shrinks at the borders: ``c = min(max(a, r), n-1-r)``
    with ``r = k // 2`` (the upper bound wins when the range is empty, so a window wider than the
    axis covers all of it); keep iff ``|c - x| <= r``. An even k therefore acts like k + 1.
    """
    r = k // 2
    a = torch.arange(n, device=device)
    centre = torch.clamp(torch.clamp(a, min=r), max=n - 1 - r)
    return (centre[:, None] - a[None, :]).abs() <= r


def _sta_build(tiles_thw: Tuple[int, int, int], kernel_thw: Tuple[int, int, int],
               device: torch.device | str = "cpu") -> torch.Tensor:
    wt, wh, ww = (_axis_window(n, k, device) for n, k in zip(tiles_thw, kernel_thw))
    m = wt[:, None, None, :, None, None] & wh[None, :, None, None, :, None] & ww[None, None, :, None, None, :]
    nv = wt.shape[0] * wh.shape[0] * ww.shape[0]
    return m.reshape(nv, nv)


@functools.lru_cache(maxsize=128)
def _sta_cpu(tiles_thw: Tuple[int, int, int], kernel_thw: Tuple[int, int, int]) -> torch.Tensor:
    return _sta_build(tiles_thw, kernel_thw)


@functools.lru_cache(maxsize=128)
def _sta_device(tiles_thw, kernel_thw, device: str) -> torch.Tensor:
    return _sta_cpu(tiles_thw, kernel_thw).to(device)


def sta_window_mask(tiles_thw: Tuple[int, int, int], kernel_thw: Tuple[int, int, int],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[Nv, Nv]`` over video tiles in raster order (cached per shape and device; built in the
    graph under `torch.compile`)."""
    if torch.compiler.is_compiling():
        return _sta_build(tuple(tiles_thw), tuple(kernel_thw), device)
    return _sta_device(tuple(tiles_thw), tuple(kernel_thw), str(torch.device(device)))

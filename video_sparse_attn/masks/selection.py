"""Selection: top-k key tiles per query tile from pooled q/k representatives (MoBA-style).

All functions are batched over ``[B, H]`` (H may be 1 for head-shared masks) with tensor ops only.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

__all__ = ["tile_representatives", "importance_topk", "similarity_topk", "similarity_threshold"]


def _adaptive_weights(n: int, p: int) -> torch.Tensor:
    """[p, n] averaging weights of PyTorch's adaptive average pooling along one axis."""
    w = torch.zeros(p, n, dtype=torch.float64)
    for o in range(p):
        lo, hi = (o * n) // p, -(-((o + 1) * n) // p)
        w[o, lo:hi] = 1.0 / (hi - lo)
    return w


@functools.lru_cache(maxsize=64)
def _pool_matrix(tile: Tuple[int, int, int], pool: Tuple[int, int, int]) -> torch.Tensor:
    """[P, bs] weights: sub-cube averages of a tile in raster order (P = prod(pool))."""
    wt, wh, ww = (_adaptive_weights(n, p) for n, p in zip(tile, pool))
    return torch.einsum("at,bh,cw->abcthw", wt, wh, ww).reshape(math.prod(pool), math.prod(tile)).float()


@functools.lru_cache(maxsize=64)
def _pool_matrix_on(tile, pool, device: str) -> torch.Tensor:
    return _pool_matrix(tile, pool).to(device)


def tile_representatives(x_video: torch.Tensor, layout, pool: Optional[Tuple[int, int, int]] = None,
                         share_heads: bool = False) -> torch.Tensor:
    """Pooled representatives of each video tile, float32.

    Args:
        x_video: block-ordered video part ``[B, H, Nv*bs, D]`` (padding included, as zeros or
            repeats, so every tile mean is over ``bs`` tokens as in the reference).
        layout: the `TileLayout`; pool: sub-cubes per tile (None = plain mean).
        share_heads: average over heads (→ H = 1).
    Returns:
        ``[B, H or 1, Nv, D]`` for plain means, ``[B, H or 1, Nv, P*D]`` for pooled sub-cubes.
    """
    B, H, _, D = x_video.shape
    Nv, bs = layout.num_video_blocks, layout.block_size
    xb = x_video.reshape(B, H, Nv, bs, D)
    if pool is None:   # sums over the block divided by the tile volume: a storage tail adds zeros
        reps = xb.sum(dim=3, dtype=torch.float32) / layout.tile_volume
    else:
        if torch.compiler.is_compiling():   # the cache is eager-only; in a graph it is a few small ops
            w = _pool_matrix.__wrapped__(layout.tile_thw, tuple(pool)).to(x_video.device)
        else:
            w = _pool_matrix_on(layout.tile_thw, tuple(pool), str(x_video.device))     # [P, bs]
        # slots are permuted inside each tile (real tokens first): permute the weights alike; the
        # storage tail (raster position = tile volume) gets weight 0
        w = torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)
        w = w[:, layout.indices(x_video.device)["slot_raster"]].transpose(0, 1)      # [Nv, P, bs]
        reps = torch.einsum("npk,bhnkd->bhnpd", w, xb.float())
        reps = reps.reshape(B, H, Nv, -1)
    return reps.mean(dim=1, keepdim=True) if share_heads else reps


def _keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = scores.topk(min(k, scores.shape[-1]), dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def importance_scores(q_rep: torch.Tensor, k_rep: torch.Tensor, lam: float) -> torch.Tensor:
    """``λ·sim − (1−λ)·red`` [B, H, Nv, Nv] on unit-normalised representatives.

    ``sim[i,j] = (q̂_i·k̂_j + 1)/2``; ``red[j]`` = mean over ``i ≠ j`` of ``(k̂_i·k̂_j + 1)/2``.
    """
    qn = q_rep / q_rep.norm(dim=-1, keepdim=True)
    kn = k_rep / k_rep.norm(dim=-1, keepdim=True)
    sim = (qn @ kn.transpose(-1, -2) + 1) / 2
    # Σ_{i≠j} (k̂_i·k̂_j + 1)/2 = ((Σ_i k̂_i)·k̂_j − k̂_j·k̂_j + Nv − 1)/2: one pass, no Nv×Nv gram matrix
    nv = kn.shape[-2]
    col = (kn * kn.sum(dim=-2, keepdim=True)).sum(-1) - (kn * kn).sum(-1)
    red = (col + (nv - 1)) / 2 / max(nv - 1, 1)
    return lam * sim - (1 - lam) * red.unsqueeze(-2)


def importance_topk(q_rep: torch.Tensor, k_rep: torch.Tensor, topk: int, lam: float) -> torch.Tensor:
    """bool [B, H, Nv, Nv]: the ``min(topk, Nv)`` best key tiles by importance per query tile."""
    return _keep_topk(importance_scores(q_rep, k_rep, lam), topk)


def similarity_topk(q_rep: torch.Tensor, k_rep: torch.Tensor, topk: int) -> torch.Tensor:
    """bool [B, H, Nv, Nv]: top ``min(topk, Nv)`` key tiles by the raw gate ``q̄·k̄``."""
    return _keep_topk(q_rep @ k_rep.transpose(-1, -2), topk)


def similarity_threshold(q_rep: torch.Tensor, k_rep: torch.Tensor, topk: int, threshold: float,
                         temperature: float = 0.01, min_k: int = 8) -> torch.Tensor:
    """bool [B, H, Nv, Nv]: per row, the smallest k whose softmax mass reaches ``threshold``.

    ``p = softmax(q̄·k̄ / temperature)``; sorted descending, ``k_i`` is the first position whose
    cumulative sum reaches the threshold, plus one (``topk`` if never reached), clamped to
    ``[min_k, topk]`` (and to Nv); the ``k_i`` best key tiles are kept.
    """
    gate = q_rep @ k_rep.transpose(-1, -2)
    nv = gate.shape[-1]
    # With a small temperature many p underflow to exactly 0; when k is clamped up to min_k the
    # choice among those ties follows torch.sort on the device, as in the reference (the golden
    # cases, made on CPU, reproduce exactly there; on CUDA such ties may resolve differently).
    p_sorted, order = torch.softmax(gate / temperature, dim=-1).sort(dim=-1, descending=True)
    reached = p_sorted.cumsum(-1) >= threshold
    first = reached.to(torch.int8).argmax(-1)
    k_row = torch.where(reached.any(-1), first + 1, torch.full_like(first, topk))
    k_row = k_row.clamp(min=min_k).clamp(max=topk).clamp(max=nv)
    keep_sorted = torch.arange(nv, device=gate.device) < k_row.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

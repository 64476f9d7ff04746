"""Public ops: `block_sparse_attention` (a plan over block-ordered tensors) and `ssta_attention`."""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import torch

from .config import SSTAConfig
from .kernels import triton_runs_on
from .layout import TileLayout
from .masks.build import block_mask_from_tiled
from .plan import BlockSparsePlan
from .validation import validate_block_inputs, validate_inputs

__all__ = ["block_sparse_attention", "ssta_attention", "SSTAInfo"]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' → 'triton' on CUDA when Triton imports, else 'torch'. Explicit choices never fall back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if triton_runs_on(q) else "torch"
    if backend == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before Triton is imported, "
            f"to run the kernels in Triton's CPU interpreter); got tensors on {q.device}"
        )
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of block-ordered ``q [B,H,Sq,D]``, ``k, v [B,H,Sk,D]`` over ``plan``.

    Returns ``(out [B,H,Sq,D], lse [B,H,Sq] float32, natural log)``; gradients flow to q, k, v.
    Inputs and ``scale`` (finite, > 0) are checked here, the same way for every backend.
    """
    scale = validate_block_inputs(q, k, v, plan, scale)
    match resolve_backend(backend, q):
        case "torch":
            from .kernels.torch_ref import block_sparse_attention_torch

            return block_sparse_attention_torch(q, k, v, plan, scale)
        case "triton":
            from .kernels.triton_op import block_sparse_attention_triton

            return block_sparse_attention_triton(q, k, v, plan, scale)


class SSTAInfo(NamedTuple):
    """What `ssta_attention(..., return_info=True)` also returns (tensors stay on the device)."""

    block_mask: torch.Tensor   # bool [B or 1, H or 1, N, N], tile order
    plan: BlockSparsePlan
    density: torch.Tensor      # float32 scalar: mean of the block mask
    layout: TileLayout


def ssta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thw: Tuple[int, int, int],
    config: SSTAConfig = SSTAConfig(),
    text_len: int = 0,
    text_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_info: bool = False,
    strict_tiles: bool = True,
    validate: Optional[bool] = None,
):
    """Selective and Sliding Tile Attention over a ``[video | text]`` sequence.

    Args:
        q, k, v: ``[B, H, S, D]`` (any strides; e.g. ``x.transpose(1, 2)`` of diffusers' ``[B, S, H, D]``),
            ``S = t*h*w + text_len``: video tokens in raster order over ``thw``, then text.
        thw: unpadded latent grid ``(t, h, w)``.
        config: `SSTAConfig` (used as given; `SSTAConfig.for_thw` applies the model's caller rules).
        text_len: L, number of text tokens at the end of the sequence.
        text_mask: optional ``[B, L]`` bool, True = valid text token (valid tokens form a prefix).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or ``"triton"``.
        return_info: also return an `SSTAInfo` (block mask, plan, density, layout).
        strict_tiles: refuse a tile longer than the grid while padding stays visible (``pad_type``
            ``zero`` / ``repeat``; see `validation.check_tiles`).
        validate: check that ``text_mask`` is a prefix mask (reads its values). None (default): only
            when it is on the CPU; True: also on a GPU (one host synchronisation); False: never.

    Returns:
        ``out [B, H, S, D]`` in q's dtype (and `SSTAInfo` when ``return_info``).

    Example::

        out = ssta_attention(q, k, v, thw=(31, 45, 80), config=SSTAConfig(topk=32), text_len=1985,
                             text_mask=mask)
    """
    validate_inputs(q, k, v, thw, config, text_len, text_mask, strict_tiles, validate)
    backend = resolve_backend(backend, q)
    layout = TileLayout(tuple(thw), config.tile_thw, text_len, config.pad_type)
    # one pass over q and k both reorders them and yields the tile means the selection needs
    needs_means = config.sparse_type in ("ssta", "block_attn") and config.pool_thw is None
    (q_t, q_means), (k_t, k_means) = (layout.tile_with_means(x) if needs_means else (layout.tile(x), None)
                                      for x in (q, k))
    v_t = layout.tile(v)
    block_mask = block_mask_from_tiled(q_t, k_t, layout, config, text_mask, q_means, k_means)
    bs = layout.block_size
    plan = BlockSparsePlan.from_block_mask(block_mask, bs, bs, layout.key_valid(text_mask, q.device))
    out_t, _ = block_sparse_attention(q_t, k_t, v_t, plan, scale, backend)
    out = layout.untile(out_t)
    if return_info:
        return out, SSTAInfo(block_mask, plan, plan.density, layout)
    return out

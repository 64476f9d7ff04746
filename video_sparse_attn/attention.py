"""Public ops: `block_sparse_attention` (a plan over block-ordered tensors) and `ssta_attention`."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .config import SSTAConfig
from .kernels.registry import AttentionCall, BackendSpec, select_backend
from .layout import TileLayout
from .masks.build import block_mask_from_tiled
from .padding_free import add_zero_keys, zero_keys_per_row_block
from .plan import BlockSparsePlan
from .validation import check_scale, validate_block_inputs, validate_inputs

__all__ = ["block_sparse_attention", "ssta_attention", "SSTAInfo", "resolve_backend"]


def resolve_backend(backend: str, q: torch.Tensor, plan: Optional[BlockSparsePlan] = None) -> str:
    """The name of the backend that runs ``q`` (and ``plan``) for ``backend`` (see `kernels.registry`)."""
    return select_backend(backend, AttentionCall.of(q, plan)).name


def _run(spec: BackendSpec, q, k, v, plan, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    return spec.load()(q, k, v, plan, scale)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of block-ordered ``q [B,H,Sq,D]``, ``k, v [B,H,Sk,D]`` over ``plan``.

    ``backend``: ``"auto"`` (the fastest backend that supports the call: ``fa4`` → ``triton`` →
    ``torch``), or one of `kernels.registry.BACKENDS` by name (never falls back; raises one line
    naming what it lacks).

    Returns ``(out [B,H,Sq,D], lse [B,H,Sq] float32, natural log)``; gradients flow to q, k, v through
    both (lse is differentiable, so chunks can be merged by their LSE).
    """
    scale = validate_block_inputs(q, k, v, plan, scale)   # the same checks for every backend
    spec = select_backend(backend, AttentionCall.of(q, plan))
    return _run(spec, q, k, v, plan, scale)


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
    padding_free: bool = True,
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
        backend: ``"auto"`` (the fastest backend that supports the call) or a backend name
            (``"fa4"``, ``"triton"``, ``"torch"``; see `kernels.registry`).
        return_info: also return an `SSTAInfo` (block mask, plan, density, layout).
        padding_free: compute no padded query row and load no zero-padded key (their exact effect on
            the softmax is added back, see `padding_free`); the result equals the padded computation
            to rounding. ``False`` runs the padded blocks as they are (for comparison).
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
    scale = check_scale(scale, q.shape[-1])
    layout = TileLayout(tuple(thw), config.tile_thw, text_len, config.pad_type)
    bs = layout.block_size
    spec = select_backend(backend, AttentionCall(q.device, q.dtype, int(q.shape[-1]), bs, bs))
    # one pass over q and k both reorders them and yields the tile means the selection needs
    needs_means = config.sparse_type in ("ssta", "block_attn") and config.pool_thw is None
    (q_t, q_means), (k_t, k_means) = (layout.tile_with_means(x) if needs_means else (layout.tile(x), None)
                                      for x in (q, k))
    v_t = layout.tile(v)
    block_mask = block_mask_from_tiled(q_t, k_t, layout, config, text_mask, q_means, k_means)
    dev = q.device
    plan = BlockSparsePlan.from_block_mask(
        block_mask, bs, bs, layout.key_valid(text_mask, dev, padding_free),
        layout.query_valid(dev) if padding_free else None,
    )
    out_t, lse = _run(spec, q_t, k_t, v_t, plan, scale)
    if padding_free and config.pad_type == "zero":
        out_t, lse = add_zero_keys(out_t, lse, zero_keys_per_row_block(block_mask, layout.zero_keys(dev)), bs)
    out = layout.untile(out_t)
    if return_info:
        return out, SSTAInfo(block_mask, plan, plan.density, layout)
    return out

"""Compile (and tune) the attention kernels ahead of time, so the first real call does not stall.

    from video_sparse_attn.warmup import warmup
    warmup((1, 16, (31, 45, 80), 128, torch.bfloat16, 384))        # HunyuanVideo-1.5 720p/121f, 16 heads

Each shape is ``(B, H, S or (t, h, w), D, dtype, block)`` (or a dict with those names; ``block`` is an
int or ``(q_block, k_block)``). For every shape:

1. (``q_block == k_block``) one real `ssta_attention` call, forward and (unless ``backward=False``)
   backward, on a small grid of the SSTA tile (``tile``, or ``config.tile_thw``; default: the
   package's (6, 8, 8) for 384-token blocks, else ``(1, 1, block)``) that has padding along every
   tiled axis and a padded, masked text tail — once with q, k, v as ``[B, H, S, D]`` tensors and once
   as transposed ``[B, S, H, D]`` views (what diffusers' processors pass). It runs every kernel of the
   SSTA path, with the arguments a real call passes them: the row gathers that reorder q, k, v (with
   and without tile means), the attention forward, the fused untile with the zero-key correction, and
   in the backward the untile's backward, the attention backward and the gathers that return the
   gradients to token order. A synthetic stand-in misses some of them (see benchmarks/NOTES.md,
   "First call").
2. the forward and backward of `block_sparse_attention` over a banded block mask at length S (what a
   direct caller of the block-sparse op runs), with ``kernel_options`` / ``deterministic`` / ``bshd``.

Triton compiles each kernel variant (on Hopper also the Gluon kernels the `triton` backend runs
there), and kernel families that neither the on-disk tuning cache nor
the shipped table know are autotuned and recorded (see `video_sparse_attn.kernels.tuning`), so later
processes skip tuning too. The kernels do not specialise on the sequence length, the grid or the
plan's strides (their shape arguments are ``do_not_specialize``; the block-ordered lengths are
multiples of 16), so the variants compiled here are the ones a real call of any size selects — for
head dims that are multiples of 16; for other head dims a row stride ``S·D`` may or may not be
divisible by 16, and the SSTA call runs at two lengths to cover both. Compilation results land in
Triton's own cache (``~/.triton/cache``). With the FlashAttention-4 backend, its CuTe kernels are
compiled for the shape's dtype and head dim and kept in FA4's disk cache
(``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``, set by the backend unless you chose otherwise;
``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR`` moves it). Tuning keys never include the sequence length, so
any length warms every length.

`video_sparse_attn.kernels.variants.warmup_variants` lists the variants this compiles for an sm90
GPU without one (tests check that they include those of a real 720p call).

The command line: ``python -m video_sparse_attn warmup --heads 16 --head-dim 128 --tile 6,8,8``.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Tuple, Union

import torch

from .plan import BlockSparsePlan

__all__ = ["warmup"]

_NAMES = ("batch", "heads", "seq", "head_dim", "dtype", "block")
Shape = Union[Sequence, dict]


def _parse(shape: Shape):
    if isinstance(shape, dict):
        unknown = set(shape) - set(_NAMES)
        if unknown:
            raise ValueError(f"unknown warm-up shape keys {sorted(unknown)}; expected {list(_NAMES)}")
        shape = [shape.get(n) for n in _NAMES]
    if len(shape) != 6:
        raise ValueError(f"a warm-up shape is (B, H, S or (t, h, w), D, dtype, block), got {shape!r}")
    B, H, seq, D, dtype, block = shape
    S = math.prod(seq) if isinstance(seq, (tuple, list)) else int(seq)
    qb, kb = (block, block) if isinstance(block, int) else tuple(block)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return int(B), int(H), S, int(D), dtype, int(qb), int(kb)


def _plan(S: int, qb: int, kb: int, device, width: int = 32) -> BlockSparsePlan:
    """A banded plan (``width`` key blocks per query block) over S tokens, ragged last blocks."""
    from .attention import _plan_for_mask

    Mq, Nk = -(-S // qb), -(-S // kb)
    centre = torch.arange(Mq, device=device) * Nk // Mq
    cols = torch.arange(Nk, device=device)
    return _plan_for_mask((cols[None, :] - centre[:, None]).abs() <= width // 2, S, S, qb, kb)


def _ssta_config(block: int, tile: Optional[Tuple[int, int, int]], config):
    """The SSTA config the warm-up call runs: ``config`` (its tile) or the default config with ``tile``
    (default: `SSTAConfig`'s tile when its block is ``block``, else ``(1, 1, block)``); ``topk`` small
    (the grid is)."""
    from .config import SSTAConfig
    from .layout import block_slots

    if config is None:
        if tile is None:   # the package's default tile when its block is this one
            default = SSTAConfig().tile_thw
            tile = default if block_slots(math.prod(default)) == block else (1, 1, block)
        config = SSTAConfig(tile_thw=tuple(tile))
    config = config.replace(topk=2, caller_rules=False)
    if block_slots(config.block_size) != block:
        raise ValueError(f"the SSTA tile {config.tile_thw} makes blocks of {block_slots(config.block_size)} "
                         f"tokens, not the shape's {block}")
    return config


def _twos(n: int) -> int:
    """The exponent of 2 in ``n`` (n > 0)."""
    return (n & -n).bit_length() - 1


def _ssta_grids(config, D: int):
    """Small ``(thw, text_len)`` grids with padding along every tiled axis and a padded text tail.

    The row gathers and the untile specialise the head / batch strides of the token-ordered tensors
    (``S·D``, ``H·S·D``) on divisibility by 16. With a head dim that is a multiple of 16 they always
    are: one grid. Otherwise it depends on the power of 2 in S: one grid per exponent up to where
    ``S·D`` is a multiple of 16 (the block-ordered lengths are multiples of 16 anyway)."""
    Tt, Th, Tw = config.tile_thw
    thw = tuple(t + 1 if t > 1 else 2 for t in (Tt, Th, Tw))
    video, vol = math.prod(thw), config.block_size
    top = max(0, 4 - _twos(D))
    grids = []
    for e in range(top + 1):
        text = vol + 1
        while not (_twos(video + text) == e or (e == top and _twos(video + text) >= e)):
            text += 1
        grids.append((thw, text))
    return grids


def _random(B: int, H: int, n: int, D: int, dtype, device, bshd: bool, grad: bool) -> torch.Tensor:
    """Random ``[B, H, n, D]`` input, as a transposed ``[B, n, H, D]`` view with ``bshd``."""
    if bshd:
        return torch.randn(B, n, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(grad)
    return torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=grad)


def _warm_ssta(B: int, H: int, D: int, dtype, config, backend: str, backward: bool, device) -> None:
    """Real `ssta_attention` calls (forward, backward) on small padded grids, both q/k/v layouts."""
    from .attention import ssta_attention

    for thw, text_len in _ssta_grids(config, D):
        S = math.prod(thw) + text_len
        text_mask = torch.arange(text_len, device=device)[None].expand(B, -1) < text_len - 3
        for bshd in (False, True):
            q, k, v = (_random(B, H, S, D, dtype, device, bshd, backward) for _ in range(3))
            with torch.set_grad_enabled(backward):
                out = ssta_attention(q, k, v, thw, config, text_len, text_mask, backend=backend, validate=False)
            if backward:
                out.backward(torch.randn_like(out))


def warmup(*shapes: Shape, kernel_options: Optional[dict] = None, deterministic: Optional[bool] = None,
           backward: bool = True, bshd: bool = False, device: Union[str, torch.device, None] = None,
           backend: str = "auto", tile: Optional[Tuple[int, int, int]] = None, config=None) -> list:
    """Compile/tune the forward (and backward) of ``backend`` for each shape (``"auto"``: the backend
    `block_sparse_attention` would pick for it); returns the seconds each took.

    ``kernel_options`` / ``deterministic``: as passed to `block_sparse_attention_triton` later (each
    combination is its own kernel variant; `ssta_attention` runs the defaults). ``bshd``: the
    block-sparse op's q, k, v as ``[B, S, H, D]`` views (the SSTA call warms both layouts anyway).
    ``tile`` / ``config``: the SSTA tile (or config) whose call to warm (its block must be the
    shape's); default (6, 8, 8) for 384-token blocks, else ``(1, 1, block)`` (the kernels see only
    the block size).
    """
    from .attention import block_sparse_attention, resolve_backend

    device = torch.device(device or "cuda")
    parsed = [_parse(shape) for shape in shapes]
    configs = [_ssta_config(qb, tile, config) if qb == kb else None for (*_, qb, kb) in parsed]
    seconds = []
    for (B, H, S, D, dtype, qb, kb), cfg in zip(parsed, configs):
        plan = _plan(S, qb, kb, device)
        Sq, Sk = plan.num_q_blocks * qb, plan.num_k_blocks * kb

        start = time.perf_counter()
        if cfg is not None:
            _warm_ssta(B, H, D, dtype, cfg, backend, backward, device)
        q, k, v = (_random(B, H, n, D, dtype, device, bshd, backward) for n in (Sq, Sk, Sk))
        if resolve_backend(backend, q, plan) == "triton":
            from .kernels.triton_op import block_sparse_attention_triton

            out, _ = block_sparse_attention_triton(q, k, v, plan, kernel_options=kernel_options,
                                                   deterministic=deterministic)
        else:
            out, _ = block_sparse_attention(q, k, v, plan, backend=backend)
        if backward:
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds

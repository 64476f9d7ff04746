"""Compile (and tune) the attention kernels ahead of time, so the first real call does not stall.

    from video_sparse_attn.warmup import warmup
    warmup((1, 16, (31, 45, 80), 128, torch.bfloat16, 384))        # HunyuanVideo-1.5 720p/121f, 16 heads

Each shape is ``(B, H, S or (t, h, w), D, dtype, block)`` (or a dict with those names; ``block`` is an
int or ``(q_block, k_block)``). For every shape the forward and (unless ``backward=False``) the
backward run once on random data over a banded block mask at the given length: Triton compiles each
kernel variant, and kernel families that neither the on-disk tuning cache nor the shipped table know
are autotuned and recorded (see `video_sparse_attn.kernels.tuning`), so later processes skip tuning
too; the row gathers that `ssta_attention` reorders q, k, v with are compiled as well. The kernels do
not specialise on the sequence length or the plan's strides, so the variants compiled here are the
ones a real call of any length selects. Compilation results land in Triton's own cache (``~/.triton/cache``). With the FlashAttention-4
backend, its CuTe kernels are compiled for the shape's dtype and head dim and kept in FA4's disk
cache (``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``, set by the backend unless you chose otherwise;
``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR`` moves it). Tuning keys never include the sequence length, so
any length warms every length.

The command line: ``python -m video_sparse_attn warmup --heads 16 --head-dim 128 --tile 6,8,8``.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Union

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
    Mq, Nk = -(-S // qb), -(-S // kb)
    centre = torch.arange(Mq, device=device) * Nk // Mq
    cols = torch.arange(Nk, device=device)
    mask = (cols[None, :] - centre[:, None]).abs() <= width // 2
    k_valid = torch.full((1, Nk), kb, dtype=torch.int32, device=device)
    k_valid[0, -1] = S - (Nk - 1) * kb
    q_valid = torch.full((1, Mq), qb, dtype=torch.int32, device=device)
    q_valid[0, -1] = S - (Mq - 1) * qb
    return BlockSparsePlan.from_block_mask(mask, qb, kb, k_valid, q_valid)


def _compile_gathers(x: torch.Tensor, block: int, device: torch.device) -> None:
    """Compile (not run) the row gathers `ssta_attention` reorders q, k (with tile means) and v
    (without) by, and its fused untile (forward, backward), for blocks of ``block`` tokens (their
    variants do not depend on the length)."""
    from .kernels.registry import triton_runs_on

    if device.type != "cuda" or not triton_runs_on(x):
        return
    from .kernels.precompile import compile_only
    from .kernels.triton_gather import gather_rows_with_means

    from .kernels.triton_untile import untile_scaled_bwd, untile_scaled_fwd

    src = torch.arange(x.shape[2], device=device)
    B, H, S, _ = x.shape
    lse = torch.empty(B, H, S, device=device)
    n = torch.empty(1, 1, S // block, device=device)
    with compile_only():
        gather_rows_with_means(x, src, block, 1 + x.shape[2] // block, block)
        gather_rows_with_means(x, src, block, 0)
        # the last pass of padding-free SSTA: untile with the zero-key correction, and its backward
        y = untile_scaled_fwd(x, lse, n, src, block, like=x)
        untile_scaled_bwd(y, x, lse, n, src, block)


def warmup(*shapes: Shape, kernel_options: Optional[dict] = None, deterministic: Optional[bool] = None,
           backward: bool = True, bshd: bool = False, device: Union[str, torch.device, None] = None,
           backend: str = "auto") -> list:
    """Compile/tune the forward (and backward) of ``backend`` for each shape (``"auto"``: the backend
    `block_sparse_attention` would pick for it); returns the seconds each took.

    ``kernel_options`` / ``deterministic``: as passed to `block_sparse_attention_triton` later (each
    combination is its own kernel variant). ``bshd``: q, k, v as ``[B, S, H, D]`` views (diffusers'
    layout), whose strides may select a different compiled variant.
    """
    from .attention import block_sparse_attention, resolve_backend

    device = torch.device(device or "cuda")
    seconds = []
    for shape in shapes:
        B, H, S, D, dtype, qb, kb = _parse(shape)
        plan = _plan(S, qb, kb, device)
        Sq, Sk = plan.num_q_blocks * qb, plan.num_k_blocks * kb

        def make(n):
            if bshd:
                return torch.randn(B, n, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward)
            return torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=backward)

        q, k, v = make(Sq), make(Sk), make(Sk)
        start = time.perf_counter()
        _compile_gathers(q, qb, device)
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

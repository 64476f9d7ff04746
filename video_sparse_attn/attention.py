"""Public ops: `block_sparse_attention` (a plan over block-ordered tensors) and `ssta_attention`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .plan import BlockSparsePlan

__all__ = ["block_sparse_attention"]

BACKENDS = ("auto", "torch", "triton")


def _triton_usable(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' → 'triton' on CUDA when Triton imports, else 'torch'. Explicit choices never fall back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if _triton_usable(q) else "torch"
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
    """
    match resolve_backend(backend, q):
        case "torch":
            from .kernels.torch_ref import block_sparse_attention_torch

            return block_sparse_attention_torch(q, k, v, plan, scale)
        case "triton":
            from .kernels.triton_op import block_sparse_attention_triton

            return block_sparse_attention_triton(q, k, v, plan, scale)

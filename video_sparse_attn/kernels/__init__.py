"""Attention kernels over a `BlockSparsePlan`.

- `torch_ref`: pure PyTorch (CPU path and test oracle).
- `triton_fwd` / `triton_bwd` / `triton_op`: Triton kernels for Hopper that also run on Ampere/Ada
  (imported lazily: `import video_sparse_attn` needs only torch).

Kernels know nothing of diffusers, tiles or SSTA: they see a plan and block-ordered tensors.
"""

import functools

import torch

from .torch_ref import block_sparse_attention_torch

__all__ = ["block_sparse_attention_torch", "triton_runs_on"]


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device (CUDA and Triton installed)."""
    return t.is_cuda and _triton_importable()

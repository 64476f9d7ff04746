"""Attention kernels over a `BlockSparsePlan`.

- `torch_ref`: pure PyTorch (CPU path and test oracle).
- `triton_fwd` / `triton_bwd` / `triton_op`: Triton kernels for Hopper that also run on Ampere/Ada
  (imported lazily: `import video_sparse_attn` needs only torch).

Kernels know nothing of diffusers, tiles or SSTA: they see a plan and block-ordered tensors.
"""

from .torch_ref import block_sparse_attention_torch

__all__ = ["block_sparse_attention_torch"]

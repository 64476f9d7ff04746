"""Attention kernels over a `BlockSparsePlan`, one module per backend, chosen in `registry`.

- `torch_ref`: pure PyTorch (CPU path and test oracle).
- `triton_fwd` / `triton_bwd` / `triton_op`: Triton kernels for Hopper that also run on Ampere/Ada.
- `fa4`: FlashAttention-4's CuTe block-sparse kernels (sm90 / sm100), an optional extra.
- `registry`: each backend's capabilities and the one function that picks a backend.

Only `torch_ref` and `registry` are imported here: `import video_sparse_attn` needs only torch.
Kernels know nothing of diffusers, tiles or SSTA: they see a plan and block-ordered tensors.
"""

from .registry import BACKENDS, AttentionCall, BackendSpec, select_backend, triton_runs_on
from .torch_ref import block_sparse_attention_torch

__all__ = ["block_sparse_attention_torch", "triton_runs_on", "BACKENDS", "AttentionCall", "BackendSpec",
           "select_backend"]

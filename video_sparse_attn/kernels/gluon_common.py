"""What the Gluon (sm90) kernels share: their imports, guarded so that the package imports without
Gluon (`HAS_GLUON`), the names that differ between Triton releases, and the checks every Gluon entry
makes before it takes a call (`hopper_unsupported`).

Gluon (``triton.experimental.gluon``) ships with Triton >= 3.5. Triton 3.6 names the TMA copies
``async_copy_global_to_shared`` / ``async_copy_shared_to_global`` and the partition barrier
``thread_barrier``; later releases ``async_load`` / ``async_store`` and ``barrier`` (the old names
raise there). Everything here resolves to whichever exists.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

#: the oldest Triton whose Gluon API these kernels are written for (3.6: run on Hopper; 3.9: compiled for sm90)
MIN_TRITON = (3, 6)


def version_supported(version: str) -> bool:
    """Whether Triton ``version`` (e.g. ``"3.6.0"``, ``"3.9.0+git1a2b"``) is one the Gluon kernels run on:
    Gluon's API changed between releases, and an older one would fail to compile them at the first call."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= MIN_TRITON


try:  # any import problem, or a Triton older than MIN_TRITON, means "no Gluon"
    import triton

    if not version_supported(triton.__version__):
        raise ImportError(f"Triton {triton.__version__} is older than {MIN_TRITON}")
    import triton.language as tl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier     # the calling partition's warps
    HAS_GLUON = True
except Exception:  # noqa: BLE001
    HAS_GLUON = False

__all__ = ["HAS_GLUON", "MIN_TRITON", "version_supported", "hopper_unsupported", "dtype_unsupported",
           "plan_unsupported"]
if HAS_GLUON:
    __all__ += ["triton", "tl", "gluon", "gl", "fence_async_shared", "mbarrier", "tma", "warpgroup_mma",
                "warpgroup_mma_wait", "TensorDescriptor", "tma_load", "tma_store", "cta_barrier"]


def hopper_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why no Gluon kernel runs on these tensors (None: one may): Gluon importable, not Triton's
    interpreter, a Hopper GPU (compute capability 9.x), q / k / v all bf16 or all fp16."""
    if not HAS_GLUON:
        return "Triton has no Gluon"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton's interpreter"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper (sm90) GPU"
    return dtype_unsupported(q, k, v)


def dtype_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the Gluon kernels do not take these dtypes (None: q / k / v all bf16 or all fp16)."""
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (bf16 / fp16 only)"
    return None


def plan_unsupported(plan, block: int = 128) -> Optional[str]:
    """Why no Gluon kernel runs this plan (None: one may): plan blocks multiples of ``block`` (the
    kernels' 128-row tiles), no token window, no key bias."""
    if plan.q_block % block or plan.k_block % block:
        return f"blocks {plan.q_block}/{plan.k_block} (multiples of {block} only)"
    if plan.has_window:
        return "a token window"
    if plan.key_bias is not None:
        return "a key bias"
    return None

"""Compile Triton kernel variants without launching them, in the foreground or in background threads.

Every kernel launch of the Triton backend goes through `launch`, and every buffer a launch site
allocates through `empty` / `zeros` / `empty_like`. Inside `compile_only()` a launch becomes
``kernel.warmup(...)`` (Triton compiles the exact variant the launch would select — same arguments,
same specialisation — and stores it in its in-memory and disk caches) and buffers are ``meta``
tensors (strides and dtype only, no memory). So the real launch code enumerates the variants: there
is no second list of kernels to keep in step with it.

`precompile_backward_async` uses this at the first forward of a process: while the forward kernel
compiles on the calling thread, one background thread compiles the backward kernels the call will
need (Triton's compiler spends much of its time outside the GIL: ptxas runs as a subprocess, and
most MLIR/LLVM passes run in C++). `wait` (called by the backward before its first launch) joins
it, so a kernel is never compiled twice at once. Results cannot change: only the same kernels are
compiled earlier; a failed background compile is dropped and the launch compiles (and reports) it
itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional

import torch

__all__ = ["compile_only", "compiling_only", "launch", "empty", "zeros", "empty_like", "submit", "wait",
           "precompile_backward_async", "precompile_backward"]

_COMPILE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("vsa_compile_only", default=False)
_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pending: List[Future] = []
_seen: set = set()          # backward signatures already submitted in this process
_MAX_SEEN = 256


@contextlib.contextmanager
def compile_only():
    """Within: Triton launches only compile (``warmup``), buffers are meta tensors (this thread only)."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


def compiling_only() -> bool:
    return _COMPILE_ONLY.get()


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, or only its compilation inside `compile_only`."""
    if _COMPILE_ONLY.get():
        return kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid](*args, **kwargs)


def _device(kwargs):
    return dict(kwargs, device="meta") if _COMPILE_ONLY.get() else kwargs


def empty(*size, **kwargs) -> torch.Tensor:
    return torch.empty(*size, **_device(kwargs))


def zeros(*size, **kwargs) -> torch.Tensor:
    return (torch.empty if _COMPILE_ONLY.get() else torch.zeros)(*size, **_device(kwargs))


def empty_like(x: torch.Tensor, **kwargs) -> torch.Tensor:
    return torch.empty_like(x, **_device(kwargs))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vsa-precompile")
    return _pool


def submit(fn: Callable, device: torch.device) -> Future:
    """Run ``fn()`` inside `compile_only` on a background thread (current CUDA device = ``device``)."""

    def task():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with compile_only():
            fn()

    with _lock:
        future = _executor().submit(task)
        _pending.append(future)
    return future


def wait() -> None:
    """Join every background compile submitted so far (their errors are dropped: the launch that
    needs the kernel compiles it again and raises there). A no-op inside `compile_only`: the
    background compile itself runs the backward's code."""
    if not _pending or _COMPILE_ONLY.get():
        return
    with _lock:
        futures = list(_pending)
        _pending.clear()
    for f in futures:
        try:
            f.result()
        except Exception:      # noqa: BLE001 - the real launch reports it
            pass


def _signature(q, k, v, plan, options, deterministic):
    return (q.device, q.dtype, tuple(q.shape), q.stride(), k.stride(), v.stride(), plan.q_block, plan.k_block,
            plan.has_window, tuple(sorted(options.items())), bool(deterministic))


def precompile_backward(q, k, v, plan, scale: float, options: dict, deterministic: bool) -> None:
    """Compile (on this thread) the backward kernels of a call whose ``dout`` is laid out like its
    ``out`` (``empty_like(q)``), without running them or allocating."""
    from .triton_bwd import attention_backward

    B, H, Sq, _ = q.shape
    with compile_only():
        out = empty_like(q)
        lse = empty(B, H, Sq, dtype=torch.float32)
        attention_backward(q, k, v, out, lse, out, plan, scale, options, deterministic=deterministic)


def precompile_backward_async(q, k, v, plan, scale: float, options: dict, deterministic: bool) -> None:
    """`precompile_backward` on a background thread, once per call signature and process (CUDA
    tensors only; a no-op under the Triton interpreter or inside `compile_only`)."""
    from .triton_common import INTERPRET

    if INTERPRET or not q.is_cuda or _COMPILE_ONLY.get():
        return
    sig = _signature(q, k, v, plan, options, deterministic)
    with _lock:
        if sig in _seen or len(_seen) >= _MAX_SEEN:
            return
        _seen.add(sig)
    submit(lambda: precompile_backward(q, k, v, plan, scale, options, deterministic), q.device)

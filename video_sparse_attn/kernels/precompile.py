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
most MLIR/LLVM passes run in C++). The other backward launches of an SSTA call are submitted the same
way by their forwards (`precompile_async`): the fused untile's backward (`padding_free`) and the row
gather that returns the gradients of q, k, v to token order (`layout`). `wait` (called by each of
these backwards before its first launch) joins them, so a kernel is never compiled twice at once.
Results cannot change: only the same kernels are compiled earlier; a failed background compile is
dropped (kept in `background_errors`, logged at debug level) and the launch compiles (and reports)
it itself. `variants` checks, without a GPU, that each background compile is the variant its
backward launches.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional

import torch

__all__ = ["compile_only", "compiling_only", "launch", "empty", "zeros", "empty_like", "submit", "wait",
           "precompile_async", "precompile_backward_async", "precompile_backward", "background_errors"]

logger = logging.getLogger(__name__)

_COMPILE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("vsa_compile_only", default=False)
_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pending: List[Future] = []
_seen: set = set()          # backward signatures already submitted in this process
_MAX_SEEN = 256
_errors: collections.deque = collections.deque(maxlen=16)


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
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            with compile_only():
                fn()
        except Exception as e:      # noqa: BLE001 - kept for diagnosis; the launch compiles and reports it
            _errors.append(f"{type(e).__name__}: {e}")
            logger.debug("background compile failed", exc_info=True)
            raise

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


def background_errors() -> list:
    """The last background compile failures of this process (``"Type: message"``), oldest first."""
    return list(_errors)


def precompile_async(key, fn: Callable, device: torch.device) -> None:
    """`submit` ``fn`` once per ``key`` and process: CUDA only; a no-op under the Triton interpreter,
    inside `compile_only` and while `torch.compile` traces."""
    from .triton_common import INTERPRET

    if INTERPRET or device.type != "cuda" or _COMPILE_ONLY.get() or torch.compiler.is_compiling():
        return
    with _lock:
        if key in _seen or len(_seen) >= _MAX_SEEN:
            return
        _seen.add(key)
    submit(fn, device)


def _signature(q, k, v, plan, options, deterministic):
    return (q.device, q.dtype, tuple(q.shape), q.stride(), k.stride(), v.stride(), plan.q_block, plan.k_block,
            plan.has_window, plan.key_bias is not None, tuple(sorted(options.items())), bool(deterministic))


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
    precompile_async(("attention",) + _signature(q, k, v, plan, options, deterministic),
                     lambda: precompile_backward(q, k, v, plan, scale, options, deterministic), q.device)

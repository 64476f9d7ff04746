"""Backend registry: what each attention backend runs, and the one place where a backend is chosen.

Every backend declares its capabilities in a `BackendSpec`. `select_backend` is the only function
that decides which backend runs a call: ``"auto"`` takes the fastest available backend whose
capabilities cover the call; a named backend runs the call or raises one line naming what it lacks
(it never falls back). Layout, processors and training ask here instead of repeating limits.

Speed order (fastest first), measured on an H100 at the HunyuanVideo-1.5 720p SSTA mask:
``fa4`` (FlashAttention-4 CuTe block-sparse kernels) → ``triton`` → ``torch``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .custom_ops import fa4_entry, triton_entry
from .torch_op import block_sparse_attention_torch_traceable

__all__ = ["AttentionCall", "BackendSpec", "BACKENDS", "select_backend", "backend_names", "triton_runs_on",
           "triton_importable", "fa4_importable"]


@dataclass(frozen=True)
class AttentionCall:
    """What a call needs from a backend (no tensors: only the facts capabilities are checked against).

    ``q_block`` / ``k_block`` are 0 when not known yet (a check before the plan exists).
    """

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    q_block: int = 0
    k_block: int = 0
    gqa: bool = False
    deterministic: bool = False
    window: bool = False
    key_bias: bool = False

    @classmethod
    def of(cls, q: torch.Tensor, plan=None, gqa: bool = False, deterministic: bool = False) -> "AttentionCall":
        qb, kb = (plan.q_block, plan.k_block) if plan is not None else (0, 0)
        window = plan is not None and plan.has_window
        key_bias = plan is not None and plan.key_bias is not None
        return cls(q.device, q.dtype, int(q.shape[-1]), qb, kb, gqa, deterministic, window, key_bias)


@dataclass(frozen=True)
class BackendSpec:
    """Capabilities of one backend.

    Attributes:
        name: the ``backend=`` value.
        entry: ``(q, k, v, plan, scale) -> (out, lse)``, both differentiable. The entry modules import
            their kernels (Triton, FA4) only when called; under `torch.compile` each entry calls its
            kernels through `torch.library` custom ops (one opaque node each).
        dtypes: input dtypes it runs.
        head_dims: ``(lo, hi, multiple)``: head dims ``lo <= D <= hi`` divisible by ``multiple``.
        block_multiple: plan block sizes must be multiples of this.
        ragged_keys: honours ``plan.k_valid`` below the block size.
        gqa: k / v with fewer heads than q.
        deterministic_bwd: a bit-reproducible backward is available.
        window: token-level windows (causal, sliding window: ``plan.window_lo`` / ``window_hi``).
        key_bias: a per-key additive score bias (``plan.key_bias``). Padding-free SSTA skips
            ``repeat``-padded keys only on such a backend (the bias carries their weight); elsewhere
            it loads them as keys (the same result).
        capabilities: CUDA compute capability majors it runs on; None: any device, CPU included.
        importable: ``() -> reason or None``: why it cannot be imported here.
        key_tile: keys are computed in tiles of this many; a tile with some invalid keys costs at least
            a whole tile (plus masking). Padding-free SSTA then loads the zero-padded keys of a tile it
            loads anyway (computing them is exact: logit 0, value 0) instead of masking them.
        key_bias_forward: skipping ``repeat`` copies through ``key_bias`` also pays in a call without a
            backward. False for Triton (measured, H200, 720p/121f, repeat padding: forward 61.9 ms
            with the copies skipped vs 57.9 ms with them loaded, forward + backward 201 vs 236 ms), so
            padding-free SSTA skips them there only when gradients are needed.
        text_first: its kernels take query (and key) blocks in the order given, one program per block
            and head (no reordering of their own): `ssta_attention` hands it the blocks text first, so
            that the text rows, which see every key (≈ 6× a video block at 720p/121f), start early
            instead of ending the launch. FA4 (measured, H200, 720p/121f padding-free plan: forward
            35.64-35.87 vs 35.82-36.65 ms, forward + backward 135.8 vs 139.3 ms,
            `scripts/probe_fa4_order.py`); the Triton kernels walk heavy blocks first by themselves.
    """

    name: str
    entry: Callable
    dtypes: Tuple[torch.dtype, ...]
    head_dims: Tuple[int, int, int]
    block_multiple: int
    ragged_keys: bool
    gqa: bool
    deterministic_bwd: bool
    window: bool
    key_bias: bool
    capabilities: Optional[Tuple[int, ...]]
    importable: Callable[[], Optional[str]]
    key_tile: int = 1
    key_bias_forward: bool = True
    text_first: bool = False

    def unsupported(self, call: AttentionCall, named: bool = True) -> Optional[str]:
        """Why this backend cannot run ``call`` (one phrase), or None when it can. Triton's CPU
        interpreter (``TRITON_INTERPRET=1``) counts only for a backend named explicitly."""
        reason = self.importable()
        if reason:
            return reason
        dev = call.device
        if self.capabilities is None:
            pass
        elif dev.type == "cuda":
            major = _capability(dev)[0]
            if major not in self.capabilities:
                return (f"it runs on compute capability {'/'.join(f'{c}.x' for c in self.capabilities)}, "
                        f"this GPU is {major}.x")
        elif not (self.name == "triton" and named and _interpreting()):
            hint = " (or TRITON_INTERPRET=1 set before Triton is imported)" if self.name == "triton" else ""
            return f"it needs CUDA tensors{hint}, got tensors on {dev}"
        if call.dtype not in self.dtypes:
            return f"it runs {'/'.join(str(d).replace('torch.', '') for d in self.dtypes)}, got {call.dtype}"
        lo, hi, mult = self.head_dims
        if not (lo <= call.head_dim <= hi and call.head_dim % mult == 0):
            return f"it runs head dims {lo}..{hi} (multiples of {mult}), got head dim {call.head_dim}"
        for name, blk in (("q_block", call.q_block), ("k_block", call.k_block)):
            if blk and blk % self.block_multiple:
                return f"it needs block sizes that are multiples of {self.block_multiple}, got {name}={blk}"
        if call.gqa and not self.gqa:
            return "it does not run grouped-query attention (k/v with fewer heads than q)"
        if call.deterministic and not self.deterministic_bwd:
            return "it has no deterministic backward"
        if call.window and not self.window:
            return "it does not run token-level windows (causal=True / window_size)"
        if call.key_bias and not self.key_bias:
            return "it does not add a per-key score bias (plan.key_bias)"
        return None

    def load(self) -> Callable:
        """The backend's entry function ``(q, k, v, plan, scale) -> (out, lse)``."""
        return self.entry


# Facts about this process that never change, cached in plain dicts (not `functools.lru_cache`, whose
# wrapper Dynamo warns about): `torch.compile` evaluates each once while tracing and keeps the result.
_CAPABILITIES: Dict[torch.device, Tuple[int, int]] = {}
_IMPORT_REASONS: Dict[Tuple[str, str], Optional[str]] = {}


@torch.compiler.assume_constant_result
def _capability(device: torch.device) -> Tuple[int, int]:
    if device not in _CAPABILITIES:
        _CAPABILITIES[device] = torch.cuda.get_device_capability(device)
    return _CAPABILITIES[device]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result
def _import_reason(module: str, extra: str) -> Optional[str]:
    if (module, extra) not in _IMPORT_REASONS:
        try:
            importlib.import_module(module)
            reason = None
        except Exception as e:  # ImportError, or a broken install raising at import
            reason = f"{module} is not importable ({type(e).__name__}: {e}); install it with pip install -e \".[{extra}]\""
        _IMPORT_REASONS[(module, extra)] = reason
    return _IMPORT_REASONS[(module, extra)]


def triton_importable() -> Optional[str]:
    return _import_reason("triton", "triton")


def fa4_importable() -> Optional[str]:
    # FA4 reads its compile-cache switch when first imported: turn the disk cache on (unless the user
    # chose) before this probe imports it, so that compiled kernels outlive the process
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    return _import_reason("flash_attn.cute.interface", "fa4")


def _always() -> Optional[str]:
    return None


_HALF = (torch.float16, torch.bfloat16)

#: every backend, fastest first (``auto`` tries them in this order)
BACKENDS: Dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("fa4", fa4_entry, _HALF, (64, 128, 64), 128,
                    ragged_keys=True, gqa=False, deterministic_bwd=False, window=True, key_bias=False,
                    capabilities=(9, 10),
                    importable=fa4_importable, key_tile=128, text_first=True),
        BackendSpec("triton", triton_entry, _HALF + (torch.float32,), (1, 256, 1), 16,
                    ragged_keys=True, gqa=False, deterministic_bwd=True, window=True, key_bias=True,
                    capabilities=(8, 9, 10, 12),
                    importable=triton_importable, key_bias_forward=False),
        BackendSpec("torch", block_sparse_attention_torch_traceable, _HALF + (torch.float32, torch.float64),
                    (1, 1 << 16, 1), 16, ragged_keys=True, gqa=False, deterministic_bwd=True, window=True,
                    key_bias=True, capabilities=None, importable=_always),
    )
}


def backend_names() -> Tuple[str, ...]:
    """Valid ``backend=`` values."""
    return ("auto",) + tuple(BACKENDS)


def select_backend(backend: str, call: AttentionCall) -> BackendSpec:
    """The backend that runs ``call``.

    ``"auto"``: the first backend in `BACKENDS` order that supports the call (the torch backend, last,
    runs any float dtype on any device). A named backend: itself, or ValueError naming what it lacks.
    """
    if backend == "auto":
        reasons = []
        for spec in BACKENDS.values():
            why = spec.unsupported(call, named=False)
            if why is None:
                return spec
            reasons.append(f"{spec.name}: {why}")
        raise ValueError(f"no attention backend runs this call: {'; '.join(reasons)}")
    spec = BACKENDS.get(backend)
    if spec is None:
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")
    why = spec.unsupported(call)
    if why is not None:
        raise ValueError(f"backend {backend!r} cannot run this call: {why}")
    return spec


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton helper kernels (row gather with tile means) can run on ``t``'s device."""
    return t.is_cuda and triton_importable() is None

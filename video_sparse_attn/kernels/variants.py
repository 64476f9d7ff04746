"""Which Triton kernel variants a call compiles, found without a GPU (and without compiling).

Triton compiles one variant per *specialisation key* of a launch: the argument types, the value of
every constexpr, and for each int and pointer argument that is not in ``do_not_specialize`` whether it
is divisible by 16 (and, for ints, whether it equals 1), plus the compile options (warps, stages).
Two calls that differ in any of these compile twice. `recording` lets the package's own launch code
(every launch goes through `precompile.launch`) run inside `precompile.compile_only` with meta
tensors, and records each key instead of compiling it (Triton's ``jit_cache_hook``); `sm90` makes
the decisions a Hopper GPU would take (target sm90, tensor descriptors usable, the shipped table's
tuned configs for ``gpu``) on a machine without one.

    with sm90(), recording() as rec:
        run_something_on_meta_tensors()
    rec.variants()            # {Variant(kernel, key, summary), ...}

`ssta_call_variants` enumerates one `ssta_attention` forward + backward this way (and what the
background backward compile of its first forward compiles); `warmup_variants` what `warmup.warmup`
compiles. ``scripts/compile_times.py --variants`` prints both and their difference.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch

__all__ = ["Variant", "Recorder", "recording", "sm90", "kernels", "ssta_call_variants", "warmup_variants",
           "describe"]


class Variant(NamedTuple):
    """One compiled kernel: its name and Triton's cache key (``summary`` is for reading; it is derived
    from the key and not compared)."""

    kernel: str
    key: str
    summary: str = ""

    def __eq__(self, other):
        return (self.kernel, self.key) == (other.kernel, other.key)

    def __hash__(self):
        return hash((self.kernel, self.key))


def kernels() -> list:
    """Every Triton JIT function of the package (the kernels `precompile.launch` launches)."""
    from . import gluon_bwd, gluon_fwd, triton_bwd, triton_fwd, triton_gather, triton_untile

    gluon = [gluon_fwd._sparse_ws_kernel, gluon_bwd._prep_kernel, gluon_bwd._bwd_kernel,
             gluon_bwd._dq_convert_kernel, gluon_bwd._dq_fixed_convert_kernel] if gluon_fwd.HAS_GLUON else []
    return [triton_fwd._fwd_kernel, triton_bwd._delta_kernel, triton_bwd._dkdv_kernel, triton_bwd._dq_convert_kernel,
            triton_bwd._dq_kernel, triton_gather._gather_rows_kernel, triton_untile._untile_scaled_fwd_kernel,
            triton_untile._untile_scaled_bwd_kernel, *gluon]


def _summary(fn, compile_info: dict) -> str:
    """``name[warps, stages] constexprs; specialised ints/pointers`` of one launch, for reading."""
    params = [p.name for p in fn.params]
    consts = {params[path[0]]: value for path, value in compile_info["constants"].items() if len(path) == 1}
    consts = {k: getattr(v, "value", v) for k, v in consts.items()}
    attrs = compile_info["configs"][0]
    spec = []
    for path, props in sorted(attrs.items()):
        name = params[path[0]]
        if name in consts:
            continue
        kinds = [str(p[0]).replace("tt.", "") for p in props]
        spec.append(f"{name}:{'/'.join(kinds)}")
    sig = compile_info["signature"]
    dtypes = sorted({f"{k}:{v}" for k, v in sig.items() if isinstance(v, str) and v.startswith("*")})
    return (f"w{compile_info['num_warps']} s{compile_info['num_stages']} {consts} "
            f"spec[{' '.join(spec)}] ptr[{' '.join(dtypes)}]")


class Recorder:
    """Collects the variants launches would compile, per phase (``phase`` is set by the caller)."""

    def __init__(self):
        self.phase = "all"
        self.records: List[Tuple[str, Variant]] = []
        self._lock = threading.Lock()

    def hook(self, *, key, fn, compile, **_):
        jit = fn.jit_function
        v = Variant(jit.fn.__name__, str(key), _summary(jit, compile))
        with self._lock:
            self.records.append((self.phase, v))
        return True                                  # skip the compilation: only the key was wanted

    def variants(self, *phases: str) -> Set[Variant]:
        return {v for p, v in self.records if not phases or p in phases}

    @contextlib.contextmanager
    def at(self, phase: str):
        old, self.phase = self.phase, phase
        try:
            yield self
        finally:
            self.phase = old


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Inside: `precompile.compile_only` (buffers are meta tensors, launches only 'compile'), and every
    variant a launch would compile is recorded, not compiled. Kernels compiled before are forgotten for
    the duration (their caches are set aside), so every launch is seen."""
    from triton import knobs

    from . import precompile as pc

    rec = Recorder()
    saved = [(k, k.device_caches) for k in kernels()]
    old_hook = knobs.runtime.jit_cache_hook
    for k, _ in saved:
        k.device_caches = defaultdict(k.create_binder)
    knobs.runtime.jit_cache_hook = rec.hook
    try:
        with pc.compile_only():
            yield rec
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        for k, caches in saved:
            k.device_caches = caches


class _Sm90Driver:
    """What Triton asks its driver for when it only compiles: an sm90 target, device 0, stream 0."""

    def __init__(self, arch: int = 90):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def sm90(gpu: str = "NVIDIA H200"):
    """Make the package take the decisions a Hopper GPU (named ``gpu`` in the tuned-config table) would
    take, for tensors on any device (meta tensors stand in for CUDA ones): Triton's target is sm90,
    tensor descriptors are usable where the strides allow, tuned configs come from the shipped table
    for ``gpu`` (not from this machine's tuning cache), the Triton gather / untile paths and the
    ``triton`` backend are taken, with its Gluon kernels where they apply (when this Triton has Gluon).
    Restores everything on exit (not thread-safe: patches modules)."""
    from triton.runtime import driver

    from .. import layout
    from . import gluon_bwd, gluon_common, gluon_fwd, registry, triton_bwd, triton_common, triton_fwd, tuning

    def tma_usable(D, *tensors, enabled=True):     # the device half answered as sm90 would
        return enabled and triton_common.tma_layout_ok(D, *tensors)

    def hopper_unsupported(q, k, v):               # the Gluon kernels' device check, answered as sm90 would
        if not gluon_common.HAS_GLUON:
            return "Triton has no Gluon"
        return gluon_common.dtype_unsupported(q, k, v)

    real_tuned = tuning.tuned_kernel

    def tuned_kernel(*a, **kw):
        return real_tuned(*a, **{**kw, "device": torch.device("cuda", 0)})

    def runs_on(t):
        return registry.triton_importable() is None

    patches = [(triton_fwd, "tma_usable", tma_usable), (triton_bwd, "tma_usable", tma_usable),
               (triton_fwd, "tuned_kernel", tuned_kernel), (triton_bwd, "tuned_kernel", tuned_kernel),
               (tuning, "gpu_name", lambda index: gpu), (triton_common, "INTERPRET", False),
               (registry, "triton_runs_on", runs_on), (layout, "triton_runs_on", runs_on),
               (registry, "_interpreting", lambda: True),        # the named triton backend accepts meta tensors
               (gluon_fwd, "hopper_unsupported", hopper_unsupported),
               (gluon_bwd, "hopper_unsupported", hopper_unsupported)]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    old_driver, old_state, old_kernels = driver._active, dict(tuning._state), dict(tuning._kernels)
    try:
        for m, n, v in patches:
            setattr(m, n, v)
        driver.set_active(_Sm90Driver())
        tuning._state.update(use_cache=False, use_shipped_table=True, autotune=True)
        tuning._kernels.clear()
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)
        driver._active = old_driver
        tuning._state.clear()
        tuning._state.update(old_state)
        tuning._kernels.clear()
        tuning._kernels.update(old_kernels)


def ssta_call_variants(heads: int = 16, head_dim: int = 128, thw=(31, 45, 80), text_len: int = 1985,
                       text_valid: Optional[int] = 1200, dtype=torch.bfloat16, config=None, bshd: bool = False,
                       backward: bool = True, batch: int = 1, gpu: str = "NVIDIA H200") -> Dict[str, Set[Variant]]:
    """The variants one `ssta_attention` call compiles on an sm90 GPU (backend ``triton``), by phase:
    ``forward``, ``backward`` (what ``out.backward(dout)`` launches) and ``background`` (what the
    forward submits to `precompile.precompile_async` to compile beside it: the attention backward,
    the untile's backward, the gradients' gather). Defaults: the
    HunyuanVideo-1.5 720p/121f call of ``scripts/first_call.py`` (released config for the grid).
    ``bshd``: q, k, v (and the output gradient) as transposed ``[B, S, H, D]`` views (diffusers'
    processors: the gradient of their ``out.transpose(1, 2)`` comes back in that layout)."""
    from .. import SSTAConfig, ssta_attention
    from . import precompile as pc

    config = SSTAConfig().for_thw(tuple(thw)) if config is None else config
    S = thw[0] * thw[1] * thw[2] + text_len
    with sm90(gpu), recording() as rec:
        def make():
            if bshd:
                return torch.empty(batch, S, heads, head_dim, dtype=dtype, device="meta").transpose(1, 2).requires_grad_(backward)
            return torch.empty(batch, heads, S, head_dim, dtype=dtype, device="meta", requires_grad=backward)

        q, k, v = make(), make(), make()
        tm = None
        if text_valid is not None and text_len:
            tm = torch.zeros(batch, text_len, dtype=torch.bool, device="meta")
        background = {}                                  # what the forward submits, once per key
        real_async = pc.precompile_async
        pc.precompile_async = lambda key, fn, device: background.setdefault(key, fn)
        try:
            with rec.at("forward"):
                out = ssta_attention(q, k, v, tuple(thw), config, text_len, tm, backend="triton", validate=False)
            if backward:
                with rec.at("backward"):
                    out.backward(make().detach())      # dout laid out like q (and the output)
        finally:
            pc.precompile_async = real_async
        with rec.at("background"):
            for fn in background.values():
                fn()
    return {p: rec.variants(p) for p in ("forward", "backward", "background")}


def warmup_variants(*shapes, gpu: str = "NVIDIA H200", **kwargs) -> Set[Variant]:
    """The variants `warmup.warmup(*shapes, device="meta", **kwargs)` compiles for an sm90 GPU."""
    from ..warmup import warmup

    kwargs.setdefault("backend", "triton")
    with sm90(gpu), recording() as rec:
        warmup(*shapes, device="meta", **kwargs)
    return rec.variants()


def describe(variants: Sequence[Variant]) -> List[str]:
    """One line per variant, sorted (kernel name, then summary)."""
    return [f"{v.kernel:28s} {v.summary}" for v in sorted(variants, key=lambda v: (v.kernel, v.summary, v.key))]

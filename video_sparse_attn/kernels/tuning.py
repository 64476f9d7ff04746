"""Persistent kernel tuning: a shipped table of tuned configs and an on-disk cache of autotune results.

The first call of a kernel family (kernel × GPU × dtype × head dim × block sizes × variant) used to
benchmark its whole config list (seconds per kernel, every process). Now a launch first looks for
the config in

1. the on-disk cache, ``$VSA_TUNING_CACHE`` or ``~/.cache/video_sparse_attn/triton_tuning.json``
   (results of earlier autotuning on this machine, written after each new tuning), then
2. the table shipped with the package, ``tuned_configs.json`` (GPUs measured by the project),

and only benchmarks the list when neither has it. Keys never contain the sequence length: the best
tile does not depend on it enough to pay for tuning again at every new video size. A key contains
`KERNEL_VERSION`, so a changed kernel never runs with configs tuned for an older one. A cache file
that cannot be parsed is ignored with a warning (and rewritten at the next tuning).

Triton's own ``autotune(..., cache_results=True)`` is not used: this table must work with every
supported Triton, and the shipped table has to be keyed by the same fields as the cache anyway.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "KERNEL_VERSION", "cache_key", "lookup", "record", "load_table", "default_cache_path", "configure",
    "tuned_kernel", "SHIPPED_TABLE",
]

KERNEL_VERSION = "v6"
SHIPPED_TABLE = Path(__file__).with_name("tuned_configs.json")
_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")

# Module state (set by `configure`, read on the first launch of each kernel family).
_state = {"cache_path": None, "use_shipped_table": True, "use_cache": True, "autotune": True}
_kernels: dict = {}          # (name, key or rows) -> _TunedKernel, per process


def configure(cache_path: Optional[str] = None, use_shipped_table: bool = True, use_cache: bool = True,
              autotune: bool = True) -> None:
    """Where tuning results are cached and which sources a launch consults (process-wide; defaults restore).

    ``use_shipped_table=False`` makes every family tune (or read the on-disk cache) — what a benchmark
    that refreshes the shipped table wants; ``use_cache=False`` neither reads nor writes the disk cache;
    ``autotune=False`` acts as ``kernel_options={"autotune": False}`` on every call (first config of
    each list; for callers that cannot pass kernel options, e.g. tests through `ssta_attention`).
    Kernel families already launched in this process are forgotten.
    """
    _state.update(cache_path=cache_path, use_shipped_table=use_shipped_table, use_cache=use_cache,
                  autotune=autotune)
    _kernels.clear()


def default_cache_path() -> Path:
    if _state["cache_path"]:
        return Path(_state["cache_path"])
    if os.environ.get("VSA_TUNING_CACHE"):
        return Path(os.environ["VSA_TUNING_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "video_sparse_attn" / "triton_tuning.json"


def cache_key(gpu: str, kernel: str, dtype, head_dim: int, q_block: int, k_block: int, variant: str = "") -> str:
    """``gpu|kernel|dtype|d<head dim>|q<q block>|k<k block>|variant|version`` — no sequence length."""
    dtype = str(dtype).replace("torch.", "")
    return f"{gpu}|{kernel}|{dtype}|d{int(head_dim)}|q{int(q_block)}|k{int(k_block)}|{variant}|{KERNEL_VERSION}"


def _valid(config, q_block: int, k_block: int) -> bool:
    if not isinstance(config, dict) or set(config) != set(_FIELDS):
        return False
    if not all(isinstance(config[f], int) and not isinstance(config[f], bool) and config[f] > 0 for f in _FIELDS):
        return False
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    return (bm >= 16 and bm & (bm - 1) == 0 and q_block % bm == 0 and bn >= 16 and bn & (bn - 1) == 0
            and k_block % bn == 0 and config["num_warps"] in (1, 2, 4, 8, 16) and config["num_stages"] <= 8)


def load_table(path) -> dict:
    """``{key: config}`` from a JSON file with a ``"configs"`` object; {} if missing or unreadable (warns)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"tuning cache {path} unreadable ({e}); ignored", RuntimeWarning, stacklevel=2)
        return {}
    try:
        data = json.loads(text)
        configs = data["configs"]
        if not isinstance(configs, dict):
            raise TypeError("'configs' is not an object")
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"tuning cache {path} is corrupt ({type(e).__name__}: {e}); ignored", RuntimeWarning,
                      stacklevel=2)
        return {}
    return configs


@functools.lru_cache(maxsize=None)
def _shipped() -> dict:
    return load_table(SHIPPED_TABLE)


def lookup(key: str, q_block: int, k_block: int, cache_path=None, shipped: Optional[bool] = None):
    """The config for ``key``: on-disk cache first, then the shipped table; None if neither has a valid one."""
    sources = []
    if _state["use_cache"] or cache_path is not None:
        sources.append((load_table(cache_path or default_cache_path()), "cache"))
    if _state["use_shipped_table"] if shipped is None else shipped:
        sources.append((_shipped(), "shipped table"))
    for table, where in sources:
        if key in table:
            if _valid(table[key], q_block, k_block):
                return dict(table[key])
            warnings.warn(f"invalid tuned config for {key} in the {where}: {table[key]!r}; ignored",
                          RuntimeWarning, stacklevel=2)
    return None


def record(key: str, config: dict, cache_path=None) -> None:
    """Add ``key → config`` to the on-disk cache (atomic replace; a failure only warns)."""
    path = Path(cache_path or default_cache_path())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # a corrupt file was already reported at lookup
            table = load_table(path)
        table[key] = {f: int(config[f]) for f in _FIELDS}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": 1, "configs": table}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the tuning cache {path}: {e}", RuntimeWarning, stacklevel=2)


@functools.lru_cache(maxsize=None)
def gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


class _TunedKernel:
    """A Triton autotuner over ``rows`` that writes its pick to the disk cache after its first launch."""

    def __init__(self, kernel, rows, q_block, k_block, tune_key, reset_to_zero, key):
        import triton

        from .triton_common import kernel_configs

        configs = kernel_configs(rows, q_block, k_block)
        self.tuner = triton.autotune(configs=configs, key=list(tune_key), reset_to_zero=reset_to_zero)(kernel)
        self.key = key if len(configs) > 1 else None        # only real tuning results are recorded

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tuner[grid](*args, **kwargs)
            if self.key is not None:
                best = self.tuner.best_config
                record(self.key, {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages})
                self.key = None
        return launch

    def warmup(self, *args, grid, **kwargs):
        """Compile the configs a launch would run (the known one, or every candidate) without running."""
        return self.tuner.warmup(*args, grid=grid, **kwargs)


def tuned_kernel(name: str, kernel, rows, *, q_block: int, k_block: int, dtype, head_dim: int, device,
                 variant: str, autotune: bool, tune_key, reset_to_zero=None):
    """The launcher of one kernel family: a known config (cache, shipped table), or the list to tune.

    ``rows``: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates, first = default. Without
    autotuning (option off, the interpreter, a CPU tensor) only the first row is used.
    """
    from .triton_common import INTERPRET

    tune = autotune and _state["autotune"] and not INTERPRET and device.type == "cuda"
    key = None
    if tune:
        key = cache_key(gpu_name(device.index if device.index is not None else torch.cuda.current_device()),
                        name, dtype, head_dim, q_block, k_block, variant)
        memo = (name, key)
    else:
        memo = (name, tuple(rows[:1]), q_block, k_block)
    found = _kernels.get(memo)
    if found is None:
        if tune:
            config = lookup(key, q_block, k_block)
            if config is not None:
                rows = [tuple(config[f] for f in _FIELDS)]
        else:
            rows = rows[:1]
        found = _kernels[memo] = _TunedKernel(kernel, list(rows), q_block, k_block, tune_key, reset_to_zero, key)
    return found

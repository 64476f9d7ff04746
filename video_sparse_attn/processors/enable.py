"""`enable_ssta` / `disable_ssta`: one call to switch a diffusers video transformer (or pipeline) to SSTA."""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch

from ..config import SSTAConfig
from ..validation import check_flag
from .base import SSTAAttnProcessor
from ..families import family_of
from .grid_hook import SSTARuntime, install_grid_hook, remove_grid_hook, runtime_of
from .schedule import SSTASchedule
from .stats import SSTAStats

__all__ = ["enable_ssta", "disable_ssta"]

logger = logging.getLogger(__name__)


def _unwrap(module: Any) -> Any:
    """The module a ``torch.compile(module)`` wrapper holds (processors and the grid hook belong to it;
    the wrapper's forward calls it, so the compiled model runs SSTA too)."""
    while isinstance(module, torch.nn.Module) and isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def _transformers_of(target: Any) -> list:
    """A transformer, or the transformer(s) of a pipeline (Wan 2.2 has ``transformer_2``), unwrapped
    from ``torch.compile``."""
    if isinstance(target, torch.nn.Module):
        return [_unwrap(target)]
    found = [getattr(target, n, None) for n in ("transformer", "transformer_2")]
    found = [_unwrap(t) for t in found if t is not None]
    if not found:
        raise TypeError(
            "enable_ssta takes a diffusers video transformer or a pipeline holding one, "
            f"got {type(target).__name__}"
        )
    return found


def enable_ssta(
    target: Any,
    config: SSTAConfig = SSTAConfig(),
    schedule: Optional[SSTASchedule] = None,
    *,
    backend: str = "auto",
    stats: Union[bool, SSTAStats, None] = None,
    scheduler: Any = None,
    strict_tiles: bool = True,
    warmup: bool = False,
) -> SSTARuntime:
    """Replace a transformer's video attention with SSTA processors and install the grid hook.

    Args:
        target: a ``HunyuanVideo15Transformer3DModel``, ``HunyuanVideoTransformer3DModel`` or
            ``WanTransformer3DModel``, or a pipeline holding one (its ``scheduler`` then gives the
            denoising step for ``schedule``; Wan 2.2's ``transformer_2`` is enabled too), plain
            or wrapped by ``torch.compile``.
        config: base `SSTAConfig` (the released HunyuanVideo-1.5 values by default).
        schedule: optional `SSTASchedule` (dense first steps, dense layers, per step-layer-head overrides).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``.
        stats: True or an `SSTAStats` to record per-call density and time (``runtime.stats``).
        scheduler: the scheduler whose ``step_index`` is the denoising step (default: the pipeline's);
            without one, the step follows the timesteps the transformer receives.
        strict_tiles: see `SSTAAttnProcessor`.
        warmup: compile (and tune) the attention kernels now for the transformer's heads, head dim,
            dtype and the config's tile, so that the first denoising step does not stall (CUDA only;
            see `video_sparse_attn.warmup`).

    Returns:
        The `SSTARuntime` of the (first) transformer: ``.thw``, ``.step``, ``.set_step``, ``.stats``.

    Only the video attention layers change (HunyuanVideo-1.5: the double-stream blocks; HunyuanVideo:
    double- and single-stream blocks; Wan: ``attn1``); the text token refiner and Wan's
    cross-attention keep their processors. Calling it again replaces the previous SSTA settings
    (under context parallelism too); a call that is refused leaves every transformer as it was.

    Example::

        pipe = HunyuanVideo15Pipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cuda")
        runtime = enable_ssta(pipe, SSTAConfig(), SSTASchedule(dense_steps=10), stats=True)
        video = pipe(prompt, num_frames=121, num_inference_steps=50).frames[0]
        print(runtime.stats.format())
    """
    if not isinstance(config, SSTAConfig):
        raise TypeError(f"config must be an SSTAConfig, got {type(config).__name__}")
    if schedule is not None and not isinstance(schedule, SSTASchedule):
        raise TypeError(f"schedule must be an SSTASchedule or None, got {type(schedule).__name__}")
    if scheduler is None and not isinstance(target, torch.nn.Module):
        scheduler = getattr(target, "scheduler", None)
    if stats is True:
        stats = SSTAStats()
    elif stats is False:
        stats = None
    elif stats is not None and not isinstance(stats, SSTAStats):
        raise TypeError(f"stats must be True, False, None or an SSTAStats, got {stats!r}")
    check_flag("warmup", warmup)
    # every check before any transformer changes: a refused call leaves the running setup as it was
    prepared = []
    for transformer in _transformers_of(target):
        family = family_of(transformer)
        processor = SSTAAttnProcessor(config, schedule, backend=backend, strict_tiles=strict_tiles)
        parallel = getattr(transformer, "_parallel_config", None)   # enable_parallelism ran first
        if getattr(parallel, "context_parallel_config", None) is not None:
            from .parallel import check_parallel_model, ulysses_group

            ulysses_group(parallel)   # refuses ring attention here rather than at the first call
            check_parallel_model(transformer, parallel.context_parallel_config.ulysses_degree)
            processor._parallel_config = parallel
        prepared.append((transformer, family, processor))
    runtimes = []
    for transformer, family, processor in prepared:
        if runtime_of(transformer) is not None:
            _restore(transformer)   # SSTA goes straight back on (no stock processor runs in between)
        originals = dict(transformer.attn_processors)
        runtime = SSTARuntime(
            family, family.patch_thw(transformer), scheduler=scheduler,
            track_timesteps=bool(schedule and schedule.uses_step) and scheduler is None, stats=stats,
        )
        runtime.original_processors = originals
        mapping = {}
        for name, proc in originals.items():
            if family.is_sparse_layer(name):
                mapping[name] = processor
                logger.debug("SSTA on %s", name)
            else:
                mapping[name] = proc
        transformer.set_attn_processor(mapping)
        install_grid_hook(transformer, runtime)
        runtimes.append(runtime)
        if warmup:
            _warm_kernels(transformer, config, backend)
    return runtimes[0]


def _warm_kernels(transformer: torch.nn.Module, config: SSTAConfig, backend: str) -> None:
    """Run `video_sparse_attn.warmup` for the shapes ``transformer`` will call attention with."""
    param = next(transformer.parameters(), None)
    if param is None or param.device.type != "cuda":
        return
    from ..warmup import warmup as warm

    cfg = transformer.config
    heads, head_dim = int(cfg.num_attention_heads), int(cfg.attention_head_dim)
    from ..layout import block_slots

    block = block_slots(config.block_size)       # the image tile of the caller rules keeps the volume
    warm((1, heads, 8 * block, head_dim, param.dtype, block), backend=backend, device=param.device, config=config)


def disable_ssta(target: Any) -> None:
    """Restore the processors `enable_ssta` replaced (or, after a bare ``set_attn_processor``, the
    model's stock ones) and remove the grid hook. A no-op on a transformer without SSTA.

    Under context parallelism (`enable_ulysses`) the restored processors keep the transformer's
    parallel config (Wan's stock processors run Ulysses themselves); a HunyuanVideo-1.5 transformer is
    refused, as its stock processor has no context-parallel path."""
    transformers = _transformers_of(target)
    for transformer in transformers:
        _check_stock_parallel(transformer)
    for transformer in transformers:
        _restore(transformer)


def _restore(transformer: torch.nn.Module) -> None:
    """`disable_ssta` on one transformer, without the context-parallel check (`enable_ssta` replacing
    its own settings installs SSTA again at once)."""
    family = family_of(transformer)
    runtime = runtime_of(transformer)
    current = transformer.attn_processors
    if runtime is not None and runtime.original_processors is not None:
        transformer.set_attn_processor(dict(runtime.original_processors))
    elif any(isinstance(p, SSTAAttnProcessor) for p in current.values()):
        transformer.set_attn_processor(
            {n: (family.stock_processor(n) if isinstance(p, SSTAAttnProcessor) else p)
             for n, p in current.items()}
        )
    remove_grid_hook(transformer)
    parallel = getattr(transformer, "_parallel_config", None)
    if getattr(parallel, "context_parallel_config", None) is not None:
        # as enable_parallelism does: processors installed before it (or never seen by it) get the config
        for proc in transformer.attn_processors.values():
            if hasattr(proc, "_parallel_config"):
                proc._parallel_config = parallel


def _check_stock_parallel(transformer: torch.nn.Module) -> None:
    """Refuse to restore stock processors that cannot run under the transformer's context parallelism."""
    parallel = getattr(transformer, "_parallel_config", None)
    if getattr(parallel, "context_parallel_config", None) is None:
        return
    has_ssta = runtime_of(transformer) is not None or any(
        isinstance(p, SSTAAttnProcessor) for p in transformer.attn_processors.values())
    if has_ssta and family_of(transformer).name == "hunyuan_video15":
        raise RuntimeError(
            "disable_ssta: this HunyuanVideo-1.5 transformer runs under context parallelism, which the stock "
            "HunyuanVideo-1.5 processor does not support in diffusers 0.42.1; keep SSTA (exact attention: "
            "SSTAConfig(sparse_type='dense', pad_type='mask')) or run the stock model without enable_ulysses"
        )

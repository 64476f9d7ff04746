"""Per-transformer runtime state and the hook that captures the latent grid ``(t, h, w)``.

diffusers hands an attention processor token sequences only: the grid after patchify never reaches
it (``attention_kwargs`` carries the LoRA scale alone). A hook on the transformer reads
``hidden_states.shape[2:]`` before each forward and divides by the patch size. The result lives in
an `SSTARuntime` owned by that transformer and linked from each of its replaced attention modules,
so two transformers (or two pipelines) in one process never share state.

The denoising step (for schedules) comes, in this order, from: a step set with
`SSTARuntime.set_step`; the pipeline scheduler's ``step_index``; or, when neither is available,
the timestep the transformer receives (a new step whenever it changes; one small host read per
forward, made only when the schedule depends on the step). Classifier-free guidance calls the
transformer twice per step with the same timestep, so calls are never counted.

Under Ulysses context parallelism the hook also checks, before any collective of the forward, that
the ranks hold a process group, equal video shards and the same inputs and settings
(`parallel.check_parallel_forward`).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import torch

from ..families import ModelFamily, UnsupportedModelError, family_of

__all__ = ["SSTARuntime", "install_grid_hook", "remove_grid_hook", "runtime_of", "bind_runtime", "HOOK_NAME"]

HOOK_NAME = "video_sparse_attn.grid"
RUNTIME_ATTR = "_ssta_runtime"
LAYER_ATTR = "_ssta_layer_index"

Triple = Tuple[int, int, int]


class SSTARuntime:
    """State SSTA needs at attention time for one transformer.

    Attributes:
        family: the transformer's `ModelFamily`.
        attention_fn: its processor function (`ModelFamily.attention_fn`, resolved here, outside any
            compiled region).
        patch_thw: patch size (pt, ph, pw).
        thw: latent grid after patchify of the current forward (None before the first one).
        scheduler: optional diffusers scheduler whose ``step_index`` gives the denoising step.
        track_timesteps: derive the step from the timestep the transformer receives.
        stats: optional `SSTAStats` shared by this transformer's processors.
        original_processors: processors to restore on `disable_ssta` (None when installed lazily).
    """

    def __init__(self, family: ModelFamily, patch_thw: Triple, scheduler: Any = None,
                 track_timesteps: bool = False, stats: Any = None) -> None:
        self.family = family
        self.attention_fn = family.attention_fn()
        self.patch_thw = patch_thw
        self.thw: Optional[Triple] = None
        self.scheduler = scheduler
        self.track_timesteps = track_timesteps
        self.stats = stats
        self.original_processors: Optional[dict] = None
        self._manual_step: Optional[int] = None
        self._timestep_step = 0
        self._last_timestep: Optional[float] = None

    def __repr__(self) -> str:
        return (f"SSTARuntime(family={self.family.name!r}, thw={self.thw}, step={self.step}, "
                f"scheduler={type(self.scheduler).__name__ if self.scheduler is not None else None})")

    # ------------------------------------------------------------------ step
    def set_step(self, step: Optional[int]) -> None:
        """Pin the denoising step (e.g. from a ``callback_on_step_end``); None returns to automatic."""
        self._manual_step = None if step is None else int(step)

    @property
    def step(self) -> int:
        """The current denoising step (0 when nothing says otherwise)."""
        if self._manual_step is not None:
            return self._manual_step
        if self.scheduler is not None:
            idx = getattr(self.scheduler, "step_index", None)
            if idx is not None:
                return int(idx)
            return int(getattr(self.scheduler, "begin_index", None) or 0)
        return self._timestep_step

    def observe_timestep(self, timestep: Any) -> None:
        """Advance the timestep-derived step: same value → same step; smaller → next step; larger → a
        new denoising run starts at step 0.

        A tensor counts by its largest entry: Wan 2.2's per-token timesteps ``[B, S]`` hold 0 for the
        clean conditioning frame, so their first entry never moves while the noise level does."""
        if timestep is None:
            return
        value = float(timestep.detach().amax()) if isinstance(timestep, torch.Tensor) else float(timestep)
        last = self._last_timestep
        if last is None or value > last:
            self._timestep_step = 0
        elif value < last:
            self._timestep_step += 1
        self._last_timestep = value

    # ------------------------------------------------------------------ grid
    def capture(self, hidden_states: torch.Tensor) -> None:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
            raise ValueError(
                "SSTA's grid hook expects the transformer's hidden_states as [B, C, T, H, W], got "
                f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}"
            )
        T, H, W = hidden_states.shape[2:]
        pt, ph, pw = self.patch_thw
        self.thw = (T // pt, H // ph, W // pw)


def _make_hook_class():
    from diffusers.hooks import ModelHook

    class GridCaptureHook(ModelHook):
        """Records the latent grid (and, if asked, the timestep) before each transformer forward."""

        def __init__(self, runtime: SSTARuntime) -> None:
            super().__init__()
            self.runtime = runtime

        def pre_forward(self, module, *args, **kwargs):
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
            self.runtime.capture(hs)
            if self.runtime.track_timesteps and self.runtime.scheduler is None:
                ts = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
                self.runtime.observe_timestep(ts)
            parallel = getattr(module, "_parallel_config", None)
            if getattr(parallel, "context_parallel_config", None) is not None:
                from .parallel import check_parallel_forward

                check_parallel_forward(module, self.runtime, hs, args, kwargs)
            return args, kwargs

    return GridCaptureHook


def install_grid_hook(transformer: torch.nn.Module, runtime: SSTARuntime) -> None:
    """Register the grid hook on ``transformer`` and link ``runtime`` (and a layer index) from each
    attention module SSTA replaces."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    registry.register_hook(_make_hook_class()(runtime), HOOK_NAME)
    for index, name in enumerate(runtime.family.sparse_layer_names(transformer)):
        module = transformer.get_submodule(name[: -len(".processor")])
        setattr(module, RUNTIME_ATTR, runtime)
        setattr(module, LAYER_ATTR, index)
    setattr(transformer, RUNTIME_ATTR, runtime)


def bind_runtime(attn: torch.nn.Module, runtime: SSTARuntime, layer_index: int = 0) -> None:
    """Link one attention module to ``runtime`` by hand: for a transformer block run on its own
    (benchmarks, unit tests), where no transformer forward captures the grid; set ``runtime.thw``."""
    setattr(attn, RUNTIME_ATTR, runtime)
    setattr(attn, LAYER_ATTR, int(layer_index))


def remove_grid_hook(transformer: torch.nn.Module) -> None:
    """Undo `install_grid_hook` (hook and links); a no-op when none is installed."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    for module in transformer.modules():
        for attr in (RUNTIME_ATTR, LAYER_ATTR):
            if attr in module.__dict__:
                delattr(module, attr)


def runtime_of(transformer: torch.nn.Module) -> Optional[SSTARuntime]:
    """The `SSTARuntime` installed on a transformer, or None."""
    return transformer.__dict__.get(RUNTIME_ATTR)


def find_calling_transformer(max_depth: int = 64) -> Tuple[Optional[torch.nn.Module], Optional[Triple]]:
    """Best-effort lookup, from inside an attention processor, of the supported transformer whose
    forward is running, and the grid its forward computed (its ``post_patch_*`` locals).

    Used only when a processor was installed with a bare ``set_attn_processor`` and no hook exists
    yet; returns ``(None, None)`` when not found.
    """
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        obj = frame.f_locals.get("self")
        if isinstance(obj, torch.nn.Module):
            try:
                family_of(obj)
            except UnsupportedModelError:
                pass
            else:
                loc = frame.f_locals
                names = ("post_patch_num_frames", "post_patch_height", "post_patch_width")
                thw = tuple(int(loc[n]) for n in names) if all(n in loc for n in names) else None
                return obj, thw  # type: ignore[return-value]
        frame = frame.f_back
    return None, None

"""`SSTAAttnProcessor`: a diffusers attention processor that runs `ssta_attention`.

One class serves HunyuanVideo-1.5, HunyuanVideo and Wan: the model family comes from the
transformer the processor is attached to (`enable_ssta`, or found lazily on the first call after a
bare ``transformer.set_attn_processor(SSTAAttnProcessor(config))``). Attention layers SSTA does not
replace (the text-only token refiner of the HunyuanVideo models, Wan's cross-attention) run the
stock processors unchanged, so installing one instance everywhere is safe.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from ..attention import ssta_attention
from ..kernels.registry import AttentionCall, backend_names, select_backend
from ..config import SSTAConfig
from ..families import family_of
from ..validation import check_flag, check_text_mask_prefix, check_tiles
from .grid_hook import (LAYER_ATTR, RUNTIME_ATTR, SSTARuntime, find_calling_transformer, install_grid_hook,
                        runtime_of)
from .schedule import SSTASchedule
from .stats import AttentionRecord, SSTAStats

__all__ = ["SSTAAttnProcessor", "check_backend_support"]

_NO_GRID = (
    "SSTA needs the latent grid (t, h, w) of the current forward, and none was captured for this "
    "attention layer. Enable SSTA with `video_sparse_attn.enable_ssta(transformer, config)` (or "
    "`enable_ssta(pipe, config)`), which installs the grid hook, instead of calling the processor "
    "outside a supported transformer's forward."
)


def _no_transformer(attn: torch.nn.Module) -> str:
    """The error for a processor installed by hand and called outside every supported transformer."""
    from ..families import FAMILIES

    names = ", ".join(f.transformer_class for f in FAMILIES.values())
    return (f"SSTAAttnProcessor was called on {type(attn).__name__} outside the forward of a supported "
            f"transformer ({names}): a model of another family is not supported; for a supported one, "
            f"enable SSTA with `video_sparse_attn.enable_ssta(transformer, config)`.")


def check_backend_support(q: torch.Tensor, backend: str) -> str:
    """Resolve ``backend`` for ``q [B, H, S, D]`` through the backend registry (the one home of every
    backend's limits); an unsupported call raises one line naming what the backend lacks."""
    try:
        return select_backend(backend, AttentionCall.of(q)).name
    except ValueError as e:
        raise ValueError(f"SSTA: {e}. Cast the transformer (e.g. `transformer.to(torch.bfloat16)`) or pass "
                         "backend='torch' (any dtype, head dim and device)") from None


class SSTAAttnProcessor:
    """Attention processor running Selective and Sliding Tile Attention on video self-attention.

    Args:
        config: base `SSTAConfig`; ``config.for_thw(thw)`` applies the HunyuanVideo-1.5 caller rules
            (a no-op unless ``config.caller_rules``).
        schedule: optional `SSTASchedule` (dense steps / layers, per step-layer-head overrides).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` for `ssta_attention`.
        stats: optional `SSTAStats` recording density and time per call (else the one given to
            `enable_ssta`, if any).
        strict_tiles: refuse a tile longer than the latent grid along an axis when padded tokens would
            stay visible as keys (``pad_type`` ``zero`` / ``repeat``; `validation.check_tiles`); such padding
            outnumbers real tokens along that axis. ``pad_type="mask"`` is always accepted.

    Usage::

        transformer.set_attn_processor(SSTAAttnProcessor(SSTAConfig(topk=32)))
        # or, with schedules and stats: video_sparse_attn.enable_ssta(pipe, config, schedule)
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, config: SSTAConfig = SSTAConfig(), schedule: Optional[SSTASchedule] = None,
                 backend: str = "auto", stats: Optional[SSTAStats] = None, strict_tiles: bool = True) -> None:
        if not isinstance(config, SSTAConfig):
            raise TypeError(f"config must be an SSTAConfig, got {type(config).__name__}")
        if schedule is not None and not isinstance(schedule, SSTASchedule):
            raise TypeError(f"schedule must be an SSTASchedule or None, got {type(schedule).__name__}")
        if backend not in backend_names():
            raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")
        if stats is not None and not isinstance(stats, SSTAStats):
            raise TypeError(f"stats must be an SSTAStats or None, got {stats!r}")
        strict_tiles = check_flag("strict_tiles", strict_tiles)
        self.config = config
        self.schedule = schedule
        self.backend = backend
        self.stats = stats
        self.strict_tiles = strict_tiles
        self._stock_processors: dict = {}
        self._checked_text_masks: set = set()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(config={self.config}, schedule={self.schedule}, "
                f"backend={self.backend!r})")

    # ------------------------------------------------------------------ diffusers entry point
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[Any] = None,
        rotary_emb: Optional[Any] = None,
    ):
        # Wan's attention passes (attn, hidden, encoder, mask, rotary) positionally, so its rotary
        # embedding arrives as `image_rotary_emb`; HunyuanVideo passes `image_rotary_emb=` by name.
        rotary = rotary_emb if rotary_emb is not None else image_rotary_emb
        if type(attn).__name__ == "WanAttention":
            if encoder_hidden_states is not None:  # cross-attention to text (and image) stays dense
                stock = self._stock(attn, "wan")
                return stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary)
        elif encoder_hidden_states is None and rotary is None:  # text-only token refiner
            return self._stock(attn, "attn")(attn, hidden_states, None, attention_mask)
        runtime, _ = self._runtime_for(attn)
        return runtime.attention_fn(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary)

    # ------------------------------------------------------------------ pieces used by the families
    def _stock(self, attn: torch.nn.Module, kind: str):
        proc = self._stock_processors.get(kind)
        if proc is None:
            if kind == "wan":
                from diffusers.models.transformers.transformer_wan import WanAttnProcessor

                proc = WanAttnProcessor()
            else:
                from diffusers.models.attention_processor import AttnProcessor2_0

                proc = AttnProcessor2_0()
            self._stock_processors[kind] = proc
        proc._attention_backend = self._attention_backend
        proc._parallel_config = self._parallel_config
        return proc

    def _runtime_for(self, attn: torch.nn.Module) -> Tuple[SSTARuntime, int]:
        runtime = attn.__dict__.get(RUNTIME_ATTR)
        if runtime is None:
            transformer, thw = find_calling_transformer()
            if transformer is None:
                raise RuntimeError(_no_transformer(attn))
            runtime = runtime_of(transformer)
            if runtime is None:  # bare set_attn_processor: install the grid hook now
                family = family_of(transformer)
                runtime = SSTARuntime(family, family.patch_thw(transformer),
                                      track_timesteps=bool(self.schedule and self.schedule.uses_step))
                install_grid_hook(transformer, runtime)
                runtime.thw = thw
            runtime = attn.__dict__.get(RUNTIME_ATTR)
            if runtime is None:
                raise RuntimeError(
                    f"SSTAAttnProcessor was called on an attention layer ({type(attn).__name__}) that SSTA "
                    f"does not replace in {type(transformer).__name__}; install it with enable_ssta"
                )
        if runtime.thw is None:
            raise RuntimeError(_NO_GRID)
        return runtime, attn.__dict__.get(LAYER_ATTR, 0)

    def _head_groups(self, runtime: SSTARuntime, layer: int, thw, num_heads: int) -> List[tuple]:
        base = self.config.for_thw(thw)
        if self.schedule is None:
            return [(0, num_heads, base)]
        step = runtime.step if self.schedule.uses_step else 0
        return self.schedule.head_groups(base, step, layer, num_heads)

    def _check_tiles(self, config: SSTAConfig, thw) -> None:
        if self.strict_tiles:
            check_tiles(config, thw)

    def _check_text_mask_once(self, text_mask: Optional[torch.Tensor]) -> None:
        """Refuse a non-prefix text mask, reading its values once per mask shape and device (one host
        synchronisation on a GPU per new shape; later calls of that shape trust the model)."""
        if text_mask is None or torch.compiler.is_compiling():
            return
        key = (tuple(text_mask.shape), str(text_mask.device))
        if key not in self._checked_text_masks:
            check_text_mask_prefix(text_mask.bool())
            self._checked_text_masks.add(key)

    def attend(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               text_len: int = 0, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SSTA over diffusers-layout ``query, key, value [B, S, H, D]`` (``S = t*h*w + text_len``,
        video first); returns ``[B, S, H, D]`` (a transposed view of the op's output).

        Under Ulysses context parallelism (``self._parallel_config``) ``S`` is this rank's video shard
        plus the whole text, and `parallel.ulysses_attention` exchanges the tokens around the op.
        """
        runtime, layer = self._runtime_for(attn)
        self._check_text_mask_once(text_mask)
        if self._parallel_config is not None:
            from .parallel import ulysses_attention, ulysses_group

            group = ulysses_group(self._parallel_config)
            if group is not None:
                return ulysses_attention(self, runtime, layer, query, key, value, text_len, text_mask, group)
        return self._attend_heads(runtime, layer, query, key, value, text_len, text_mask)

    def _attend_heads(self, runtime: SSTARuntime, layer: int, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, text_len: int = 0, text_mask: Optional[torch.Tensor] = None,
                      head_start: int = 0, num_heads: Optional[int] = None, op=None) -> torch.Tensor:
        """`attend` on the whole sequence for heads ``[head_start, head_start + H)`` of ``num_heads``
        (default: all heads are here). The schedule's head groups are cut to those heads and each piece
        runs through ``op`` (default `ssta_attention`; see `parallel` for the context-parallel one)."""
        thw = runtime.thw
        n_video = query.shape[1] - text_len
        if n_video != thw[0] * thw[1] * thw[2]:
            raise ValueError(
                f"attention received {n_video} video tokens but the captured latent grid {thw} holds "
                f"{thw[0] * thw[1] * thw[2]}; the grid hook belongs to another transformer or call"
            )
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)   # [B, H, S, D] views
        if torch.is_autocast_enabled(q.device.type):  # as SDPA under autocast: one low-precision dtype
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        check_backend_support(q, self.backend)
        local = q.shape[1]
        total = local if num_heads is None else num_heads
        groups = self._head_groups(runtime, layer, thw, total)
        for _, _, cfg in groups:
            self._check_tiles(cfg, thw)
        stats = self.stats if self.stats is not None else runtime.stats
        if torch.compiler.is_compiling():   # a growing record list would recompile every call: not recorded
            stats = None
        token = stats.start(q.device) if stats is not None else None
        want_info = stats is not None
        op = op or _local_ssta
        outs, dens, kinds = [], [], set()
        for h0, h1, cfg in groups:
            a, b = max(h0, head_start) - head_start, min(h1, head_start + local) - head_start
            sl = slice(a, max(a, b)) if (a, b) != (0, local) else slice(None)
            out, density = op(q[:, sl], k[:, sl], v[:, sl], tuple(thw), cfg, text_len, text_mask,
                              self.backend, h1 - h0, want_info)
            if out is None:
                continue
            outs.append(out)
            kinds.add(cfg.sparse_type)
            if density is not None:
                dens.append(density * (b - a))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if stats is not None:
            record = AttentionRecord(
                step=runtime.step, layer=layer, sparse_type=kinds.pop() if len(kinds) == 1 else "mixed",
                thw=tuple(thw), text_len=text_len, density=(sum(dens) / local).detach(),
            )
            stats.stop(token, record)
        return out.transpose(1, 2)


def _local_ssta(q, k, v, thw, config, text_len, text_mask, backend, group_heads, want_info):
    """`ssta_attention` on one head group held whole by this process: ``(out [B, h, S, D], density)``."""
    if q.shape[1] == 0:
        return None, None
    # the processor has applied its own strict-tiles rule (`_check_tiles`) already
    res = ssta_attention(q, k, v, thw, config, text_len, text_mask, backend=backend, return_info=want_info,
                         strict_tiles=False)
    return (res[0], res[1].density) if want_info else (res, None)

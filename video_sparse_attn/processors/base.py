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

from ..attention import resolve_backend, ssta_attention
from ..config import SSTAConfig
from ..families import family_of
from .grid_hook import (LAYER_ATTR, RUNTIME_ATTR, SSTARuntime, find_calling_transformer, install_grid_hook,
                        runtime_of)
from .schedule import SSTASchedule
from .stats import AttentionRecord, SSTAStats

__all__ = ["SSTAAttnProcessor", "check_backend_support"]

MAX_HEAD_DIM = 256

_NO_GRID = (
    "SSTA needs the latent grid (t, h, w) of the current forward, and none was captured for this "
    "attention layer. Enable SSTA with `video_sparse_attn.enable_ssta(transformer, config)` (or "
    "`enable_ssta(pipe, config)`), which installs the grid hook, instead of calling the processor "
    "outside a supported transformer's forward."
)


def check_backend_support(q: torch.Tensor, backend: str) -> str:
    """Resolve ``backend`` for ``q [B, H, S, D]`` and refuse what it cannot run, naming the values.

    The ``triton`` backend runs float16 / bfloat16 / float32 and head dims up to 256; the ``torch``
    backend runs any float dtype and head dim.
    """
    resolved = resolve_backend(backend, q)
    if resolved == "triton":
        allowed = (torch.float16, torch.bfloat16, torch.float32)
        if q.dtype not in allowed:
            raise TypeError(
                f"SSTA backend 'triton' (chosen by backend={backend!r}) runs {[str(d) for d in allowed]}, "
                f"but the attention inputs are {q.dtype}: cast the transformer (e.g. "
                "`transformer.to(torch.bfloat16)`) or pass backend='torch'"
            )
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(
                f"SSTA backend 'triton' runs head dims up to {MAX_HEAD_DIM}, got head dim {q.shape[-1]}; "
                "pass backend='torch'"
            )
    return resolved


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
            stay visible as keys (``pad_type`` ``zero`` / ``repeat``, sparse attention); such padding
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
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        self.config = config
        self.schedule = schedule
        self.backend = backend
        self.stats = stats
        self.strict_tiles = strict_tiles
        self._stock_processors: dict = {}

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
                raise RuntimeError(_NO_GRID)
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
        if not self.strict_tiles or config.pad_type == "mask" or config.sparse_type == "dense":
            return
        for axis, tile, size in zip("thw", config.tile_thw, thw):
            if tile > size:
                raise ValueError(
                    f"tile_thw={config.tile_thw} is longer than the latent grid thw={tuple(thw)} "
                    f"along {axis} "
                    f"({tile} > {size}); with pad_type={config.pad_type!r} the padded tokens stay visible as "
                    "keys and outnumber the real ones. Use a smaller tile, pad_type='mask', or "
                    "strict_tiles=False to run it anyway"
                )

    def attend(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               text_len: int = 0, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SSTA over diffusers-layout ``query, key, value [B, S, H, D]`` (``S = t*h*w + text_len``,
        video first); returns ``[B, S, H, D]`` (a transposed view of the op's output)."""
        runtime, layer = self._runtime_for(attn)
        thw = runtime.thw
        n_video = query.shape[1] - text_len
        if n_video != thw[0] * thw[1] * thw[2]:
            raise ValueError(
                f"attention received {n_video} video tokens but the captured latent grid {thw} holds "
                f"{thw[0] * thw[1] * thw[2]}; the grid hook belongs to another transformer or call"
            )
        if self._parallel_config is not None:
            raise NotImplementedError(
                "SSTA processors do not support diffusers context parallelism yet (the op needs the whole "
                "sequence on each rank); disable it or use the stock processors"
            )
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)   # [B, H, S, D] views
        if torch.is_autocast_enabled(q.device.type):  # as SDPA under autocast: one low-precision dtype
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        check_backend_support(q, self.backend)
        groups = self._head_groups(runtime, layer, thw, q.shape[1])
        for _, _, cfg in groups:
            self._check_tiles(cfg, thw)
        stats = self.stats if self.stats is not None else runtime.stats
        token = stats.start(q.device) if stats is not None else None
        want_info = stats is not None
        outs, dens = [], []
        for h0, h1, cfg in groups:
            sl = slice(h0, h1) if len(groups) > 1 else slice(None)
            res = ssta_attention(q[:, sl], k[:, sl], v[:, sl], tuple(thw), cfg, text_len, text_mask,
                                 backend=self.backend, return_info=want_info)
            out, info = res if want_info else (res, None)
            outs.append(out)
            if info is not None:
                dens.append(info.density * (h1 - h0))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if stats is not None:
            kinds = {cfg.sparse_type for _, _, cfg in groups}
            record = AttentionRecord(
                step=runtime.step, layer=layer, sparse_type=kinds.pop() if len(kinds) == 1 else "mixed",
                thw=tuple(thw), text_len=text_len, density=(sum(dens) / q.shape[1]).detach(),
            )
            stats.stop(token, record)
        return out.transpose(1, 2)

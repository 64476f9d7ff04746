"""The diffusers video transformers SSTA supports: one `ModelFamily` entry each, in `FAMILIES`.

Everything the package knows about a model family lives here: its diffusers transformer and pipeline
classes, which attention layers SSTA replaces and the processor function that runs them, the stock
processors to restore, a tiny config that builds offline, the text encoders' widths and the latent
grid rules (VAE compression, patch sizes). Processors, training, scripts, tests and examples read it.
Adding a family is one entry here plus its processor function. diffusers is imported lazily.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

__all__ = ["ModelFamily", "FAMILIES", "family_of", "family_named", "family_of_pipeline", "UnsupportedModelError"]

Triple = Tuple[int, int, int]


class UnsupportedModelError(TypeError):
    """A model (or family / pipeline name) that no `ModelFamily` describes."""


_LOADED: Dict[str, object] = {}


def _load(path: str):
    """``"package.module:attr"`` → the attribute (imports the module once; a dict hit afterwards, which
    `torch.compile` traces without a graph break)."""
    obj = _LOADED.get(path)
    if obj is None:
        module, attr = path.split(":")
        obj = _LOADED[path] = getattr(importlib.import_module(module), attr)
    return obj


@dataclass(frozen=True)
class ModelFamily:
    """How one diffusers video transformer maps onto SSTA.

    Attributes:
        name: short id (``"hunyuan_video15"``, ``"hunyuan_video"``, ``"wan"``): dataset metadata, CLI flags.
        transformer_class, pipeline_class: diffusers class names.
        sparse_prefixes: names in ``transformer.attn_processors`` of the layers SSTA replaces start with
            one of these, in execution order (the schedule's layer indices follow it) ...
        sparse_suffix: ... and end with this (Wan: ``.attn1.processor``, the self-attention only).
        attention: ``"module:function"`` of the processor function for the replaced layers,
            ``fn(processor, attn, hidden_states, encoder_hidden_states, attention_mask, rotary)``.
        stock_sparse_processor: ``"module:class"`` of the stock processor of the replaced layers.
        stock_other_processor: same for every other attention layer (text refiner, Wan's cross-attention).
        patch_attrs: config attributes giving the patch size ``(pt, ph, pw)``: one attribute holding the
            triple, or three attributes.
        text_dim_attrs: config attributes of the widths ``text_dim``, ``text_dim_2`` (second text
            encoder), ``pooled_dim`` (pooled text projection); None where the family has none.
        vae_compression_thw: the released VAE's (temporal, spatial, spatial) compression.
        tiny_config: a small transformer config that builds offline and runs on a CPU (head dim 16).
    """

    name: str
    transformer_class: str
    pipeline_class: str
    sparse_prefixes: Tuple[str, ...]
    attention: str
    stock_sparse_processor: str
    stock_other_processor: str
    patch_attrs: Tuple[str, ...]
    text_dim_attrs: Tuple[Optional[str], Optional[str], Optional[str]]
    vae_compression_thw: Triple
    tiny_config: Mapping[str, object]
    sparse_suffix: str = ".processor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiny_config", MappingProxyType(dict(self.tiny_config)))

    # ------------------------------------------------------------------ attention layers
    def is_sparse_layer(self, processor_name: str) -> bool:
        """Whether SSTA replaces the layer named ``processor_name`` (a key of ``attn_processors``)."""
        return processor_name.startswith(self.sparse_prefixes) and processor_name.endswith(self.sparse_suffix)

    def sparse_layer_names(self, transformer: torch.nn.Module) -> list:
        """Names of the replaced layers in execution order (the schedule's layer indices)."""
        names = [n for n in transformer.attn_processors if self.is_sparse_layer(n)]
        return sorted(names, key=lambda n: next(i for i, p in enumerate(self.sparse_prefixes) if n.startswith(p)))

    def attention_fn(self) -> Callable:
        """The processor function running SSTA on this family's replaced layers."""
        return _load(self.attention)

    def stock_processor(self, processor_name: str) -> object:
        """A fresh stock processor for one attention layer (what the model class installs)."""
        path = self.stock_sparse_processor if self.is_sparse_layer(processor_name) else self.stock_other_processor
        return _load(path)()

    # ------------------------------------------------------------------ shapes
    def patch_thw(self, transformer: torch.nn.Module) -> Triple:
        """Patch size ``(pt, ph, pw)`` of a transformer of this family."""
        cfg = transformer.config
        if len(self.patch_attrs) == 1:
            return tuple(int(p) for p in getattr(cfg, self.patch_attrs[0]))  # type: ignore[return-value]
        return tuple(int(getattr(cfg, a)) for a in self.patch_attrs)  # type: ignore[return-value]

    def latent_grid(self, transformer: torch.nn.Module, latent_thw: Triple) -> Triple:
        """Token grid ``(t, h, w)`` after patchify of latents ``[..., T, H, W]`` with ``latent_thw = (T, H, W)``."""
        return tuple(n // p for n, p in zip(latent_thw, self.patch_thw(transformer)))  # type: ignore[return-value]

    def latent_thw(self, num_frames: int, height: int, width: int,
                   compression_thw: Optional[Triple] = None) -> Triple:
        """Latent size ``(T, H, W)`` of a video: ``T = (frames - 1) // ct + 1`` (causal VAE), ``H = height // cs``.

        ``compression_thw`` defaults to the released VAE's (`vae_compression_thw`).
        """
        ct, ch, cw = compression_thw or self.vae_compression_thw
        return ((num_frames - 1) // ct + 1, height // ch, width // cw)

    def text_dims(self, transformer: torch.nn.Module) -> Dict[str, Optional[int]]:
        """Text input widths: ``text_dim``, ``text_dim_2``, ``pooled_dim`` (None where absent)."""
        cfg = transformer.config
        keys = ("text_dim", "text_dim_2", "pooled_dim")
        return {k: (None if a is None else int(getattr(cfg, a))) for k, a in zip(keys, self.text_dim_attrs)}

    # ------------------------------------------------------------------ construction
    def tiny_transformer(self, seed: int = 0, **overrides) -> torch.nn.Module:
        """A randomly initialised `tiny_config` transformer (no download), ``overrides`` applied."""
        import diffusers

        torch.manual_seed(seed)
        return getattr(diffusers, self.transformer_class)(**{**self.tiny_config, **overrides})


_HV = "diffusers.models.transformers.transformer_hunyuan_video"
_REFINER = "diffusers.models.attention_processor:AttnProcessor2_0"

FAMILIES: Mapping[str, ModelFamily] = MappingProxyType({f.name: f for f in (
    ModelFamily(
        name="hunyuan_video15", transformer_class="HunyuanVideo15Transformer3DModel",
        pipeline_class="HunyuanVideo15Pipeline", sparse_prefixes=("transformer_blocks.",),
        attention="video_sparse_attn.processors.hunyuan_video15:hunyuan_video15_attention",
        stock_sparse_processor=f"{_HV}15:HunyuanVideo15AttnProcessor2_0", stock_other_processor=_REFINER,
        patch_attrs=("patch_size_t", "patch_size", "patch_size"),
        text_dim_attrs=("text_embed_dim", "text_embed_2_dim", None), vae_compression_thw=(4, 16, 16),
        tiny_config=dict(
            in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
            rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v"),
    ),
    ModelFamily(
        name="hunyuan_video", transformer_class="HunyuanVideoTransformer3DModel",
        pipeline_class="HunyuanVideoPipeline",
        sparse_prefixes=("transformer_blocks.", "single_transformer_blocks."),
        attention="video_sparse_attn.processors.hunyuan_video:hunyuan_video_attention",
        stock_sparse_processor=f"{_HV}:HunyuanVideoAttnProcessor2_0", stock_other_processor=_REFINER,
        patch_attrs=("patch_size_t", "patch_size", "patch_size"),
        text_dim_attrs=("text_embed_dim", None, "pooled_projection_dim"), vae_compression_thw=(4, 8, 8),
        tiny_config=dict(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None),
    ),
    ModelFamily(
        name="wan", transformer_class="WanTransformer3DModel", pipeline_class="WanPipeline",
        sparse_prefixes=("blocks.",), sparse_suffix=".attn1.processor",
        attention="video_sparse_attn.processors.wan:wan_self_attention",
        stock_sparse_processor="diffusers.models.transformers.transformer_wan:WanAttnProcessor",
        stock_other_processor="diffusers.models.transformers.transformer_wan:WanAttnProcessor",
        patch_attrs=("patch_size",), text_dim_attrs=("text_dim", None, None), vae_compression_thw=(4, 8, 8),
        tiny_config=dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    ),
)})

_SUPPORTED = "supported: " + ", ".join(f"{f.name} ({f.transformer_class}, {f.pipeline_class})"
                                       for f in FAMILIES.values())


def family_of(transformer: object) -> ModelFamily:
    """The `ModelFamily` of a diffusers transformer instance (subclasses included).

    Raises `UnsupportedModelError` (a TypeError) naming the supported families otherwise.
    """
    by_class = {f.transformer_class: f for f in FAMILIES.values()}
    for cls in type(transformer).__mro__:
        fam = by_class.get(cls.__name__)
        if fam is not None and cls.__module__.startswith("diffusers"):
            return fam
    raise UnsupportedModelError(f"SSTA does not support {type(transformer).__name__}; {_SUPPORTED}")


def family_named(name: str) -> ModelFamily:
    """The family with this `ModelFamily.name` or diffusers transformer class name."""
    for fam in FAMILIES.values():
        if name in (fam.name, fam.transformer_class):
            return fam
    raise UnsupportedModelError(f"no model family {name!r}; {_SUPPORTED}")


def family_of_pipeline(pipeline_class: str) -> ModelFamily:
    """The family whose diffusers pipeline class is named ``pipeline_class``."""
    for fam in FAMILIES.values():
        if fam.pipeline_class == pipeline_class:
            return fam
    raise UnsupportedModelError(f"SSTA does not support the pipeline {pipeline_class}; {_SUPPORTED}")

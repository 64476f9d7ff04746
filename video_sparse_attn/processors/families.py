"""The diffusers transformers SSTA supports: patch sizes, which attention layers it replaces, and the
stock processors to restore."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

__all__ = ["ModelFamily", "family_of", "SUPPORTED_MODELS"]


@dataclass(frozen=True)
class ModelFamily:
    """How one transformer class maps onto SSTA.

    Attributes:
        name: ``"hunyuan_video15"`` | ``"hunyuan_video"`` | ``"wan"``.
        class_name: the diffusers model class.
        prefixes: attention-processor names (as in ``transformer.attn_processors``) that SSTA replaces
            start with one of these, in execution order; every other attention stays stock.
        suffix: and end with this (Wan: only ``attn1``, the self-attention).
    """

    name: str
    class_name: str
    prefixes: Tuple[str, ...]
    suffix: str = ".processor"

    def patch_thw(self, transformer: torch.nn.Module) -> Tuple[int, int, int]:
        cfg = transformer.config
        if self.name == "wan":
            return tuple(int(p) for p in cfg.patch_size)  # type: ignore[return-value]
        return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))

    def is_sparse_layer(self, processor_name: str) -> bool:
        return processor_name.startswith(self.prefixes) and processor_name.endswith(self.suffix)

    def sparse_layer_names(self, transformer: torch.nn.Module) -> list:
        """Names of the replaced layers in execution order (the schedule's layer indices)."""
        names = [n for n in transformer.attn_processors if self.is_sparse_layer(n)]
        return sorted(names, key=lambda n: next(i for i, p in enumerate(self.prefixes) if n.startswith(p)))

    def stock_processor(self, processor_name: str) -> object:
        """A fresh stock processor for one attention layer (what the model class installs)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        if self.name == "wan":
            from diffusers.models.transformers.transformer_wan import WanAttnProcessor

            return WanAttnProcessor()
        if not self.is_sparse_layer(processor_name):
            return AttnProcessor2_0()
        if self.name == "hunyuan_video15":
            from diffusers.models.transformers.transformer_hunyuan_video15 import (
                HunyuanVideo15AttnProcessor2_0)

            return HunyuanVideo15AttnProcessor2_0()
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        return HunyuanVideoAttnProcessor2_0()


SUPPORTED_MODELS: Dict[str, ModelFamily] = {
    f.class_name: f
    for f in (
        ModelFamily("hunyuan_video15", "HunyuanVideo15Transformer3DModel", ("transformer_blocks.",)),
        ModelFamily("hunyuan_video", "HunyuanVideoTransformer3DModel",
                    ("transformer_blocks.", "single_transformer_blocks.")),
        ModelFamily("wan", "WanTransformer3DModel", ("blocks.",), suffix=".attn1.processor"),
    )
}


def family_of(transformer: object) -> ModelFamily:
    """The `ModelFamily` of a transformer instance; TypeError naming the supported classes otherwise."""
    for cls in type(transformer).__mro__:
        fam = SUPPORTED_MODELS.get(cls.__name__)
        if fam is not None and cls.__module__.startswith("diffusers"):
            return fam
    raise TypeError(
        f"SSTA does not support {type(transformer).__name__}; supported diffusers transformers: "
        f"{', '.join(sorted(SUPPORTED_MODELS))}"
    )


"""Which transformer is trained: tiny models, loading, forward inputs.

The families themselves (classes, tiny configs, text widths, latent grid rules) are described in
`video_sparse_attn.families`. diffusers is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from ..families import family_named, family_of

__all__ = ["tiny_transformer", "load_transformer", "transformer_inputs", "latent_grid", "text_dims",
           "latent_channels"]

# HunyuanVideo-1.5's pipeline always hands 729 (SigLIP) image tokens, all zero for text-to-video.
HV15_IMAGE_TOKENS = 729


def tiny_transformer(family: str = "hunyuan_video15", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised small transformer of ``family`` built from its tiny config (no download)."""
    return family_named(family).tiny_transformer(seed, **overrides)


def load_transformer(path: str, torch_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Load the transformer of a local diffusers model: a pipeline folder (with ``transformer/``)
    or a transformer folder (``config.json`` naming a supported transformer class)."""
    import diffusers

    folder = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no transformer config at {cfg_path}; --model must be a local "
                                "diffusers pipeline or transformer folder")
    with open(cfg_path) as f:
        cls_name = json.load(f).get("_class_name")
    family = family_named(str(cls_name))   # UnsupportedModelError naming the supported families otherwise
    return getattr(diffusers, family.transformer_class).from_pretrained(folder, torch_dtype=torch_dtype)


def text_dims(transformer: torch.nn.Module) -> Dict[str, Optional[int]]:
    """Text input widths the transformer expects: ``text_dim``, ``text_dim_2``, ``pooled_dim``."""
    return family_of(transformer).text_dims(transformer)


def latent_channels(transformer: torch.nn.Module) -> int:
    """Channels of the latents being denoised (HunyuanVideo-1.5 also takes cond latents + mask)."""
    return transformer.config.out_channels or transformer.config.in_channels


def latent_grid(transformer: torch.nn.Module, latent_thw: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Token grid ``(t, h, w)`` after patchify for latents of size ``latent_thw``."""
    return family_of(transformer).latent_grid(transformer, latent_thw)


def transformer_inputs(transformer: torch.nn.Module, batch: Dict[str, torch.Tensor],
                       noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                       guidance_scale: float = 6.0, image_tokens: int = HV15_IMAGE_TOKENS) -> Dict:
    """Keyword arguments of ``transformer(...)`` as the family's text-to-video pipeline builds them.

    ``noisy_latents [B, C, T, H, W]``, ``timesteps [B]`` in the scheduler's 0..1000 scale.
    """
    family = family_of(transformer).name
    dtype = noisy_latents.dtype
    emb = batch["prompt_embeds"].to(dtype)
    mask = batch["prompt_mask"]
    b = noisy_latents.shape[0]
    kwargs: Dict = {"timestep": timesteps.to(dtype), "return_dict": False}
    if family == "hunyuan_video15":
        hidden = noisy_latents
        extra = transformer.config.in_channels - noisy_latents.shape[1]
        if extra:  # text-to-video: zero cond latents and a zero mask channel
            zeros = noisy_latents.new_zeros(b, extra, *noisy_latents.shape[2:])
            hidden = torch.cat([noisy_latents, zeros], dim=1)
        if "prompt_embeds_2" not in batch:
            raise ValueError("HunyuanVideo-1.5 needs prompt_embeds_2 / prompt_mask_2 (ByT5) in the dataset")
        kwargs.update(
            hidden_states=hidden, encoder_hidden_states=emb, encoder_attention_mask=mask,
            encoder_hidden_states_2=batch["prompt_embeds_2"].to(dtype),
            encoder_attention_mask_2=batch["prompt_mask_2"],
            image_embeds=noisy_latents.new_zeros(b, image_tokens, transformer.config.image_embed_dim))
    elif family == "hunyuan_video":
        if "pooled_prompt_embeds" not in batch:
            raise ValueError("HunyuanVideo needs pooled_prompt_embeds (CLIP) in the dataset")
        kwargs.update(hidden_states=noisy_latents, encoder_hidden_states=emb, encoder_attention_mask=mask,
                      pooled_projections=batch["pooled_prompt_embeds"].to(dtype))
        if transformer.config.guidance_embeds:
            kwargs["guidance"] = noisy_latents.new_full((b,), guidance_scale * 1000.0)
    else:  # wan: padded text positions are zero vectors, no mask
        kwargs.update(hidden_states=noisy_latents, encoder_hidden_states=emb * mask[..., None].to(dtype))
    return kwargs

"""Which transformer is trained: family detection, tiny configs, loading, forward inputs.

Families: ``"hunyuan_video15"`` (`HunyuanVideo15Transformer3DModel`), ``"hunyuan_video"``
(`HunyuanVideoTransformer3DModel`) and ``"wan"`` (`WanTransformer3DModel`). diffusers is imported
lazily, inside the functions that need it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

__all__ = ["FAMILIES", "family_of", "tiny_transformer", "load_transformer", "transformer_inputs",
           "latent_grid", "text_dims"]

FAMILIES = {
    "hunyuan_video15": "HunyuanVideo15Transformer3DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "wan": "WanTransformer3DModel",
}

# Small configs that build offline and run on a CPU (diffusers' own test sizes, head dim 16).
TINY_CONFIGS = {
    "hunyuan_video15": dict(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v"),
    "hunyuan_video": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None),
    "wan": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
}

# HunyuanVideo-1.5's pipeline always hands 729 (SigLIP) image tokens, all zero for text-to-video.
HV15_IMAGE_TOKENS = 729


def family_of(transformer: torch.nn.Module) -> str:
    """Family name of a diffusers video transformer; ValueError for anything else."""
    name = type(transformer).__name__
    for family, cls_name in FAMILIES.items():
        if name == cls_name:
            return family
    raise ValueError(f"unsupported transformer class {name!r}; supported: {sorted(FAMILIES.values())}")


def tiny_transformer(family: str = "hunyuan_video15", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised small transformer of ``family`` built from config (no download)."""
    import diffusers

    if family not in TINY_CONFIGS:
        raise ValueError(f"family must be one of {sorted(TINY_CONFIGS)}, got {family!r}")
    torch.manual_seed(seed)
    return getattr(diffusers, FAMILIES[family])(**{**TINY_CONFIGS[family], **overrides})


def load_transformer(path: str, torch_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Load the transformer of a local diffusers model: a pipeline folder (with ``transformer/``)
    or a transformer folder (``config.json`` naming one of `FAMILIES`)."""
    import diffusers

    folder = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no transformer config at {cfg_path}; --model must be a local "
                                "diffusers pipeline or transformer folder")
    with open(cfg_path) as f:
        cls_name = json.load(f).get("_class_name")
    if cls_name not in FAMILIES.values():
        raise ValueError(f"{cfg_path} names {cls_name!r}; supported: {sorted(FAMILIES.values())}")
    return getattr(diffusers, cls_name).from_pretrained(folder, torch_dtype=torch_dtype)


def text_dims(transformer: torch.nn.Module) -> Dict[str, Optional[int]]:
    """Text input widths the transformer expects: ``text_dim``, ``text_dim_2``, ``pooled_dim``."""
    cfg, family = transformer.config, family_of(transformer)
    if family == "hunyuan_video15":
        return {"text_dim": cfg.text_embed_dim, "text_dim_2": cfg.text_embed_2_dim, "pooled_dim": None}
    if family == "hunyuan_video":
        return {"text_dim": cfg.text_embed_dim, "text_dim_2": None, "pooled_dim": cfg.pooled_projection_dim}
    return {"text_dim": cfg.text_dim, "text_dim_2": None, "pooled_dim": None}


def latent_channels(transformer: torch.nn.Module) -> int:
    """Channels of the latents being denoised (HunyuanVideo-1.5 also takes cond latents + mask)."""
    return transformer.config.out_channels or transformer.config.in_channels


def latent_grid(transformer: torch.nn.Module, latent_thw: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Token grid ``(t, h, w)`` after patchify for latents of size ``latent_thw``."""
    cfg = transformer.config
    if family_of(transformer) == "wan":
        pt, ph, pw = cfg.patch_size
    else:
        pt, ph, pw = cfg.patch_size_t, cfg.patch_size, cfg.patch_size
    t, h, w = latent_thw
    return (t // pt, h // ph, w // pw)


def transformer_inputs(transformer: torch.nn.Module, batch: Dict[str, torch.Tensor],
                       noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                       guidance_scale: float = 6.0, image_tokens: int = HV15_IMAGE_TOKENS) -> Dict:
    """Keyword arguments of ``transformer(...)`` as the family's text-to-video pipeline builds them.

    ``noisy_latents [B, C, T, H, W]``, ``timesteps [B]`` in the scheduler's 0..1000 scale.
    """
    family = family_of(transformer)
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

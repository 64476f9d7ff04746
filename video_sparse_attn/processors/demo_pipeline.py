"""A tiny, randomly initialised HunyuanVideo-1.5 pipeline that builds offline (no hub, no weights).

Sizes follow diffusers' own test configs. There are no text encoders: `random_prompt_embeds` makes
prompt embeddings and masks of the right shapes, passed to the pipeline directly. Whatever it
generates is noise from random weights; it exists to run the whole SSTA path anywhere, fast.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

__all__ = ["tiny_hunyuan_video15_pipeline", "random_prompt_embeds", "TINY_TRANSFORMER", "TINY_VAE"]

TINY_TRANSFORMER = dict(
    in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
    num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
    rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v",
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
    spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
    upsample_match_channel=False,
)


def tiny_hunyuan_video15_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                  transformer_overrides: Optional[dict] = None):
    """`HunyuanVideo15Pipeline` with a tiny transformer and VAE (random weights, built from config)."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance,
                           FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)

    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(**{**TINY_TRANSFORMER, **(transformer_overrides or {})})
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(**TINY_VAE)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=1.0),
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def random_prompt_embeds(pipe, batch_size: int = 1, text_len: int = 24, text_len_2: int = 8,
                         valid: Optional[int] = None, seed: int = 0,
                         device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Random stand-ins for the two text encoders' outputs, as keyword arguments of the pipeline call.

    ``valid`` text tokens (default: two thirds) are marked valid in both masks, the rest padding.
    """
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    valid = max(1, (2 * text_len) // 3) if valid is None else valid
    mask = torch.zeros(batch_size, text_len, dtype=torch.long)
    mask[:, :valid] = 1
    mask_2 = torch.zeros(batch_size, text_len_2, dtype=torch.long)
    mask_2[:, : max(1, min(valid, text_len_2) // 2)] = 1
    dtype = pipe.transformer.dtype
    out = {
        "prompt_embeds": torch.randn(batch_size, text_len, cfg.text_embed_dim, generator=g),
        "prompt_embeds_mask": mask,
        "prompt_embeds_2": torch.randn(batch_size, text_len_2, cfg.text_embed_2_dim, generator=g),
        "prompt_embeds_mask_2": mask_2,
    }
    device = device or pipe.transformer.device
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}

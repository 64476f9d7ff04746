"""Tiny, randomly initialised models that build offline (no hub, no weights): transformers of every
family with forward inputs, and a HunyuanVideo-1.5 pipeline.

Transformer sizes are the families' `ModelFamily.tiny_config`. There are no text encoders:
`random_prompt_embeds` / `tiny_inputs` make embeddings and masks of the right shapes. Whatever these
models generate is noise from random weights; they exist to run the whole SSTA path anywhere, fast.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..families import family_named, family_of

__all__ = ["tiny_model", "tiny_inputs", "tiny_hunyuan_video15_pipeline", "random_prompt_embeds", "TINY_VAE"]

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
    spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
    upsample_match_channel=False,
)


def tiny_hunyuan_video15_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                  transformer_overrides: Optional[dict] = None):
    """`HunyuanVideo15Pipeline` with a tiny transformer and VAE (random weights, built from config)."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance,
                           FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline)

    transformer = family_named("hunyuan_video15").tiny_transformer(seed, **(transformer_overrides or {}))
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


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The family's tiny transformer in eval mode (``family``: a `ModelFamily.name`)."""
    return family_named(family).tiny_transformer(seed, **overrides).eval()


def tiny_inputs(transformer: torch.nn.Module, latent_thw: Tuple[int, int, int] = (3, 6, 8), batch: int = 2,
                text_len: int = 12, text_len_2: int = 5, image_tokens: int = 3, seed: int = 1) -> Dict:
    """Keyword arguments of ``transformer(...)``: random latents ``[B, C, *latent_thw]`` and text, as the
    family's pipeline passes them (`training.models.transformer_inputs`).

    Batch element ``b`` has ``text_len - 5*b`` valid prompt tokens (``text_len_2 - 2*b`` for the second
    encoder; at least 1), so the masks differ.
    """
    from ..training.models import latent_channels, transformer_inputs

    dims = family_of(transformer).text_dims(transformer)
    g = torch.Generator().manual_seed(seed)
    valid = torch.tensor([max(1, text_len - 5 * b) for b in range(batch)])
    data = {"prompt_embeds": torch.randn(batch, text_len, dims["text_dim"], generator=g),
            "prompt_mask": (torch.arange(text_len) < valid[:, None]).long()}
    if dims["text_dim_2"]:
        data["prompt_embeds_2"] = torch.randn(batch, text_len_2, dims["text_dim_2"], generator=g)
        valid_2 = torch.tensor([max(1, text_len_2 - 2 * b) for b in range(batch)])
        data["prompt_mask_2"] = (torch.arange(text_len_2) < valid_2[:, None]).long()
    if dims["pooled_dim"]:
        data["pooled_prompt_embeds"] = torch.randn(batch, dims["pooled_dim"], generator=g)
    latents = torch.randn(batch, latent_channels(transformer), *latent_thw, generator=g)
    kwargs = transformer_inputs(transformer, data, latents, torch.full((batch,), 500.0), image_tokens=image_tokens)
    return {k: (v.to(transformer.device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}

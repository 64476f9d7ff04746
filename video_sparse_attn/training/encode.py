"""Turn videos and captions into the latent dataset format of `data` (VAE + text encoders).

The VAE and text encoders come from a local diffusers pipeline of the family; each family's own
``encode_prompt`` is used so the embeddings match what its pipeline hands the transformer at
inference. Latent scaling follows each pipeline's decode step:

- HunyuanVideo-1.5, HunyuanVideo: ``latents = z · vae.config.scaling_factor``
- Wan: ``latents = (z − latents_mean) / latents_std`` (per channel, from the VAE config)
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["load_frames", "preprocess_frames", "encode_latents", "encode_prompt", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_frames(path: str) -> List:
    """PIL frames of a video file (via ``diffusers.utils.load_video``, needs imageio + imageio-ffmpeg)
    or of a folder of images (sorted by name)."""
    from PIL import Image

    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise ValueError(f"{path!r} holds no image frames ({IMAGE_EXTENSIONS})")
        return [Image.open(os.path.join(path, n)).convert("RGB") for n in names]
    try:
        from diffusers.utils import load_video
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading video files needs diffusers") from e
    try:
        return load_video(path)
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs imageio and imageio-ffmpeg: pip install imageio "
                          "imageio-ffmpeg (or pass folders of frame images)") from e


def preprocess_frames(frames: Sequence, num_frames: int, height: int, width: int) -> torch.Tensor:
    """First ``num_frames`` frames, resized (shorter side) and centre-cropped to ``height × width``,
    as float ``[1, 3, F, H, W]`` in [-1, 1]. ``frames``: PIL images or uint8 ``[F, H, W, 3]``."""
    import numpy as np

    if len(frames) < num_frames:
        raise ValueError(f"clip has {len(frames)} frames, fewer than num_frames={num_frames}")
    out = []
    for frame in list(frames)[:num_frames]:
        x = torch.from_numpy(np.array(frame)) if not isinstance(frame, torch.Tensor) else frame
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"frames must be H×W×3, got shape {tuple(x.shape)}")
        x = x.permute(2, 0, 1)[None].float() / 127.5 - 1.0
        scale = max(height / x.shape[-2], width / x.shape[-1])
        size = (max(height, round(x.shape[-2] * scale)), max(width, round(x.shape[-1] * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True,
                                            align_corners=False)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        out.append(x[0, :, top:top + height, left:left + width])
    return torch.stack(out, dim=1)[None].clamp(-1, 1)


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor, family: str,
                   sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[C, T, H, W]`` scaled latents of ``pixels [1, 3, F, H, W]`` (posterior mode unless ``sample``)."""
    pixels = pixels.to(vae.device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    z = (dist.sample(generator) if sample else dist.mode()).float()
    cfg = vae.config
    if family == "wan":
        mean = torch.tensor(cfg.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device).view(1, -1, 1, 1, 1)
        z = (z - mean) / std
    else:
        z = z * cfg.scaling_factor
    return z[0].cpu()


@torch.no_grad()
def encode_prompt(pipe, family: str, prompt: str, device: torch.device) -> Dict[str, torch.Tensor]:
    """Text tensors of one prompt (keys of the dataset format), through the pipeline's own encoder."""
    if family == "hunyuan_video15":
        emb, mask, emb2, mask2 = pipe.encode_prompt(prompt, device=device, dtype=torch.float32)
        out = {"prompt_embeds": emb[0], "prompt_mask": mask[0],
               "prompt_embeds_2": emb2[0], "prompt_mask_2": mask2[0]}
    elif family == "hunyuan_video":
        emb, pooled, mask = pipe.encode_prompt(prompt, device=device, dtype=torch.float32)
        out = {"prompt_embeds": emb[0], "prompt_mask": mask[0], "pooled_prompt_embeds": pooled[0]}
    elif family == "wan":
        emb, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                    dtype=torch.float32)
        out = {"prompt_embeds": emb[0], "prompt_mask": (emb[0].abs().sum(-1) > 0)}  # padding rows are zeros
    else:
        raise ValueError(f"unknown family {family!r}")
    out = {k: v.float().cpu() for k, v in out.items()}
    for k in ("prompt_mask", "prompt_mask_2"):
        if k in out:
            out[k] = out[k].long()
    return out

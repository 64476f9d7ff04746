"""Rectified-flow (flow-matching) training objective, as diffusers' Flow-Match Euler scheduler uses.

``x_σ = (1 − σ)·x₀ + σ·ε``; the transformer sees ``timestep = 1000·σ`` and predicts the velocity
``ε − x₀`` (the scheduler steps ``x ← x + (σ_next − σ)·v``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["sample_sigmas", "add_noise", "flow_matching_loss", "NUM_TRAIN_TIMESTEPS"]

NUM_TRAIN_TIMESTEPS = 1000
WEIGHTING = ("logit_normal", "uniform", "mode")


def sample_sigmas(batch_size: int, generator: torch.Generator, scheme: str = "logit_normal",
                  shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29) -> torch.Tensor:
    """float32 ``[B]`` noise levels in (0, 1): density ``scheme`` then the time shift
    ``σ' = s·σ / (1 + (s − 1)·σ)`` (``shift`` 1 = none)."""
    if scheme not in WEIGHTING:
        raise ValueError(f"scheme must be one of {WEIGHTING}, got {scheme!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(batch_size, generator=generator) * logit_std + logit_mean)
    else:
        u = torch.rand(batch_size, generator=generator)
        if scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    u = u.clamp(1e-4, 1 - 1e-4)
    return shift * u / (1 + (shift - 1) * u)


def add_noise(latents: torch.Tensor, sigmas: torch.Tensor,
              generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(noisy, target)`` for clean ``latents [B, ...]`` and ``sigmas [B]``; noise drawn on CPU from
    ``generator`` (reproducible across devices), then moved."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
    x0 = latents.float()
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return torch.nn.functional.mse_loss(pred.float(), target.float())

"""Wan (`WanTransformer3DModel`) self-attention (``attn1``) with SSTA.

Same fused-or-separate projections, across-heads RMS norm and interleaved rotary embedding as
diffusers' `WanAttnProcessor`; the cross-attention (``attn2``) keeps the stock processor.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["wan_self_attention"]


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding on ``x [B, S, H, D]``; ``freqs [1, S, 1, D]``."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out.type_as(x)


def wan_self_attention(proc, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor], rotary_emb):
    """``hidden_states [B, N, C]`` video tokens → ``[B, N, C]``."""
    if attention_mask is not None:
        raise ValueError("Wan self-attention with SSTA takes no attention_mask (the stock model passes none)")
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = _rotate(query, *rotary_emb)
        key = _rotate(key, *rotary_emb)

    out = proc.attend(attn, query, key, value, 0, None)
    out = out.flatten(2, 3).type_as(query)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)

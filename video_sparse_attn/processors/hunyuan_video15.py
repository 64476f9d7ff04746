"""HunyuanVideo-1.5 joint attention (`HunyuanVideo15Transformer3DModel`) with SSTA.

Same projections, RMS norms and rotary embedding as diffusers' `HunyuanVideo15AttnProcessor2_0`;
only the attention differs. The stock processor expands the ``[B, L]`` text mask into a dense
``[B, 1, S, S]`` boolean mask (13 GB at 720p / 121 frames); here the ``[B, L]`` mask goes to
`ssta_attention` as ``text_mask`` and becomes per-block valid-key counts / the SSTA text rule.
"""

from __future__ import annotations

from typing import Optional

import torch

from .joint import append_text_qkv, heads as _heads, split_joint_output

__all__ = ["hunyuan_video15_attention"]


def hunyuan_video15_attention(proc, attn, hidden_states: torch.Tensor,
                              encoder_hidden_states: Optional[torch.Tensor],
                              attention_mask: Optional[torch.Tensor], image_rotary_emb):
    """``hidden_states [B, N, C]`` video, ``encoder_hidden_states [B, L, C]`` text (valid tokens
    first), ``attention_mask [B, L]`` (True / 1 = valid). Returns ``(video [B, N, C], text [B, L, C])``."""
    from diffusers.models.embeddings import apply_rotary_emb

    query = _heads(attn.to_q(hidden_states), attn.heads)
    key = _heads(attn.to_k(hidden_states), attn.heads)
    value = _heads(attn.to_v(hidden_states), attn.heads)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

    text_len = 0
    if encoder_hidden_states is not None:
        text_len = encoder_hidden_states.shape[1]
        query, key, value = append_text_qkv(attn, query, key, value, encoder_hidden_states)

    text_mask = None
    if attention_mask is not None and text_len:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != text_len:
            raise ValueError(
                f"HunyuanVideo-1.5 attention expects the text mask as [B, L={text_len}], got "
                f"{tuple(attention_mask.shape)}"
            )
        text_mask = attention_mask.bool()

    out = proc.attend(attn, query, key, value, text_len, text_mask)   # [B, S, H, D]
    out = out.flatten(2, 3).to(query.dtype)

    return split_joint_output(attn, out, encoder_hidden_states, text_len)

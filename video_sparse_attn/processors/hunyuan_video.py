"""HunyuanVideo (v1, `HunyuanVideoTransformer3DModel`) attention with SSTA.

Double-stream blocks append the text projections (``add_q_proj`` ...) after the video tokens;
single-stream blocks hand over video and text hidden states that share one projection, with the
rotary embedding applied to the video part only. Both reproduce diffusers'
`HunyuanVideoAttnProcessor2_0` except for the attention itself. The model's ``[B, 1, 1, S]``
key-padding mask becomes the ``[B, L]`` text mask of `ssta_attention`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .joint import append_text_qkv, heads as _heads, split_joint_output

__all__ = ["hunyuan_video_attention"]


def _text_mask(attention_mask: Optional[torch.Tensor], text_len: int) -> Optional[torch.Tensor]:
    if attention_mask is None or text_len == 0:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1:
        raise ValueError(
            "HunyuanVideo attention expects a [B, 1, 1, S] key-padding mask, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"HunyuanVideo attention expects a bool key-padding mask, got {attention_mask.dtype}")
    return attention_mask[:, 0, 0, -text_len:]


def hunyuan_video_attention(proc, attn, hidden_states: torch.Tensor,
                            encoder_hidden_states: Optional[torch.Tensor],
                            attention_mask: Optional[torch.Tensor], image_rotary_emb):
    """Returns ``(video [B, N, C], text [B, L, C])`` like the stock processor."""
    from diffusers.models.embeddings import apply_rotary_emb

    single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
    if single_stream:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0

    query = _heads(attn.to_q(hidden_states), attn.heads)
    key = _heads(attn.to_k(hidden_states), attn.heads)
    value = _heads(attn.to_v(hidden_states), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    if image_rotary_emb is not None:
        if single_stream:
            query = torch.cat([apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1),
                               query[:, -text_len:]], dim=1)
            key = torch.cat([apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1),
                             key[:, -text_len:]], dim=1)
        else:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        query, key, value = append_text_qkv(attn, query, key, value, encoder_hidden_states)

    out = proc.attend(attn, query, key, value, text_len, _text_mask(attention_mask, text_len))
    out = out.flatten(2, 3).to(query.dtype)

    return split_joint_output(attn, out, encoder_hidden_states, text_len)

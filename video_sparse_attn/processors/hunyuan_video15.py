"""HunyuanVideo-1.5 joint attention (`HunyuanVideo15Transformer3DModel`) with SSTA.

Same projections, RMS norms and rotary embedding as diffusers' `HunyuanVideo15AttnProcessor2_0`;
only the attention differs. The stock processor expands the ``[B, L]`` text mask into a dense
``[B, 1, S, S]`` boolean mask (13 GB at 720p / 121 frames); here the ``[B, L]`` mask goes to
`ssta_attention` as ``text_mask`` and becomes per-block valid-key counts / the SSTA text rule.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["hunyuan_video15_attention"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


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
        eq = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
        ek = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
        ev = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query = torch.cat([query, eq], dim=1)
        key = torch.cat([key, ek], dim=1)
        value = torch.cat([value, ev], dim=1)

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

    if encoder_hidden_states is not None:
        out, text_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out
    return out, encoder_hidden_states

"""Pieces shared by the ``[video | text]`` joint-attention processors (HunyuanVideo, HunyuanVideo-1.5)."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["heads", "append_text_qkv", "split_joint_output"]


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, S, H*D]`` → ``[B, S, H, D]`` (a view)."""
    return x.unflatten(2, (num_heads, -1))


def append_text_qkv(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    encoder_hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project the text with ``add_{q,k,v}_proj`` (+ ``norm_added_q/k``) and append it after the
    video tokens: ``[B, N, H, D]`` → ``[B, N + L, H, D]``."""
    eq = heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
    ek = heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
    ev = heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    return torch.cat([query, eq], dim=1), torch.cat([key, ek], dim=1), torch.cat([value, ev], dim=1)


def split_joint_output(attn, out: torch.Tensor, encoder_hidden_states, text_len: int):
    """``out [B, N + L, C]`` → ``(video [B, N, C], text [B, L, C])`` through ``to_out`` / ``to_add_out``
    as the stock processors do (text passes through unchanged when there is none)."""
    if encoder_hidden_states is None:
        return out, encoder_hidden_states
    out, text_out = out[:, :-text_len], out[:, -text_len:]
    if getattr(attn, "to_out", None) is not None:
        out = attn.to_out[1](attn.to_out[0](out))
    if getattr(attn, "to_add_out", None) is not None:
        text_out = attn.to_add_out(text_out)
    return out, text_out

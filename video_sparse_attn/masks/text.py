"""Text rules: text rows and columns are kept, then blocks past the valid text are cut."""

from __future__ import annotations


import torch

__all__ = ["assemble_with_text", "apply_text_validity"]


def assemble_with_text(video_mask: torch.Tensor, num_text_blocks: int) -> torch.Tensor:
    """Embed a video×video mask ``[B, H, Nv, Nv]`` into ``[B, H, N, N]`` with every text row and
    every text column kept (text queries see everything; every query sees the text)."""
    B, H, Nv, _ = video_mask.shape
    N = Nv + num_text_blocks
    out = torch.ones(B, H, N, N, dtype=torch.bool, device=video_mask.device)
    out[:, :, :Nv, :Nv] = video_mask
    return out


def apply_text_validity(mask: torch.Tensor, num_video_blocks: int, block_size: int,
                        text_mask: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Cut the text blocks that hold no valid token (for the sparse types `build.text_rule_applies` names).

    With ``V_b`` valid text tokens, ``keep = max(1, ceil(V_b / bs))`` text blocks stay and
    ``cut = Nv + keep``. Columns ``>= cut`` are cleared for every row. Rows ``>= cut`` keep only their
    diagonal block (reference behaviour), or, with ``exact`` (``pad_type="mask"``, where those rows'
    own keys are all invalid), every column ``< cut`` — so they equal dense attention over the valid
    keys instead of attending to nothing.

    Args: mask ``[B or 1, H, N, N]``; text_mask ``[B, L]`` bool (True = valid, a prefix).
    Returns: ``[B, H, N, N]``.
    """
    N = mask.shape[-1]
    valid = text_mask.sum(-1)                                                    # [B]
    keep = ((valid + block_size - 1) // block_size).clamp(min=1)
    cut = (num_video_blocks + keep)[:, None, None, None]                         # [B,1,1,1]
    ids = torch.arange(N, device=mask.device)
    row_past = ids.view(1, 1, N, 1) >= cut
    col_past = ids.view(1, 1, 1, N) >= cut
    if exact:
        return torch.where(row_past, ~col_past, mask & ~col_past)
    diag = ids.view(1, 1, N, 1) == ids.view(1, 1, 1, N)
    return torch.where(row_past, diag, mask & ~col_past)

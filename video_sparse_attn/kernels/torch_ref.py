"""Block-sparse attention over a `BlockSparsePlan` in plain PyTorch.

The CPU path of `ssta_attention` and the oracle the Triton kernels are tested against. Readable
rather than fast; autograd flows through it. It never forms an S×S tensor: for every query block
it gathers only the key blocks the plan keeps, so memory is O(S · kept blocks · block).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["block_sparse_attention_torch"]


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to the plan's kept blocks.

    Args:
        q: ``[B, H, Mq*q_block, D]``; k, v: ``[B, H, Nk*k_block, D]`` (any strides, float dtype).
        plan: `BlockSparsePlan` with batch/head dims B or 1.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        out ``[B, H, Sq, D]`` (q's dtype) and lse ``[B, H, Sq]`` float32 (float64 for float64 inputs; natural log). Rows that
        see no key, and rows past ``plan.q_valid``, give out 0 and lse -inf. Computed in float32 (float64 stays float64).
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    Mq, Nk, qb, kb = plan.num_q_blocks, plan.num_k_blocks, plan.q_block, plan.k_block
    if Sq != Mq * qb or Sk != Nk * kb:
        raise ValueError(f"plan covers Sq={Mq}*{qb}, Sk={Nk}*{kb} but q has {Sq} rows and k has {Sk}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    # Width of the loop over kept blocks: the largest row count (one host read; fine on this path).
    width = int(plan.kv_count.max().item()) if plan.kv_count.numel() else 0
    width = max(width, 1)
    idx = plan.kv_index[..., :width].long().expand(B, H, Mq, width)              # [B,H,Mq,W]
    slot_ok = (torch.arange(width, device=q.device) < plan.kv_count.unsqueeze(-1)).expand(B, H, Mq, width)

    qb_ = q.to(cdt).reshape(B, H, Mq, qb, D)
    kb_ = k.to(cdt).reshape(B, H, Nk, kb, D)
    vb_ = v.to(cdt).reshape(B, H, Nk, kb, D)
    tok_ok = plan.token_valid().reshape(-1, 1, Nk, kb).expand(B, H, Nk, kb)          # [B,H,Nk,kb]

    def gather_blocks(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        # x [B,H,Nk,kb,...], i [B,H,Mq] → [B,H,Mq,kb,...]
        extra = x.shape[4:]
        ii = i.reshape(B, H, Mq, *([1] * (1 + len(extra)))).expand(B, H, Mq, kb, *extra)
        return torch.gather(x, 2, ii)

    # scores of every kept block, [B,H,Mq,qb,W*kb]
    scores = []
    for w in range(width):
        kw = gather_blocks(kb_, idx[..., w])                                           # [B,H,Mq,kb,D]
        s = torch.einsum("bhmqd,bhmkd->bhmqk", qb_, kw) * scale
        ok = gather_blocks(tok_ok, idx[..., w]) & slot_ok[..., w, None]               # [B,H,Mq,kb]
        scores.append(s.masked_fill(~ok[:, :, :, None, :], float("-inf")))
    s = torch.cat(scores, dim=-1)
    lse = torch.logsumexp(s, dim=-1)                                                  # [B,H,Mq,qb]
    p = torch.exp(s - torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)[..., None])

    out = torch.zeros_like(qb_)
    for w in range(width):
        vw = gather_blocks(vb_, idx[..., w])
        out = out + torch.einsum("bhmqk,bhmkd->bhmqd", p[..., w * kb:(w + 1) * kb], vw)
    out, lse = out.reshape(B, H, Sq, D), lse.reshape(B, H, Sq)
    q_ok = plan.query_valid().reshape(-1, 1, Sq)                                      # padded query rows
    out = out.masked_fill(~q_ok[..., None], 0.0)
    lse = lse.masked_fill(~q_ok, float("-inf"))
    return out.to(q.dtype), lse.to(cdt)

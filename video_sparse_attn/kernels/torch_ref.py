"""Block-sparse attention over a `BlockSparsePlan` in plain PyTorch.

The CPU path of `ssta_attention` and the oracle the Triton kernels are tested against. Readable
rather than fast; autograd flows through it. It never forms an S×S tensor and costs O(kept blocks):
query blocks are bucketed by their kept-block count (at most twice the kept blocks in slots, see
`row_buckets`), and each bucket gathers only its own kept key blocks, so a few dense text rows do
not make every row dense.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

__all__ = ["block_sparse_attention_torch"]


def row_buckets(counts: torch.Tensor) -> List[Tuple[torch.Tensor, int]]:
    """Group rows by kept-block count: ``counts`` int CPU ``[R]`` → ``[(row ids int64, width)]``.

    Rows are first grouped by ``ceil(log2(count))``; neighbouring groups are merged while a group's
    slots (rows × width, its largest count) stay within twice its kept blocks. So the buckets hold
    at most ``2 * counts.sum()`` slots, in as few buckets (kernel launches) as that allows.
    Rows with count 0 are in no bucket.
    """
    counts = counts.long()
    live = counts > 0
    level = torch.zeros_like(counts)
    level[live] = torch.ceil(torch.log2(counts[live].double())).long()     # 2**(level-1) < count <= 2**level
    groups = [torch.nonzero(live & (level == lv)).flatten() for lv in torch.unique(level[live]).tolist()]
    buckets: List[Tuple[torch.Tensor, int]] = []
    for rows in reversed(groups):                                          # widest first
        if buckets:
            prev, width = buckets[-1]
            merged = torch.cat([prev, rows])
            if len(merged) * width <= 2 * int(counts[merged].sum()):
                buckets[-1] = (merged, width)
                continue
        buckets.append((rows, int(counts[rows].max())))
    return buckets


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
        out ``[B, H, Sq, D]`` (q's dtype) and lse ``[B, H, Sq]`` float32 (float64 for float64 inputs;
        natural log). Rows that see no key, and rows past ``plan.q_valid``, give out 0 and lse -inf.
        ``plan.window_lo`` / ``window_hi`` (when set) drop keys outside the token window;
        ``plan.key_bias`` (when set) is added to the scaled scores. Computed in float32 (float64 stays
        float64).

    Host synchronisation: one copy of ``plan.kv_count`` to the host, to size the buckets.
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    Mq, Nk, qb, kb = plan.num_q_blocks, plan.num_k_blocks, plan.q_block, plan.k_block
    if Sq != Mq * qb or Sk != Nk * kb:
        raise ValueError(f"plan covers Sq={Mq}*{qb}, Sk={Nk}*{kb} but q has {Sq} rows and k has {Sk}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    Bp, Hp = plan.kv_count.shape[:2]
    Bv = plan.k_valid.shape[0]

    # rows r = (b*H + h)*Mq + m of q; their plan rows, key-block offsets and validity rows
    b, h, m = (x.flatten() for x in torch.meshgrid(torch.arange(B), torch.arange(H), torch.arange(Mq),
                                                   indexing="ij"))
    plan_row = ((b if Bp > 1 else 0) * Hp + (h if Hp > 1 else 0)) * Mq + m                  # [R]
    counts = plan.kv_count.reshape(-1).cpu()[plan_row]                                         # one host copy

    q_rows = q.to(cdt).reshape(B * H * Mq, qb, D)
    k_blocks = k.to(cdt).reshape(B * H * Nk, kb, D)
    v_blocks = v.to(cdt).reshape(B * H * Nk, kb, D)
    kv_index = plan.kv_index.reshape(-1, Nk)
    tok_ok = plan.token_valid().reshape(Bv * Nk, kb)                                           # [Bv*Nk, kb]
    key_bias = plan.key_bias
    if key_bias is not None:                                                                   # [Bb*Nk, kb]
        Bb = key_bias.shape[0]
        key_bias = key_bias.to(cdt).reshape(Bb * Nk, kb)

    outs, lses, order = [], [], []
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        outs.append(q_rows.new_zeros(empty.numel(), qb, D))
        lses.append(q_rows.new_full((empty.numel(), qb), float("-inf")))
        order.append(empty)
    for rows, width in row_buckets(counts):
        rd = rows.to(dev)
        ids = kv_index[plan_row[rows].to(dev), :width].long()                                 # [n, W]
        n = ids.shape[0]
        bh = (b[rows] * H + h[rows]).to(dev)[:, None]
        bv = (b[rows] if Bv > 1 else torch.zeros_like(rows)).to(dev)[:, None]
        slot_ok = torch.arange(width, device=dev) < counts[rows].to(dev)[:, None]           # [n, W]
        ok = tok_ok[bv * Nk + ids] & slot_ok[..., None]                                     # [n, W, kb]
        kw = k_blocks[bh * Nk + ids].reshape(n, width * kb, D)
        vw = v_blocks[bh * Nk + ids].reshape(n, width * kb, D)
        s = torch.einsum("nqd,nkd->nqk", q_rows[rd], kw) * scale
        ok = ok.reshape(n, 1, width * kb)
        if key_bias is not None:   # natural-log weight of each key: logit + log m = log(m e^logit)
            bb = (b[rows] if Bb > 1 else torch.zeros_like(rows)).to(dev)[:, None]
            kbias = key_bias[bb * Nk + ids].reshape(n, 1, width * kb)
            never = kbias == float("-inf")          # weight 0: masked like an invalid key (no NaN gradient)
            s = s + kbias.masked_fill(never, 0.0)
            ok = ok & ~never
        s = s.masked_fill(~ok, float("-inf"))
        if plan.has_window:   # lo <= key position - (query position + shift) <= hi
            bq = (b[rows] if plan.window_shift.shape[0] > 1 else torch.zeros_like(rows)).to(dev)
            shift = plan.window_shift[bq, m[rows].to(dev)].long()                                  # [n]
            q_pos = (m[rows].to(dev) * qb + shift)[:, None] + torch.arange(qb, device=dev)       # [n, qb]
            k_pos = (ids[..., None] * kb + torch.arange(kb, device=dev)).reshape(n, width * kb)  # [n, W*kb]
            d = k_pos[:, None, :] - q_pos[:, :, None]
            lo, hi = plan.window_bounds()
            s = s.masked_fill((d < lo) | (d > hi), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                                                    # [n, qb]
        p = torch.exp(s - torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)[..., None])
        outs.append(torch.einsum("nqk,nkd->nqd", p, vw))
        lses.append(lse)
        order.append(rows)
    inverse = torch.argsort(torch.cat(order)).to(dev)
    out = torch.cat(outs)[inverse].reshape(B, H, Sq, D)
    lse = torch.cat(lses)[inverse].reshape(B, H, Sq)
    q_ok = plan.query_valid().reshape(-1, 1, Sq)                                              # padded query rows
    out = out.masked_fill(~q_ok[..., None], 0.0)
    lse = lse.masked_fill(~q_ok, float("-inf"))
    return out.to(q.dtype), lse.to(cdt)

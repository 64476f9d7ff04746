"""`block_sparse_attention_varlen`: packed sequences of any lengths (``cu_seqlens``) in one call.

Each sequence is laid out in its own whole blocks (its last q / k block ragged: ``q_valid`` /
``k_valid``), the per-sequence block masks sit on the diagonal of one block mask, and one
`block_sparse_attention` runs them all on any backend. Lengths are host-side facts (Python ints or
CPU tensors, as flash-attention's ``max_seqlen``): building the layout reads no device memory.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .attention import block_sparse_attention
from .plan import BlockSparsePlan, window_offsets
from .validation import check_varlen_call, check_window_size

__all__ = ["block_sparse_attention_varlen"]

Lengths = Union[Sequence[int], torch.Tensor]


def _packed_slots(cu: List[int], block: int, device) -> Tuple[torch.Tensor, List[int], List[int]]:
    """Slot of every packed token in the block layout, blocks per sequence, valid tokens per block."""
    slots, blocks, valid, start = [], [], [], 0
    for a, b in zip(cu, cu[1:]):
        n = b - a
        m = -(-n // block)
        slots.append(torch.arange(n) + start)
        blocks.append(m)
        valid += [min(block, n - i * block) for i in range(m)]
        start += m * block
    return torch.cat(slots).to(device), blocks, valid


def block_sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Lengths,
    cu_seqlens_k: Lengths,
    block_masks: Optional[Sequence[torch.Tensor]] = None,
    q_block: int = 128,
    k_block: Optional[int] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of packed sequences.

    Args:
        q: ``[Tq, H, D]`` (sequences concatenated); k, v: ``[Tk, H_kv, D]`` (``H % H_kv == 0``).
        cu_seqlens_q, cu_seqlens_k: ``n + 1`` offsets (Python ints or a CPU int tensor); sequence ``i``
            is ``q[cu_q[i]:cu_q[i+1]]`` against ``k[cu_k[i]:cu_k[i+1]]``; any lengths, 0 included.
        block_masks: ``n`` bool masks ``[Mq_i, Nk_i]`` or ``[H or 1, Mq_i, Nk_i]`` with
            ``Mq_i = ceil(len_q_i / q_block)``, ``Nk_i = ceil(len_k_i / k_block)``; None: dense.
        q_block, k_block: tokens per block (multiples of 16; ``k_block`` defaults to ``q_block``).
        causal, window_size: token-level causality / sliding window ``(left, right)`` (-1: unbounded)
            as in flash-attention's varlen, bottom-right aligned per sequence: query ``i`` of a
            sequence sees its keys ``i + len_k - len_q - left .. i + len_k - len_q + right``
            (``causal``: ``right = 0``). Blocks wholly outside are dropped.

    Returns:
        ``out [Tq, H, D]`` and ``lse [H, Tq]`` float32 (natural log; rows that see no key: out 0,
        lse -inf); both differentiable.
    """
    cq, ck, q_block, k_block = check_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, block_masks, q_block, k_block,
                                                 causal)
    n = len(cq) - 1
    dev = q.device
    q_slots, mq, q_valid = _packed_slots(cq, q_block, dev)
    k_slots, nk, k_valid = _packed_slots(ck, k_block, dev)
    Mt, Nt = sum(mq), sum(nk)
    heads = 1
    if block_masks is not None:
        heads = max((m.shape[0] if m.dim() == 3 else 1) for m in block_masks) if n else 1
    mask = torch.zeros(heads, max(Mt, 1), max(Nt, 1), dtype=torch.bool, device=dev)
    r0 = c0 = 0
    for i in range(n):
        if block_masks is None:
            mask[:, r0:r0 + mq[i], c0:c0 + nk[i]] = True
        else:
            mask[:, r0:r0 + mq[i], c0:c0 + nk[i]] = block_masks[i].to(dev)
        r0, c0 = r0 + mq[i], c0 + nk[i]
    Sq, Sk = max(Mt, 1) * q_block, max(Nt, 1) * k_block

    def to_blocks(x: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
        if length == x.shape[0]:     # every sequence is whole blocks: the packing is the block layout
            return x.permute(1, 0, 2)[None]
        padded = x.new_zeros(length, *x.shape[1:]).index_copy(0, slots, x)      # zeros in ragged tails
        return padded.permute(1, 0, 2)[None]                                     # [1, H, S, D] view

    def counts(valid, blocks):
        return torch.tensor(valid or [0], dtype=torch.int32, device=dev)[None][:, :max(blocks, 1)]

    shift = None
    # the bounds without the bottom-right offset, which differs per sequence and goes into the shift
    lo, hi = window_offsets(0, 0, causal, check_window_size(window_size))
    if lo is not None or hi is not None:
        # per sequence: query i sees key j iff lo <= (j - K_start) - (i - Q_start) - (len_k - len_q) <= hi,
        # so the rows of each query block are shifted by K_start - Q_start + len_k - len_q
        shifts, q0, k0 = [], 0, 0
        for i in range(n):
            shifts += [k0 - q0 + (ck[i + 1] - ck[i]) - (cq[i + 1] - cq[i])] * mq[i]
            q0, k0 = q0 + mq[i] * q_block, k0 + nk[i] * k_block
        shift = torch.tensor(shifts or [0], dtype=torch.int32, device=dev)[None, :max(Mt, 1)]
    # the rows past q_valid are never read back (and their gradient is 0): no backend needs to zero them
    plan = BlockSparsePlan.from_block_mask(mask[None], q_block, k_block, counts(k_valid, Nt), counts(q_valid, Mt),
                                           lo, hi, shift, zero_q_tail=False)
    out, lse = block_sparse_attention(to_blocks(q, q_slots, Sq), to_blocks(k, k_slots, Sk), to_blocks(v, k_slots, Sk),
                                      plan, scale, backend)
    if Sq == q.shape[0]:
        return out[0].permute(1, 0, 2), lse[0]
    return out[0].permute(1, 0, 2).index_select(0, q_slots), lse[0].index_select(1, q_slots)

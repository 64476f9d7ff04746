"""Differentiable collectives for Ulysses sequence parallelism over one process group.

Each forward is a fixed exchange of blocks between ranks; its backward is the adjoint exchange, so
autograd flows through them like through a reshape. Layouts are diffusers' ``[B, S, H, D]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["seq_to_heads", "heads_to_seq", "gather_heads", "all_reduce_sum"]


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """all-to-all over dim 0 of ``x [N, ...]``: block j goes to rank j; block j received from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    B, s, H, D = x.shape
    blocks = x.reshape(B, s, n, H // n, D).permute(2, 0, 1, 3, 4)        # [n, B, s, H/n, D]
    got = _exchange(blocks, group)                                       # [n(src rank), B, s, H/n, D]
    return got.permute(1, 0, 2, 3, 4).reshape(B, n * s, H // n, D)


def _heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    B, S, h, D = y.shape
    blocks = y.reshape(B, n, S // n, h, D).permute(1, 0, 2, 3, 4)       # [n, B, S/n, h, D]
    got = _exchange(blocks, group)                                       # [n(src rank), B, S/n, h, D]
    return got.permute(1, 2, 0, 3, 4).reshape(B, S // n, n * h, D)


class _AllToAll(torch.autograd.Function):
    """``forward_fn(x, group)`` whose adjoint is ``backward_fn`` (the inverse exchange)."""

    @staticmethod
    def forward(ctx, x, group, forward_fn, backward_fn):
        ctx.group, ctx.backward_fn = group, backward_fn
        return forward_fn(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.group), None, None, None


class _GatherHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        parts = [torch.empty_like(x.contiguous()) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        # adjoint of an all-gather: sum the copies of every rank, keep this rank's heads
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        n, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=2)[rank].contiguous(), None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, S/N, H, D]`` sequence shard, all heads → ``[B, S, H/N, D]`` whole sequence (shards in
    rank order), this rank's heads."""
    return _AllToAll.apply(x, group, _seq_to_heads, _heads_to_seq)


def heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `seq_to_heads`: ``[B, S, H/N, D]`` → ``[B, S/N, H, D]``."""
    return _AllToAll.apply(y, group, _heads_to_seq, _seq_to_heads)


def gather_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, L, H/N, D]`` per rank → ``[B, L, H, D]`` on every rank (heads in rank order); the gradient
    is summed over ranks, as each rank's copy feeds only its own part of the loss."""
    return _GatherHeads.apply(x, group)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (no gradient)."""
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x

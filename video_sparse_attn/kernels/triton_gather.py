"""Triton row gather with fused group means: ``y[b,h,i] = x[b,h,src[i]]`` (0 where ``src[i] < 0``).

Reordering a sequence into block order reads every row once; the same pass also sums each group
of ``GROUP`` consecutive output rows, so the per-block means that block selection needs cost no
second read of the tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import precompile as pc

__all__ = ["gather_rows_with_means"]


@triton.jit(do_not_specialize=["H", "R", "num_mean_groups", "mean_group0"])
def _gather_rows_kernel(
    X, Y, SRC, MEAN,
    sxb, sxh, sxs, sxd,          # x strides [B, H, S, D] (any)
    syb, syh, sys_,              # y is [B, H, R, D] contiguous in D
    H, R, num_mean_groups, mean_group0, inv_mean_div,  # R output rows; means of groups mean_group0 + (0..n-1)
                                                       # = group sums * inv_mean_div
    D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
    WANT_MEAN: tl.constexpr,
):
    # Grid: (groups of GROUP output rows, B*H). One program copies one group of one (b, h).
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    x_base = X + b * sxb + h * sxh
    y_base = Y + b * syb + h * syh
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for r0 in range(0, GROUP, BLOCK_R):
        rows = g.to(tl.int64) * GROUP + r0 + tl.arange(0, BLOCK_R)
        in_r = rows < R
        src = tl.load(SRC + rows, mask=in_r, other=-1)
        keep = (src >= 0)[:, None] & d_ok[None, :]
        x = tl.load(x_base + src[:, None] * sxs + offs_d[None, :] * sxd, mask=keep, other=0.0)
        tl.store(y_base + rows[:, None] * sys_ + offs_d[None, :], x, mask=in_r[:, None] & d_ok[None, :])
        if WANT_MEAN:
            acc += tl.sum(x.to(tl.float32), axis=0)
    if WANT_MEAN:
        gm = g - mean_group0
        if (gm >= 0) & (gm < num_mean_groups):
            tl.store(MEAN + (bh.to(tl.int64) * num_mean_groups + gm) * D + offs_d, acc * inv_mean_div, mask=d_ok)


def gather_rows_with_means(x: torch.Tensor, src: torch.Tensor, group: int, num_mean_groups: int,
                           mean_div: int = 0, mean_group0: int = 0):
    """Gather rows of ``x [B, H, S, D]`` (any strides) by ``src [R]`` (int64, -1 → zero row).

    Returns ``y [B, H, R, D]`` (contiguous) and, when ``num_mean_groups > 0``, the float32 sums of
    the ``num_mean_groups`` groups of ``group`` rows from group ``mean_group0`` on, divided by
    ``mean_div`` (default ``group``: their means), ``[B, H, num_mean_groups, D]``.
    ``group`` must be a multiple of 16, and of ``R`` when means are asked for.
    """
    B, H, S, D = x.shape
    R = src.numel()
    if group % 16 or (num_mean_groups > 0 and R % group):
        raise ValueError(f"{R} rows do not split into groups of {group} (a multiple of 16)")
    y = pc.empty(B, H, R, D, device=x.device, dtype=x.dtype)
    want = num_mean_groups > 0
    mean = pc.empty(B, H, max(num_mean_groups, 1), D, device=x.device, dtype=torch.float32)
    d_pad = max(16, triton.next_power_of_2(D))
    block_r = 16
    for cand in (64, 32):
        if group % cand == 0 and cand * d_pad <= 8192:
            block_r = cand
            break
    pc.launch(
        _gather_rows_kernel, (triton.cdiv(R, group), B * H),
        x, y, src, mean, *x.stride(), y.stride(0), y.stride(1), y.stride(2), H, R, num_mean_groups, mean_group0,
        1.0 / (mean_div or group), D=D, D_PAD=d_pad, GROUP=group, BLOCK_R=block_r, WANT_MEAN=want, num_warps=4,
    )
    return y, (mean if want else None)

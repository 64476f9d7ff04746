"""Triton untile with the zero-key correction fused in: the last pass of padding-free SSTA.

Forward, for every original token ``i`` held in block-order slot ``p = inverse[i]``::

    s      = e^lse[p] / (e^lse[p] + n[p // bs])       (= 1 where n == 0)
    y[i]   = x[p] · s

one read of the block-ordered output and one write of the result, instead of a correction pass and
a gather pass (and the float32 temporaries between them). ``n`` are the zero keys a query block sees
(`padding_free.zero_keys_per_row_block`).

Backward, for every slot ``p`` (``owner[p]`` = the token it holds, -1 for padding)::

    dx[p]   = g[owner[p]] · s
    dlse[p] = s (1 − s) Σ_d g[owner[p]] · x[p]        (0 at padding slots)

so the attention backward receives its output gradient already in block order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import precompile as pc
from .triton_common import row_program

__all__ = ["untile_scaled_fwd", "untile_scaled_bwd"]


@triton.jit
def _row_scale(LSE, N, b, h, p, ok, slb, slh, sls, snb, snh, sns, bs):
    """s = e^lse / (e^lse + n) of slots ``p`` (1 where n == 0; 0 where lse = -inf and n > 0)."""
    lse = tl.load(LSE + b * slb + h * slh + p * sls, mask=ok, other=0.0)
    n = tl.load(N + b * snb + h * snh + (p // bs) * sns, mask=ok, other=0.0)
    return 1.0 / (1.0 + n * tl.exp(tl.where(n > 0, -lse, 0.0)))


@triton.jit(do_not_specialize=["slb", "snb", "snh", "H", "S", "bs"])   # data strides stay specialised: vector loads
def _untile_scaled_fwd_kernel(
    X, LSE, N, INV, Y,
    sxb, sxh, sxs, sxd, slb, slh, sls, snb, snh, sns, syb, syh, sys_, syd,
    H, S, bs,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Grid: (row groups of the original sequence, B*H).
    b, h, rows, offs_d = row_program(H, BLOCK_R, D_PAD)
    ok = rows < S
    io = ok[:, None] & (offs_d < D)[None, :]
    p = tl.load(INV + rows, mask=ok, other=0)
    x = tl.load(X + b * sxb + h * sxh + p[:, None] * sxs + offs_d[None, :] * sxd, mask=io, other=0.0)
    s = _row_scale(LSE, N, b, h, p, ok, slb, slh, sls, snb, snh, sns, bs)
    y = x.to(tl.float32) * s[:, None]
    tl.store(Y + b * syb + h * syh + rows[:, None] * sys_ + offs_d[None, :] * syd, y.to(Y.dtype.element_ty), mask=io)


@triton.jit(do_not_specialize=["slb", "snb", "snh", "H", "P", "bs"])
def _untile_scaled_bwd_kernel(
    G, X, LSE, N, OWN, DX, DLSE,
    sgb, sgh, sgs, sgd, sxb, sxh, sxs, sxd, slb, slh, sls, snb, snh, sns,
    sdb, sdh, sds, sdd,
    H, P, bs,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Grid: (slot groups of the block order, B*H). Padding slots get zero gradients.
    b, h, p, offs_d = row_program(H, BLOCK_R, D_PAD)
    d_ok = (offs_d < D)[None, :]
    ok = p < P
    i = tl.load(OWN + p, mask=ok, other=-1)
    has = ok & (i >= 0)
    g = tl.load(G + b * sgb + h * sgh + i[:, None] * sgs + offs_d[None, :] * sgd, mask=has[:, None] & d_ok,
                other=0.0).to(tl.float32)
    x = tl.load(X + b * sxb + h * sxh + p[:, None] * sxs + offs_d[None, :] * sxd, mask=has[:, None] & d_ok,
                other=0.0).to(tl.float32)
    s = _row_scale(LSE, N, b, h, p, has, slb, slh, sls, snb, snh, sns, bs)
    dx = g * s[:, None]
    dlse = s * (1.0 - s) * tl.sum(g * x, axis=1)
    tl.store(DX + b * sdb + h * sdh + p[:, None] * sds + offs_d[None, :] * sdd, dx.to(DX.dtype.element_ty),
             mask=ok[:, None] & d_ok)
    tl.store(DLSE + (b * H + h) * P + p, tl.where(has, dlse, 0.0), mask=ok)


def _meta(D: int):
    d_pad = max(16, triton.next_power_of_2(D))
    return d_pad, max(16, min(64, 8192 // d_pad))


def _n_strides(n: torch.Tensor):
    """Strides of ``n [B', H', Nb]`` with broadcast dims (size 1) as 0."""
    return tuple(0 if n.shape[d] == 1 else n.stride(d) for d in range(2)) + (n.stride(2),)


def untile_scaled_fwd(x: torch.Tensor, lse: torch.Tensor, n: torch.Tensor, inverse: torch.Tensor, block: int,
                      like: torch.Tensor) -> torch.Tensor:
    """``y [B, H, S, D]`` (strides of ``like``: a transposed ``[B, S, H, D]`` view stays one) from
    block-ordered ``x [B, H, P, D]`` and ``lse [B, H, P]`` (any strides), ``n [B', H', P // block]``
    float32, ``inverse [S]`` int64."""
    B, H, _, D = x.shape
    S = inverse.numel()
    y = pc.empty((B, H, S, D), dtype=x.dtype, device=x.device)
    if like.shape == y.shape and like.stride(1) == D and like.stride(2) == H * D:
        y = pc.empty((B, S, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)
    d_pad, block_r = _meta(D)
    pc.launch(
        _untile_scaled_fwd_kernel, (triton.cdiv(S, block_r), B * H),
        x, lse, n, inverse, y, *x.stride(), *lse.stride(), *_n_strides(n), *y.stride(), H, S, block,
        D=D, D_PAD=d_pad, BLOCK_R=block_r, num_warps=4,
    )
    return y


def untile_scaled_bwd(g: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, n: torch.Tensor, owner: torch.Tensor,
                      block: int):
    """Gradients of `untile_scaled_fwd` w.r.t. ``x`` (``[B, H, P, D]``, x's strides) and ``lse``
    (``[B, H, P]`` float32) given ``g [B, H, S, D]``; ``owner [P]`` int64 = token of each slot or -1."""
    B, H, P, D = x.shape
    pc.wait()                                   # its background compile (see `precompile`), if any, first
    dx = pc.empty_like(x)
    dlse = pc.empty((B, H, P), dtype=torch.float32, device=x.device)
    d_pad, block_r = _meta(D)
    pc.launch(
        _untile_scaled_bwd_kernel, (triton.cdiv(P, block_r), B * H),
        g, x, lse, n, owner, dx, dlse, *g.stride(), *x.stride(), *lse.stride(), *_n_strides(n), *dx.stride(),
        H, P, block, D=D, D_PAD=d_pad, BLOCK_R=block_r, num_warps=4,
    )
    return dx, dlse

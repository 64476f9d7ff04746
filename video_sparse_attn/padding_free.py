"""Padded keys without loading them: the exact softmax correction of padding-free SSTA.

With ``pad_type="zero"`` every padded video token is a key with logit exactly 0 and value 0. If a
query row sees ``n`` of them besides its real keys, whose attention gives ``(out, lse)``, then

    softmax denominator  e^lse' = e^lse + n·e^0        →  lse' = logaddexp(lse, log n)
    output               out'   = out · e^lse / e^lse'  =  out · sigmoid(lse − log n)

(the zero values add nothing to the numerator). Both are differentiable functions of the backend's
``(out, lse)``, so gradients flow exactly through the correction. ``n`` is per query block: the
zero keys of every key block the block mask keeps, ``mask @ zero_keys``.

With ``pad_type="repeat"`` a padded slot is a copy (same k, same v) of a real token, and it lies in
that token's own tile (a tile's padding along an axis is shorter than the tile, and real tokens come
first in it). So a query that keeps the tile sees real token ``r`` exactly ``m_r`` times (itself and its
copies) and nothing else of the copies:

    Σ_slots e^s_j v_j = Σ_real m_r e^s_r v_r = Σ_real e^(s_r + log m_r) v_r     (the same for the denominator)

i.e. attention over the real keys with an additive score bias ``log m_r`` (`TileLayout.key_bias`, a
`BlockSparsePlan.key_bias`; the backend adds it, no correction afterwards). Gradients stay exact: with
the bias in P, the backward's dK_r and dV_r are the sums over the ``m_r`` identical copies, which is
what the tile layout's backward sums when every copy is a key. Only backends with
`BackendSpec.key_bias` skip the copies; the others load them (the same result).
"""

from __future__ import annotations

import torch

__all__ = ["zero_keys_per_row_block", "add_zero_keys", "untile_with_zero_keys"]


def zero_keys_per_row_block(block_mask: torch.Tensor, zero_keys: torch.Tensor) -> torch.Tensor:
    """``n [B', H', Mq]`` float32: zero keys seen by each query block (``block_mask [B', H', Mq, Nk]``
    bool, ``zero_keys [Nk]`` float32 per key block)."""
    return (block_mask.to(torch.float32) @ zero_keys.to(block_mask.device)[:, None]).squeeze(-1)


def _scaled(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x [..., D] * s [...]`` computed in ``s``'s precision, stored in x's dtype (one pass, no
    wide temporary)."""
    return torch.mul(x, s[..., None], out=torch.empty_like(x))


def _scale(lse: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``e^lse / (e^lse + n)`` = sigmoid(lse − log n), float32; exactly 1 where n == 0 (no NaN for lse = -inf)."""
    has = n > 0
    arg = torch.where(has, lse - torch.log(n.clamp(min=1.0)), torch.full_like(lse, float("inf")))
    return torch.sigmoid(arg)


class _AddZeroKeys(torch.autograd.Function):
    """out' = out · s, lse' = logaddexp(lse, log n) with s = e^lse / (e^lse + n); saves only out, lse, n.

    Backward: d out = g · s; d lse = s(1 − s) Σ_d g·out + s · g_lse (since d lse'/d lse = s).
    """

    @staticmethod
    def forward(ctx, out, lse, n):
        s = _scale(lse, n)
        ctx.save_for_backward(out, lse, n)
        new_lse = torch.where(n > 0, torch.logaddexp(lse, torch.log(n.clamp(min=1.0))), lse)
        return _scaled(out, s), new_lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        out, lse, n = ctx.saved_tensors
        s = _scale(lse, n)
        d_out = d_lse = None
        if g_out is not None:
            d_out = _scaled(g_out, s)
            d_lse = s * (1 - s) * (g_out * out).sum(-1, dtype=s.dtype)
        if g_lse is not None:
            d_lse = s * g_lse if d_lse is None else d_lse + s * g_lse
        return d_out, d_lse, None


def add_zero_keys(out: torch.Tensor, lse: torch.Tensor, n: torch.Tensor, block: int):
    """Attention over real keys ``(out [B, H, S, D], lse [B, H, S])`` → attention that also sees ``n``
    zero keys per query block (``n [B', H', S // block]``, broadcast over the rows of a block).

    Rows with ``n == 0`` are returned unchanged (also when they see no key at all: lse = -inf).
    """
    B, H, S, D = out.shape
    n_rows = n.to(lse.dtype)[..., None].expand(-1, -1, -1, block).reshape(n.shape[0], n.shape[1], S)
    new_out, new_lse = _AddZeroKeys.apply(out, lse, n_rows.expand(B, H, S))
    return new_out, new_lse


class _UntileZeroKeys(torch.autograd.Function):
    """`untile` ∘ `add_zero_keys` (output only) as one Triton pass each way (see `kernels.triton_untile`)."""

    @staticmethod
    def forward(ctx, out, lse, n, inverse, owner, block, like):
        from .kernels.triton_untile import untile_scaled_fwd

        ctx.save_for_backward(out, lse, n, owner)
        ctx.block = block
        y = untile_scaled_fwd(out, lse, n, inverse, block, like)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:   # first call of a kind: its backward compiles now
            from .kernels import precompile as pc
            from .kernels.triton_untile import untile_scaled_bwd

            key = ("untile_bwd", out.device, out.dtype, y.shape, y.stride(), out.stride(), lse.stride(), n.stride(), block)
            pc.precompile_async(key, lambda: untile_scaled_bwd(pc.empty_like(y), out, lse, n, owner, block), out.device)
        return y

    @staticmethod
    def backward(ctx, g):
        from .kernels.triton_untile import untile_scaled_bwd

        out, lse, n, owner = ctx.saved_tensors
        d_out, d_lse = untile_scaled_bwd(g, out, lse, n, owner, ctx.block)
        return d_out, d_lse, None, None, None, None, None


def untile_with_zero_keys(layout, out: torch.Tensor, lse: torch.Tensor, n: torch.Tensor, like: torch.Tensor,
                          text_first: bool = False):
    """``layout.untile(add_zero_keys(out, lse, n)[0])``: block-ordered ``out [B, H, P, D]``, ``lse [B, H, P]``
    and zero keys per query block ``n [B', H', P // block]`` (all three in the text-first order with
    ``text_first``, `TileLayout.to_text_first`) → ``[B, H, S, D]``.

    On CUDA (eager) one fused Triton pass each way, writing the result with ``like``'s layout (q's:
    diffusers' ``[B, S, H, D]`` storage stays so); elsewhere the two steps as PyTorch ops.
    """
    from .kernels.registry import triton_runs_on

    if triton_runs_on(out) and not torch.compiler.is_compiling():
        idx = layout.indices(out.device, text_first)
        return _UntileZeroKeys.apply(out, lse, n.to(torch.float32), idx["inverse"], idx["owner"],
                                     layout.block_size, like)
    return layout.untile(add_zero_keys(out, lse, n, layout.block_size)[0], text_first=text_first)

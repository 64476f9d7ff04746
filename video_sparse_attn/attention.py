"""Public ops: `block_sparse_attention` (a plan over block-ordered tensors) and `ssta_attention`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from .config import SSTAConfig
from .kernels.registry import AttentionCall, BackendSpec, select_backend
from .layout import TileLayout
from .masks.build import block_mask_from_tiled
from .padding_free import add_zero_keys, untile_with_zero_keys, zero_keys_per_row_block
from .plan import BlockSparsePlan, window_offsets
from .validation import (check_block_call, check_block_size, check_flag, check_scale, check_window_size, validate_block_inputs,
                         validate_inputs)

__all__ = ["block_sparse_attention", "ssta_attention", "SSTAInfo", "resolve_backend"]


def _autocast_off(op: Callable) -> Callable:
    """Run ``op`` with autocast off on its inputs' device: the ops compute in q's dtype on every
    backend (the Triton and FA4 kernels ignore autocast; the torch backend's matmuls and the SSTA
    selection would otherwise run in the autocast dtype). A caller under autocast casts first, as the
    processors do."""

    @functools.wraps(op)
    def wrapper(q, *args, **kwargs):
        device = q.device if isinstance(q, torch.Tensor) else None     # anything else: refused inside
        on = device is not None and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        with torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext():
            return op(q, *args, **kwargs)

    return wrapper


def resolve_backend(backend: str, q: torch.Tensor, plan: Optional[BlockSparsePlan] = None) -> str:
    """The name of the backend that runs ``q`` (and ``plan``) for ``backend`` (see `kernels.registry`)."""
    return select_backend(backend, AttentionCall.of(q, plan)).name


_SIDE_STREAMS: dict = {}


def _tile_beside(layout: TileLayout, v: torch.Tensor, text_first: bool):
    """``layout.tile(v)`` and a ``join()`` to call before v's tiles are read. On CUDA (eager, not capturing)
    the gather runs on a side stream, beside the mask / plan / list kernels that follow on the current
    one: those are many small latency-bound kernels, the gather a bandwidth-bound pass that fills the
    SMs they leave idle. Elsewhere it runs in line and ``join`` does nothing."""
    if not v.is_cuda or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return layout.tile(v, text_first=text_first), lambda: None
    main = torch.cuda.current_stream(v.device)
    side = _SIDE_STREAMS.get(v.device)
    if side is None:
        side = _SIDE_STREAMS[v.device] = torch.cuda.Stream(v.device)
    side.wait_stream(main)                      # v (and q, k's tiles before it) written
    with torch.cuda.device(v.device), torch.cuda.stream(side):
        v_t = layout.tile(v, text_first=text_first)

    def join():
        main.wait_stream(side)
        v_t.record_stream(main)                 # freed only after the current stream's reads

    return v_t, join


def _run(spec: BackendSpec, q, k, v, plan, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    return spec.load()(q, k, v, plan, scale)


def _expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Grouped-query attention: k, v ``[B, H_kv, S, D]`` with ``H % H_kv == 0`` (`check_block_call`)
    → ``[B, H, S, D]`` (each k/v head serves ``H // H_kv`` consecutive q heads; autograd sums dk, dv
    over the group)."""
    H, Hk = q.shape[1], k.shape[1]
    if Hk == H:
        return k, v
    return k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[2] == n else torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


def _plan_for_mask(block_mask: torch.Tensor, Sq: int, Sk: int, q_block: Optional[int],
                   k_block: Optional[int], window=(None, None)) -> BlockSparsePlan:
    """A plan for a bool block mask ``[Mq, Nk]`` or ``[B or 1, H or 1, Mq, Nk]`` over sequences of any
    length: the last blocks are ragged (``q_valid`` / ``k_valid``); blocks wholly outside the token
    ``window`` ``(lo, hi)`` are dropped."""
    q_block = check_block_size("q_block", q_block)
    k_block = q_block if k_block is None else check_block_size("k_block", k_block)
    Mq, Nk = -(-Sq // q_block), -(-Sk // k_block)
    if tuple(block_mask.shape[-2:]) != (Mq, Nk):
        raise ValueError(f"block mask is {tuple(block_mask.shape[-2:])} blocks but Sq={Sq}, Sk={Sk} with "
                         f"q_block={q_block}, k_block={k_block} make ({Mq}, {Nk})")
    dev = block_mask.device

    def last_ragged(n_blocks, block, length):   # device ops only (an item assignment copies from the host)
        last = torch.arange(n_blocks, device=dev) == n_blocks - 1
        return torch.where(last, length - (n_blocks - 1) * block, block).to(torch.int32)[None]

    return BlockSparsePlan.from_block_mask(block_mask, q_block, k_block, last_ragged(Nk, k_block, Sk),
                                           last_ragged(Mq, q_block, Sq), *window,
                                           zero_q_tail=False)     # rows past Sq are sliced off (gradient 0)


@_autocast_off
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: "BlockSparsePlan | torch.Tensor",
    scale: Optional[float] = None,
    backend: str = "auto",
    *,
    q_block: Optional[int] = None,
    k_block: Optional[int] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of ``q [B, H, Sq, D]`` and ``k, v [B, H_kv, Sk, D]``.

    Args:
        plan: a `BlockSparsePlan` (then ``Sq``, ``Sk`` are whole blocks), or a bool block mask
            ``[Mq, Nk]`` / ``[B or 1, H or 1, Mq, Nk]`` with ``q_block`` / ``k_block`` tokens per block
            (multiples of 16; ``k_block`` defaults to ``q_block``), over sequences of any length
            (``Mq = ceil(Sq / q_block)``; the last blocks are ragged and handled exactly). With a plan,
            ``q_block`` / ``k_block`` come from it (given as well, they must equal the plan's).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (the fastest backend that supports the call: ``fa4`` → ``triton`` →
            ``torch``), or a backend of `kernels.registry.BACKENDS` by name (never falls back; raises
            one line naming what it lacks).
        H_kv < H: grouped-query attention (``H % H_kv == 0``).
        causal: token-level causality inside the kept blocks, bottom-right aligned as in
            flash-attention: query ``i`` sees key ``j`` only if ``j <= i + Sk - Sq`` (block-causal
            patterns need no flag: give the mask).
        window_size: ``(left, right)`` token sliding window as in flash-attention (-1: unbounded),
            bottom-right aligned: query ``i`` sees keys ``i + Sk - Sq - left .. i + Sk - Sq + right``;
            ``causal`` sets ``right = 0``. Blocks wholly outside are dropped from a mask; a given
            plan keeps its own window (``plan.window_lo`` / ``window_hi``) unless one is set here.

    Returns ``(out [B,H,Sq,D], lse [B,H,Sq] float32, natural log)``, computed in q's dtype (autocast is
    off inside, as in `ssta_attention`); gradients flow to q, k, v through
    both (lse is differentiable, so chunks can be merged by their LSE). Rows that see no key: out 0,
    lse -inf.
    """
    check_block_call(q, k, v, plan, q_block, k_block, causal)
    k, v = _expand_kv_heads(q, k, v)
    Sq, Sk = q.shape[2], k.shape[2]
    from_mask = isinstance(plan, torch.Tensor)
    window = None
    window_size = check_window_size(window_size)
    if causal or window_size != (-1, -1):
        window = window_offsets(Sq, Sk, causal, window_size)
    if from_mask:
        plan = _plan_for_mask(plan, Sq, Sk, q_block, k_block, window or (None, None))
    elif window is not None:
        plan = dataclasses.replace(plan, window_lo=window[0], window_hi=window[1])
    Mq, Nk = plan.num_q_blocks * plan.q_block, plan.num_k_blocks * plan.k_block
    if not from_mask and (Sq, Sk) != (Mq, Nk):
        raise ValueError(f"the plan covers Sq={plan.num_q_blocks}*{plan.q_block}, Sk={plan.num_k_blocks}*"
                         f"{plan.k_block} but q has {Sq} rows and k {Sk}")
    q, k, v = _pad_rows(q, Mq), _pad_rows(k, Nk), _pad_rows(v, Nk)
    scale = validate_block_inputs(q, k, v, plan, scale)   # the same checks for every backend
    spec = select_backend(backend, AttentionCall.of(q, plan))
    out, lse = _run(spec, q, k, v, plan, scale)
    return (out, lse) if Sq == Mq else (out[:, :, :Sq], lse[:, :, :Sq])


def _key_args(layout: TileLayout, spec: BackendSpec, q: torch.Tensor, text_mask, padding_free: bool,
              backward: bool):
    """``(k_valid, key_bias)`` of an SSTA plan (`BlockSparsePlan` fields) for inputs like ``q``.
    Padding-free compute skips the padded video keys: zero keys always (`padding_free` adds them back
    through the LSE), ``repeat`` copies only on a backend with `BackendSpec.key_bias` (the bias
    ``log m`` of each real key carries its copies' weight; float64 for float64 ``q``), and where the
    bias slows its forward (`BackendSpec.key_bias_forward` False) only when a ``backward`` follows;
    otherwise the copies stay keys (the same result)."""
    copies = layout.pad_type == "repeat" and layout.has_video_padding
    skip = padding_free and (not copies or (spec.key_bias and (spec.key_bias_forward or backward)))
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    key_bias = layout.key_bias(q.device, dtype)[None] if skip and copies else None
    return layout.key_valid(text_mask, q.device, skip, spec.key_tile), key_bias


class SSTAInfo(NamedTuple):
    """What `ssta_attention(..., return_info=True)` also returns (tensors stay on the device)."""

    block_mask: torch.Tensor   # bool [B or 1, H or 1, N, N], tile order
    plan: BlockSparsePlan      # what the kernels ran: blocks in tile order, or text first (`text_first`)
    density: torch.Tensor      # float32 scalar: mean of the block mask
    layout: TileLayout
    text_first: bool = False   # plan's blocks in `TileLayout.to_text_first` order (`BackendSpec.text_first`)


@_autocast_off
def ssta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thw: Tuple[int, int, int],
    config: SSTAConfig = SSTAConfig(),
    text_len: int = 0,
    text_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_info: bool = False,
    padding_free: bool = True,
    return_lse: bool = False,
    strict_tiles: bool = True,
    validate: Optional[bool] = None,
    tile_means_hook: Optional[Callable] = None,
):
    """Selective and Sliding Tile Attention over a ``[video | text]`` sequence.

    Args:
        q, k, v: ``[B, H, S, D]`` (any strides; e.g. ``x.transpose(1, 2)`` of diffusers' ``[B, S, H, D]``),
            ``S = t*h*w + text_len``: video tokens in raster order over ``thw``, then text.
        thw: unpadded latent grid ``(t, h, w)``.
        config: `SSTAConfig` (used as given; `SSTAConfig.for_thw` applies the model's caller rules).
        text_len: L, number of text tokens at the end of the sequence.
        text_mask: optional ``[B, L]`` bool, True = valid text token (valid tokens form a prefix).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (the fastest backend that supports the call) or a backend name
            (``"fa4"``, ``"triton"``, ``"torch"``; see `kernels.registry`).
        return_info: also return an `SSTAInfo` (block mask, plan, density, layout).
        padding_free: compute no padded query row and load no padded video key: zero keys' exact
            effect on the softmax is added back from the LSE, ``repeat`` copies' through a score bias
            ``log m`` on the key they copy (m = its slots; on backends with `BackendSpec.key_bias`,
            torch and Triton; FA4 loads the copies), see `padding_free`. The result equals the padded
            computation to rounding. ``False`` runs the padded blocks as they are (for comparison).
        return_lse: also return ``lse [B, H, S]`` float32 (natural log, differentiable; for merging
            with attention over other keys).
        strict_tiles: refuse a tile longer than the grid while padding stays visible (``pad_type``
            ``zero`` / ``repeat``; see `validation.check_tiles`).
        validate: check that ``text_mask`` is a prefix mask (reads its values). None (default): only
            when it is on the CPU; True: also on a GPU (one host synchronisation); False: never.
        tile_means_hook: ``(q_means, k_means) -> (q_means, k_means)`` applied to the float32 tile
            means ``[B, H, Nv, D]`` before the selection (context parallelism averages them over the
            heads held by other processes here).

    Returns:
        ``out [B, H, S, D]`` in q's dtype (computed in it: autocast is off inside; cast q, k, v
        first to run in its dtype), then ``lse`` when ``return_lse``, then `SSTAInfo` when
        ``return_info``.

    Example::

        out = ssta_attention(q, k, v, thw=(31, 45, 80), config=SSTAConfig(topk=32), text_len=1985,
                             text_mask=mask)
    """
    thw, text_len = validate_inputs(q, k, v, thw, config, text_len, text_mask, strict_tiles, validate)
    for name, flag in (("return_info", return_info), ("padding_free", padding_free), ("return_lse", return_lse)):
        check_flag(name, flag)
    scale = check_scale(scale, q.shape[-1])
    layout = TileLayout(tuple(thw), config.tile_thw, text_len, config.pad_type)
    bs = layout.block_size
    spec = select_backend(backend, AttentionCall(q.device, q.dtype, int(q.shape[-1]), bs, bs))
    # one pass over q and k both reorders them and yields the tile means the selection needs
    needs_means = config.sparse_type in ("ssta", "block_attn") and config.pool_thw is None
    # the kernels' block order: tile order, or text blocks first where the backend runs blocks in the order
    # given (`BackendSpec.text_first`); masks are built in tile order and rotated for the plan
    tf = spec.text_first and layout.num_text_blocks > 0
    (q_t, q_means), (k_t, k_means) = (layout.tile_with_means(x, tf) if needs_means else (layout.tile(x, text_first=tf),
                                                                                        None) for x in (q, k))
    v_t, v_ready = _tile_beside(layout, v, tf)
    if tile_means_hook is not None and q_means is not None:
        q_means, k_means = tile_means_hook(q_means, k_means)
    block_mask = block_mask_from_tiled(q_t, k_t, layout, config, text_mask, q_means, k_means, text_first=tf)
    run_mask = layout.to_text_first(block_mask, (-2, -1)) if tf else block_mask
    dev = q.device
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    k_valid, key_bias = _key_args(layout, spec, q, text_mask, padding_free, backward)
    if tf:
        k_valid = layout.to_text_first(k_valid)
        key_bias = None if key_bias is None else layout.to_text_first(key_bias, slots=True)
    plan = BlockSparsePlan.from_block_mask(
        run_mask, bs, bs, k_valid, layout.query_valid(dev, tf) if padding_free else None,
        zero_q_tail=False,      # untile drops those rows, its backward passes 0 there
        key_bias=key_bias,
    )
    v_ready()
    out_t, lse = _run(spec, q_t, k_t, v_t, plan, scale)
    if padding_free and config.pad_type == "zero" and layout.has_video_padding:
        zero_keys = layout.zero_keys(dev, spec.key_tile)
        n_zero = zero_keys_per_row_block(run_mask, layout.to_text_first(zero_keys) if tf else zero_keys)
        if not return_lse:
            out = untile_with_zero_keys(layout, out_t, lse, n_zero, like=q, text_first=tf)
        else:
            out_t, lse = add_zero_keys(out_t, lse, n_zero, bs)
            out = layout.untile(out_t, text_first=tf)
    else:
        out = layout.untile(out_t, text_first=tf)
    extra = ((layout.untile(lse, text_first=tf),) if return_lse else ()) + (
        (SSTAInfo(block_mask, plan, plan.density, layout, tf),) if return_info else ())
    return (out, *extra) if extra else out

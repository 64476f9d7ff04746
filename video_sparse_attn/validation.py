"""Input checks shared by the public ops, `build_block_mask` and the processors: caller mistakes
become one clear error, defined once.

- `validate_inputs`: ``ssta_attention`` / ``build_block_mask`` arguments (q, k, v, grid, config, text).
- `check_tiles`: the strict-tiles rule (a tile longer than the grid with visible padding).
- `validate_block_inputs`: ``block_sparse_attention`` arguments (tensors against a plan, scale), the
  same for every backend.

Checks read shapes, dtypes and devices only, except the text-mask prefix check, which reads the
mask's values: it runs when the mask is on the CPU (free) or when ``check_values=True`` (one host
synchronisation on CUDA), never implicitly on a GPU.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .config import SSTAConfig

__all__ = ["validate_inputs", "validate_block_inputs", "check_tiles", "check_text_mask_prefix", "check_scale",
           "check_qkv"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v) -> None:
    """q, k, v are 4-D float tensors of one dtype, on one device, with no empty dimension."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, D] (4-D), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if min(q.shape) < 1:
        raise ValueError(f"q has an empty dimension: {tuple(q.shape)}")


def check_tiles(config: SSTAConfig, thw: Sequence[int]) -> None:
    """Refuse a tile longer than the latent grid along an axis while padded tokens stay visible as
    keys (``pad_type`` ``zero`` / ``repeat``): the padding then outnumbers the real tokens along that
    axis and the result is far from attention over the real tokens (``dense`` included).
    ``pad_type="mask"`` is always accepted."""
    if config.pad_type == "mask":
        return
    for axis, tile, size in zip("thw", config.tile_thw, thw):
        if tile > size:
            raise ValueError(
                f"tile_thw={config.tile_thw} is longer than the latent grid thw={tuple(thw)} along {axis} "
                f"({tile} > {size}); with pad_type={config.pad_type!r} the padded tokens stay visible as "
                "keys and outnumber the real ones. Use a smaller tile, pad_type='mask', or "
                "strict_tiles=False to run it anyway"
            )


def check_text_mask_prefix(text_mask: torch.Tensor) -> None:
    """Refuse a ``[B, L]`` bool mask whose valid tokens do not form a prefix (reads the values:
    a host synchronisation on CUDA)."""
    later_valid = text_mask[:, 1:] & ~text_mask[:, :-1]          # a valid token after an invalid one
    bad = later_valid.any(dim=1)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"text_mask[{b}] is not a prefix mask (valid tokens must come first, then padding): "
            f"{text_mask[b].int().tolist()[:64]}; reorder the text tokens so that the valid ones lead"
        )


def validate_inputs(q, k, v, thw, config, text_len, text_mask, strict_tiles: bool = True,
                    check_values: Optional[bool] = None) -> None:
    """Caller mistakes → ValueError / TypeError naming the problem.

    ``strict_tiles``: apply `check_tiles`. ``check_values``: check that ``text_mask`` is a prefix
    mask; None = only when it is on the CPU (no host synchronisation on a GPU).
    """
    check_qkv(q, k, v)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(config, SSTAConfig):
        raise TypeError(f"config must be an SSTAConfig, got {type(config).__name__}")
    if not isinstance(thw, Sequence) or isinstance(thw, str) or len(thw) != 3 or any(
        isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in thw
    ):
        raise ValueError(f"thw must be three positive ints (t, h, w), got {thw!r}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    S = q.shape[2]
    t, h, w = thw
    if S != t * h * w + text_len:
        raise ValueError(
            f"sequence length S={S} does not match the grid: t*h*w + text_len = {t}*{h}*{w} + {text_len} "
            f"= {t * h * w + text_len}"
        )
    if text_mask is not None:
        if not isinstance(text_mask, torch.Tensor):
            raise TypeError(f"text_mask must be a tensor, got {type(text_mask).__name__}")
        if text_len == 0:
            raise ValueError("text_mask given but text_len == 0")
        if tuple(text_mask.shape) != (q.shape[0], text_len):
            raise ValueError(f"text_mask must be [B, text_len] = [{q.shape[0]}, {text_len}], got {tuple(text_mask.shape)}")
        if text_mask.dtype != torch.bool:
            raise TypeError(f"text_mask must be a bool tensor (True = valid token), got {text_mask.dtype}; "
                            "convert a 0/1 mask with mask.bool()")
        if text_mask.device != q.device:
            raise ValueError(f"text_mask is on {text_mask.device} but q is on {q.device}")
        # reading values cannot be traced: under torch.compile only an explicit validate=True checks
        on_cpu = text_mask.device.type == "cpu" and not torch.compiler.is_compiling()
        if check_values or (check_values is None and on_cpu):
            check_text_mask_prefix(text_mask)
    if strict_tiles:
        check_tiles(config, thw)


def validate_block_inputs(q, k, v, plan, scale: Optional[float]) -> float:
    """Check block-ordered ``q [B,H,Sq,D]``, ``k, v [B,H,Sk,D]`` against ``plan`` and the softmax
    scale, the same way for every backend; returns the scale to use (default ``1/sqrt(D)``)."""
    check_qkv(q, k, v)
    B, H, Sq, D = q.shape
    if k.shape != v.shape or tuple(k.shape[:2]) != (B, H) or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, H={H}, Sk, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    for name in ("kv_count", "kv_index", "k_valid", "q_valid", "num_q_blocks", "q_block"):
        if not hasattr(plan, name):
            raise TypeError(f"plan must be a BlockSparsePlan, got {type(plan).__name__}")
    if plan.device != q.device:
        raise ValueError(f"the plan is on {plan.device} but q is on {q.device}")
    Mq, Nk = plan.num_q_blocks, plan.num_k_blocks
    if Sq != Mq * plan.q_block or k.shape[2] != Nk * plan.k_block:
        raise ValueError(
            f"plan covers Sq={Mq}*{plan.q_block}, Sk={Nk}*{plan.k_block} but q has {Sq} rows and k has {k.shape[2]}"
        )
    Bp, Hp = plan.kv_count.shape[:2]
    shift_b = plan.window_shift.shape[0]
    if (Bp not in (1, B) or Hp not in (1, H) or plan.k_valid.shape[0] not in (1, B) or plan.q_valid.shape[0] not in (1, B)
            or shift_b not in (1, B)):
        raise ValueError(
            f"plan batch/head dims ({Bp}, {Hp}), k_valid batch {plan.k_valid.shape[0]}, q_valid batch "
            f"{plan.q_valid.shape[0]} and window_shift batch {shift_b} must be 1 or match q's ({B}, {H})"
        )
    return check_scale(scale, D)


def check_scale(scale: Optional[float], head_dim: int) -> float:
    """The softmax scale to use: ``1/sqrt(head_dim)`` for None, else a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive float, got {scale}")
    return scale


def check_window_size(window_size) -> tuple:
    """``window_size`` as flash-attention takes it: ``(left, right)`` ints, a negative side unbounded.
    Returns ``(left, right)`` with every negative side as -1; raises one line otherwise."""
    try:
        pair = tuple(window_size)
    except TypeError:
        pair = None
    if pair is None or len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
        raise ValueError(f"window_size must be (left, right) ints (-1: unbounded), got {window_size!r}")
    return tuple(max(x, -1) for x in pair)

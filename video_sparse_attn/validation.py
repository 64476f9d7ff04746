"""Input checks shared by the public ops, `build_block_mask` and the processors: caller mistakes
become one clear error, defined once.

- `validate_inputs`: ``ssta_attention`` / ``build_block_mask`` arguments (q, k, v, grid, config, text).
- `check_tiles`: the strict-tiles rule (a tile longer than the grid with visible padding).
- `check_plan_args`: ``BlockSparsePlan.from_block_mask`` arguments.
- `check_block_call`: ``block_sparse_attention`` arguments as given (q, k, v, plan or block mask,
  block sizes, causal), before any padding or head expansion.
- `validate_block_inputs`: block-ordered tensors against a plan, and the scale, the same for every
  backend.
- `check_varlen_call`: ``block_sparse_attention_varlen`` arguments (packed tensors, ``cu_seqlens``,
  per-sequence block masks).

Checks read shapes, dtypes and devices only, except the text-mask prefix check, which reads the
mask's values: it runs when the mask is on the CPU (free) or when ``check_values=True`` (one host
synchronisation on CUDA), never implicitly on a GPU.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import List, Optional, Sequence

import torch

from .config import SSTAConfig

__all__ = ["validate_inputs", "validate_block_inputs", "check_tiles", "check_text_mask_prefix", "check_scale",
           "check_qkv", "check_block_call", "check_block_size", "check_flag", "check_varlen_call", "check_cu_seqlens",
           "check_plan_args"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v, layout: str = "[B, H, S, D]", empty_tokens: bool = False) -> None:
    """q, k, v are float tensors of ``layout``'s rank, of one dtype, on one device, with no empty
    dimension (``empty_tokens``: except the first, the tokens of a packed ``[T, H, D]``)."""
    rank = layout.count(",") + 1
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != rank:
            raise ValueError(f"{name} must be {layout} ({rank}-D), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if min(x.shape[1:] if empty_tokens else x.shape) < 1:
            raise ValueError(f"{name} has an empty dimension: {tuple(x.shape)} (layout {layout})")


def check_flag(name: str, value) -> bool:
    """A bool argument (True / False, or the ints 0 / 1); a string or None is refused (``"no"`` is truthy)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_block_size(name: str, value) -> int:
    """A block size as an int: a positive multiple of 16 (the kernels' granularity)."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name} must be an int (a positive multiple of 16), got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int (a positive multiple of 16), got {value!r}") from None
    if n < 16 or n % 16:
        raise ValueError(f"{name}={n}: block sizes must be positive multiples of 16")
    return n


def _check_kv_heads(q, k, v) -> None:
    """k and v alike, matching q's batch (4-D) and head dim, with heads dividing q's."""
    h = 1                # the heads dim, in [B, H, S, D] and in packed [T, H, D] alike
    if q.shape[-1] != k.shape[-1] or (q.dim() == 4 and q.shape[0] != k.shape[0]):
        want = f"[B={q.shape[0]}, H_kv, Sk, D={q.shape[-1]}]" if q.dim() == 4 else f"[Tk, H_kv, D={q.shape[-1]}]"
        raise ValueError(f"k and v must be {want} for q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} and {tuple(v.shape)}")
    H, Hk = q.shape[h], k.shape[h]
    if H % Hk:
        raise ValueError(f"grouped-query attention needs k and v with the same number of heads dividing q's: "
                         f"q has {H}, k {k.shape[h]}, v {v.shape[h]}")


def check_cu_seqlens(cu, name: str) -> List[int]:
    """``n + 1`` sequence offsets as Python ints: a sequence of ints or a 1-D integer CPU tensor (lengths
    are host facts, as flash-attention's ``max_seqlen``; a GPU tensor would need a host synchronisation),
    starting at 0 and never decreasing."""
    if isinstance(cu, torch.Tensor):
        if cu.device.type != "cpu":
            raise ValueError(f"{name} must be a Python sequence or a CPU tensor (lengths are host facts; "
                             f"a {cu.device} tensor would need a host synchronisation)")
        if cu.dim() != 1 or cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {cu.dtype} of shape {tuple(cu.shape)}")
        cu = cu.tolist()
    if isinstance(cu, (str, bytes)) or not isinstance(cu, Sequence):
        raise TypeError(f"{name} must be a sequence of ints or a 1-D integer CPU tensor, got {type(cu).__name__}")
    out = []
    for x in cu:
        if isinstance(x, (bool, torch.Tensor)):
            raise TypeError(f"{name} must hold ints, got {cu!r}")
        try:
            out.append(operator.index(x))
        except TypeError:
            raise TypeError(f"{name} must hold ints, got {cu!r}") from None
    if len(out) < 2 or out[0] != 0 or any(b < a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease (n + 1 offsets), got {out}")
    return out


def check_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, block_masks, q_block, k_block, causal):
    """``block_sparse_attention_varlen``'s arguments: packed ``q [Tq, H, D]``, ``k, v [Tk, H_kv, D]``,
    offsets ending at the token counts, ``n`` bool block masks ``[Mq_i, Nk_i]`` / ``[H or 1, Mq_i, Nk_i]``.
    Returns ``(cu_q, cu_k, q_block, k_block)`` as Python ints."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a packed [T, H, D] tensor, got {getattr(x, 'shape', type(x))}")
    q_block = check_block_size("q_block", q_block)
    k_block = q_block if k_block is None else check_block_size("k_block", k_block)
    check_flag("causal", causal)
    cq, ck = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q"), check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    n = len(cq) - 1
    if len(ck) - 1 != n:
        raise ValueError(f"cu_seqlens_q holds {n} sequences but cu_seqlens_k {len(ck) - 1}")
    if cq[-1] != q.shape[0] or ck[-1] != k.shape[0] or v.shape[0] != k.shape[0]:
        raise ValueError(f"the offsets end at {cq[-1]} / {ck[-1]} but q has {q.shape[0]} tokens, k {k.shape[0]}, "
                         f"v {v.shape[0]}")
    check_qkv(q, k, v, "[T, H, D]", empty_tokens=True)      # sequences of length 0 are fine
    _check_kv_heads(q, k, v)
    if block_masks is None:
        return cq, ck, q_block, k_block
    if isinstance(block_masks, torch.Tensor) or not isinstance(block_masks, Sequence):
        raise TypeError(f"block_masks must be a list of {n} bool tensors (one per sequence), got "
                        f"{type(block_masks).__name__}")
    if len(block_masks) != n:
        raise ValueError(f"{len(block_masks)} block masks for {n} sequences")
    H = q.shape[1]
    for i, m in enumerate(block_masks):
        mq, nk = -(-(cq[i + 1] - cq[i]) // q_block), -(-(ck[i + 1] - ck[i]) // k_block)
        if (not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() not in (2, 3)
                or tuple(m.shape[-2:]) != (mq, nk) or (m.dim() == 3 and m.shape[0] not in (1, H))):
            got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"block_masks[{i}] must be bool [..., {mq}, {nk}] (2-D, or 3-D with H={H} or 1 heads; lengths "
                             f"{cq[i + 1] - cq[i]} and {ck[i + 1] - ck[i]} in blocks of {q_block} / {k_block}), "
                             f"got {got}")
        if m.device != q.device and m.device.type != "cpu":
            raise ValueError(f"block_masks[{i}] is on {m.device} but q is on {q.device}")
    return cq, ck, q_block, k_block


def check_plan_args(block_mask, q_block, k_block, k_valid, q_valid, window_shift, key_bias=None):
    """``BlockSparsePlan.from_block_mask``'s arguments: a bool mask ``[Mq, Nk]`` or ``[B', H', Mq, Nk]``,
    block sizes (positive multiples of 16; ``k_block`` defaults to ``q_block``), and optional per-block
    tensors ``k_valid [Bv, Nk]``, ``q_valid`` / ``window_shift [Bq, Mq]`` (or 1-D) and the per-key float
    ``key_bias [Bb, Nk * k_block]`` (or 1-D) on the mask's device or the CPU, whose batch is 1 or the
    mask's (when the mask has one). A CPU ``key_bias`` is also read (eager): NaN or +inf (every output
    row that sees the key would be NaN) is refused. Returns ``(q_block, k_block)``."""
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a bool tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be bool, got {block_mask.dtype}")
    if block_mask.dim() not in (2, 4):
        raise ValueError(f"block_mask must be [B, H, Mq, Nk] or [Mq, Nk], got {tuple(block_mask.shape)}")
    q_block = check_block_size("q_block", q_block)
    k_block = q_block if k_block is None else check_block_size("k_block", k_block)
    Mq, Nk = block_mask.shape[-2:]
    Bm = block_mask.shape[0] if block_mask.dim() == 4 else 1
    if key_bias is not None and (not isinstance(key_bias, torch.Tensor) or not key_bias.dtype.is_floating_point):
        got = key_bias.dtype if isinstance(key_bias, torch.Tensor) else type(key_bias).__name__
        raise TypeError(f"key_bias must be a float tensor [B or 1, {Nk * k_block}] (natural log), got {got}")
    for name, x, n in (("k_valid", k_valid, Nk), ("q_valid", q_valid, Mq), ("window_shift", window_shift, Mq),
                       ("key_bias", key_bias, Nk * k_block)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be an int tensor [B or 1, {n}], got {type(x).__name__}")
        if x.dim() not in (1, 2) or x.shape[-1] != n or (x.dim() == 2 and x.shape[0] != 1 and Bm != 1
                                                          and x.shape[0] != Bm):
            raise ValueError(f"{name} must be [B or 1, {n}] for a block mask {tuple(block_mask.shape)}, got "
                             f"{tuple(x.shape)}")
        if x.device != block_mask.device and x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device} but the block mask on {block_mask.device}")
    if key_bias is not None and key_bias.device.type == "cpu" and not torch.compiler.is_compiling():
        # values read only where that is free (not on a GPU, not inside a compiled graph)
        bad = torch.isnan(key_bias) | (key_bias == float("inf"))
        if bool(bad.any()):
            raise ValueError(f"key_bias has {int(bad.sum())} NaN / +inf entries (first at index "
                             f"{tuple(torch.nonzero(bad)[0].tolist())}): it must be finite or -inf (a key never seen)")
    return q_block, k_block


def check_block_call(q, k, v, plan, q_block, k_block, causal) -> None:
    """``block_sparse_attention``'s arguments as given: ``q [B, H, Sq, D]``, ``k, v [B, H_kv, Sk, D]``
    (``H % H_kv == 0``), ``plan`` a `BlockSparsePlan` or a bool block mask tensor (then ``q_block`` /
    ``k_block`` positive multiples of 16; with a plan, none or the plan's), ``causal`` a bool."""
    check_qkv(q, k, v)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v have different lengths: {k.shape[2]} and {v.shape[2]} (shapes {tuple(k.shape)}, "
                         f"{tuple(v.shape)})")
    _check_kv_heads(q, k, v)
    check_flag("causal", causal)
    if isinstance(plan, torch.Tensor):
        if plan.dtype != torch.bool:
            raise TypeError(f"block mask must be bool (True = block kept), got {plan.dtype}")
        if plan.dim() not in (2, 4):
            raise ValueError(f"block mask must be [Mq, Nk] or [B or 1, H or 1, Mq, Nk], got {tuple(plan.shape)}")
        B, H = q.shape[:2]
        if plan.dim() == 4 and (plan.shape[0] not in (1, B) or plan.shape[1] not in (1, H)):
            raise ValueError(f"block mask {tuple(plan.shape)} must be [B or 1, H or 1, Mq, Nk] with q's B={B}, H={H} "
                             f"(H counts q's heads under grouped-query attention)")
        if q_block is None:
            raise ValueError("a block mask needs q_block (and k_block, default q_block): the tokens per block")
        check_block_size("q_block", q_block)
        if k_block is not None:
            check_block_size("k_block", k_block)
        return
    if not hasattr(plan, "kv_count"):
        raise TypeError(f"plan must be a BlockSparsePlan or a bool block mask tensor, got {type(plan).__name__}")
    for name, given in (("q_block", q_block), ("k_block", k_block)):
        if given is not None and given != getattr(plan, name):
            raise ValueError(f"{name}={given!r} given with a plan of {name}={getattr(plan, name)}: block sizes "
                             f"come from the plan (pass {name} only with a block mask)")


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


def _int_or_none(x) -> Optional[int]:
    """``x`` as a Python int if it is an integer (int, numpy integer; not bool, not a tensor), else None."""
    if isinstance(x, (bool, torch.Tensor)):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def validate_inputs(q, k, v, thw, config, text_len, text_mask, strict_tiles: bool = True,
                    check_values: Optional[bool] = None) -> tuple:
    """Caller mistakes → ValueError / TypeError naming the problem. Returns ``(thw, text_len)`` as
    Python ints (numpy integers are accepted).

    ``strict_tiles``: apply `check_tiles`. ``check_values``: check that ``text_mask`` is a prefix
    mask; None = only when it is on the CPU (no host synchronisation on a GPU).
    """
    check_qkv(q, k, v)
    strict_tiles = check_flag("strict_tiles", strict_tiles)
    if check_values is not None:
        check_flag("validate", check_values)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(config, SSTAConfig):
        raise TypeError(f"config must be an SSTAConfig, got {type(config).__name__}")
    ints = [_int_or_none(x) for x in thw] if isinstance(thw, Sequence) and not isinstance(thw, str) else []
    if len(ints) != 3 or any(x is None or x < 1 for x in ints):
        raise ValueError(f"thw must be three positive ints (t, h, w), got {thw!r}")
    thw, text_len_in = tuple(ints), text_len
    text_len = _int_or_none(text_len)
    if text_len is None or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len_in!r}")
    S = q.shape[2]
    t, h, w = thw
    if S != t * h * w + text_len:
        hint = ("; q looks like [B, S, H, D]: pass q.transpose(1, 2) (and k, v likewise)"
                if q.shape[1] == t * h * w + text_len else "")
        raise ValueError(
            f"sequence length S={S} does not match the grid: t*h*w + text_len = {t}*{h}*{w} + {text_len} "
            f"= {t * h * w + text_len}{hint}"
        )
    if text_mask is not None:
        if not isinstance(text_mask, torch.Tensor):
            raise TypeError(f"text_mask must be a tensor, got {type(text_mask).__name__}")
        if text_len == 0 and tuple(text_mask.shape) != (q.shape[0], 0):   # [B, 0]: no text, and its mask
            raise ValueError(f"text_mask {tuple(text_mask.shape)} given but text_len == 0")
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
    return thw, text_len


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
        raise ValueError(f"the plan is on {plan.device} but q is on {q.device}: move it with plan.to(q.device)")
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
    key_bias = getattr(plan, "key_bias", None)
    if key_bias is not None:   # length and float32 / float64: checked when the plan was made
        if key_bias.shape[0] not in (1, B):
            raise ValueError(f"plan.key_bias batch {key_bias.shape[0]} must be 1 or match q's ({B})")
        if key_bias.device != q.device:
            raise ValueError(f"plan.key_bias is on {key_bias.device} but q is on {q.device}")
        if key_bias.dtype == torch.float64 and q.dtype != torch.float64:
            raise ValueError(f"plan.key_bias is float64 but q is {q.dtype}: a float64 bias is for float64 inputs "
                             "(give a float32 one)")
    return check_scale(scale, D)


def check_scale(scale: Optional[float], head_dim: int) -> float:
    """The softmax scale to use: ``1/sqrt(head_dim)`` for None, else a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real):   # numpy floats too
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

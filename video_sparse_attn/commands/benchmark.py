"""Time `ssta_attention` (mask + plan + kernel) against dense SDPA on one shape, on any device.

Random q, k, v of ``[B, H, t*h*w + text_len, D]``; prints the block density, both times and the
speed-up, and optionally writes them as JSON. For the kernel-level sweeps on a GPU see
``scripts/benchmark_kernels.py``. Example::

    vsa-benchmark --thw 8 24 32 --text-len 100 --tile 2,4,8 --topk 8 --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional, Sequence

import torch

from ..cli import (OneLineParser, UsageError, add_ssta_arguments, load_ssta_config, non_negative_int,
                   positive_int, run_main, ssta_overrides)
from ..config import SSTAConfig

__all__ = ["add_arguments", "run", "main", "cli"]

FORMATTER = argparse.RawDescriptionHelpFormatter
BASE = SSTAConfig(tile_thw=(2, 4, 8), kernel_thw=(3, 3, 3), topk=8, caller_rules=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thw", type=positive_int, nargs=3, default=(8, 24, 32), metavar=("T", "H", "W"),
                   help="latent grid (default 8 24 32)")
    p.add_argument("--text-len", type=non_negative_int, default=100, help="text tokens after the video")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--dim", type=positive_int, default=64, help="head dim")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls (the median is reported)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_ssta_arguments(p)


def _timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> dict:
    from ..attention import ssta_attention

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r}: not a torch device (e.g. cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device!r}: CUDA is not available on this machine; use --device cpu")
    config = load_ssta_config(args.ssta_config, BASE, ssta_overrides(args))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    thw = tuple(args.thw)
    S = math.prod(thw) + args.text_len
    q, k, v = (torch.randn(args.batch, args.heads, S, args.dim, device=device, dtype=dtype) for _ in range(3))
    try:
        _, info = ssta_attention(q, k, v, thw, config, args.text_len, backend=args.backend, return_info=True)
    except ValueError as e:  # e.g. a tile longer than the grid
        raise UsageError(str(e)) from None
    sparse_ms = _timed(lambda: ssta_attention(q, k, v, thw, config, args.text_len, backend=args.backend),
                       device, args.repeats)
    dense_ms = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, args.repeats)
    result = {"thw": list(thw), "text_len": args.text_len, "batch": args.batch, "heads": args.heads,
              "dim": args.dim, "device": str(device), "dtype": str(dtype), "config": config.to_dict(),
              "density": round(float(info.density), 4), "ssta_ms": round(sparse_ms, 3),
              "dense_ms": round(dense_ms, 3), "speedup": round(dense_ms / sparse_ms, 3)}
    print(f"S={S} ({thw} + {args.text_len} text), B={args.batch} H={args.heads} D={args.dim}, {dtype}, {device}")
    print(f"block density {result['density']:.3f}; SSTA {sparse_ms:.2f} ms vs dense {dense_ms:.2f} ms "
          f"({result['speedup']:.2f}x; SSTA includes mask + plan)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=FORMATTER)
    add_arguments(p)
    return run(p.parse_args(argv))


def cli(prog: str = "vsa-benchmark") -> None:
    """Console entry point ``vsa-benchmark`` (user mistakes: one line, exit status 2)."""
    sys.exit(run_main(lambda argv: main(argv, prog), prog=prog))

"""Compile and tune the attention kernels ahead of time (servers, first denoising step without a stall).

Runs one small `ssta_attention` call with the given tile (forward and backward; q, k, v as
``[B, H, S, D]`` tensors and as diffusers' transposed views), which launches every kernel a real SSTA
call of any size launches, and the block-sparse op once, with the backend that ``--backend`` picks; the
Triton kernels' tuning picks and every compiled kernel go to disk caches, so later processes start warm.
Example (HunyuanVideo-1.5: 16 heads × 128, 384-token tiles)::

    python -m video_sparse_attn warmup --heads 16 --head-dim 128 --tile 6,8,8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import torch

from ..cli import OneLineParser, UsageError, positive_int, run_main, triple

__all__ = ["add_arguments", "run", "main", "cli"]

FORMATTER = argparse.RawDescriptionHelpFormatter


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..kernels.registry import backend_names

    p.add_argument("--heads", type=positive_int, default=16, help="attention heads (default 16)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dim (default 128)")
    p.add_argument("--tile", type=triple, default=(6, 8, 8), help="SSTA tile t,h,w (block = its volume)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="input dtype")
    p.add_argument("--seq", type=positive_int, default=None,
                   help="tokens of the block-sparse op's warm-up (any length warms every length; default 8 blocks)")
    p.add_argument("--backend", choices=backend_names(), default="auto", help="backend to warm (default auto)")
    p.add_argument("--no-backward", action="store_true", help="forward only (inference servers)")


def run(args: argparse.Namespace) -> list:
    from ..layout import block_slots
    from ..warmup import warmup

    if not torch.cuda.is_available():
        raise UsageError("warmup compiles GPU kernels: no CUDA device on this machine")
    block = block_slots(math.prod(args.tile))
    seq = args.seq or 8 * block
    try:
        seconds = warmup((1, args.heads, seq, args.head_dim, args.dtype, block), backend=args.backend,
                         backward=not args.no_backward, tile=args.tile)
    except ValueError as e:   # e.g. a backend that cannot run this head dim or dtype
        raise UsageError(str(e)) from None
    print(f"warmed {args.backend} for H={args.heads} D={args.head_dim} {args.dtype} block {block}: "
          f"{seconds[0]:.1f} s")
    return seconds


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> list:
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=FORMATTER)
    add_arguments(p)
    return run(p.parse_args(argv))


def cli(prog: str = "vsa-warmup") -> None:
    """Console entry point ``vsa-warmup``."""
    sys.exit(run_main(lambda argv: main(argv, prog), prog=prog))

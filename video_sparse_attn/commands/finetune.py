"""Fine-tune a diffusers video transformer (flow matching) with SSTA sparse attention.

Runs with one process (``vsa-finetune ...``) or many (``accelerate launch scripts/finetune.py ...``).
With no ``--model`` it trains a tiny random HunyuanVideo-1.5 on a synthetic latent dataset, on the
CPU, in seconds::

    vsa-finetune --max-train-steps 3 --output-dir /tmp/ft

A real run (latents from scripts/make_latent_dataset.py)::

    accelerate launch scripts/finetune.py --model /models/HunyuanVideo-1.5-480p_t2v \\
        --data /data/latents --mixed-precision bf16 --gradient-checkpointing \\
        --topk 32 --dense-warmup-steps 100 --sparsity-ramp-steps 400 --max-train-steps 2000 \\
        --learning-rate 1e-5 --checkpointing-steps 250 --output-dir runs/ssta-ft

Add ``--lora-rank 64`` for LoRA, ``--resume-from-checkpoint latest`` to continue a run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..cli import run_main
from ..training.args import add_arguments, build_parser

__all__ = ["add_arguments", "run", "main", "cli"]

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say; prints where the weights went and returns `train`'s result."""
    from ..training.trainer import train

    result = train(args)
    last = f"{result['losses'][-1]:.5f}" if result["losses"] else "n/a"
    print(f"finished at step {result['global_step']}, last loss {last}; weights in {result['final_dir']}")
    return result


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    return run(build_parser(prog).parse_args(argv))


def cli(prog: str = "vsa-finetune") -> None:
    """Console entry point ``vsa-finetune`` (user mistakes: one line, exit status 2)."""
    sys.exit(run_main(lambda argv: main(argv, prog), prog=prog))

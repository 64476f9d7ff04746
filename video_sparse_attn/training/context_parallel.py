"""``--cp N`` in fine-tuning: Ulysses context parallelism over all N launched processes.

The N ranks form one context-parallel group that trains on one sample at a time: every rank takes
rank 0's batch and noise, holds 1/N of the video tokens, and ends with the whole prediction and loss.
Each rank's gradients are its part of the gradient (they sum to the single-process one), while the
distributed wrapper averages them, so the loss is scaled by N before backward. The data loader
stays sharded by accelerate, so each epoch reads rank 0's share of the samples.
"""

from __future__ import annotations

import argparse
from typing import Dict

import torch

__all__ = ["setup_context_parallel", "group_batch"]


def setup_context_parallel(args: argparse.Namespace, transformer: torch.nn.Module, accelerator) -> int:
    """Enable Ulysses degree ``args.cp`` on ``transformer`` (before ``accelerator.prepare``); returns the
    degree (1: off)."""
    degree = int(getattr(args, "cp", 1) or 1)
    if degree <= 1:
        return 1
    if args.no_ssta:
        from ..cli import UsageError

        raise UsageError("--cp trains with SSTA only (the stock HunyuanVideo-1.5 processor has no "
                         "context-parallel path in diffusers 0.42.1); drop --no-ssta")
    if accelerator.num_processes != degree:
        import os

        hint = ""
        if int(os.environ.get("WORLD_SIZE", "1")) == degree and not torch.cuda.is_available():
            hint = "; on CPUs accelerate joins the launched processes only with ACCELERATE_USE_CPU=1 set"
        from ..cli import UsageError

        raise UsageError(f"--cp {degree} needs exactly {degree} processes (launched: "
                         f"{accelerator.num_processes}); data parallelism on top of context parallelism is "
                         f"not supported{hint}")
    from accelerate.utils import DistributedDataParallelKwargs

    from ..processors import enable_ulysses

    enable_ulysses(transformer, degree)
    if accelerator.ddp_handler is None:   # HunyuanVideo-1.5's last text stream feeds no output
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    return degree


def group_batch(batch: Dict[str, torch.Tensor], degree: int) -> Dict[str, torch.Tensor]:
    """Rank 0's batch on every rank of the context-parallel group (unchanged when ``degree`` is 1)."""
    if degree <= 1:
        return batch
    from accelerate.utils import broadcast

    return broadcast(batch, from_process=0)

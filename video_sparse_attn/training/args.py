"""Command-line arguments of ``scripts/finetune.py`` / ``vsa-finetune`` (also used by tests to build a run).

Every value is checked while parsing (types, ranges, choices, existing paths), so a mistake is one
line before any model is loaded; the SSTA options are those of `video_sparse_attn.cli.add_ssta_arguments`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import (OneLineParser, add_ssta_arguments, existing_dir, load_ssta_config, non_negative_int, positive_float,
                   positive_int, ssta_overrides, triple)
from ..config import SSTAConfig

__all__ = ["build_parser", "add_arguments", "parse_args", "ssta_config_from_args", "LR_SCHEDULERS"]

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
TINY_SSTA = dict(tile_thw=(1, 4, 4), kernel_thw=(1, 1, 1), topk=4)  # many tiles on the tiny model's grid


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog, description="Flow-matching fine-tuning of a diffusers video transformer with SSTA sparse attention.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The fine-tuning options, added to ``p``."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", type=existing_dir, default=None, help="local diffusers pipeline or transformer "
                   "folder (HunyuanVideo-1.5, HunyuanVideo or Wan); default: a tiny random HunyuanVideo-1.5")
    g.add_argument("--tiny-family", default="hunyuan_video15",
                   choices=["hunyuan_video15", "hunyuan_video", "wan"],
                   help="family of the tiny model built when --model is not given")
    g.add_argument("--data", type=existing_dir, default=None,
                   help="latent dataset folder (scripts/make_latent_dataset.py); "
                   "default: a small synthetic dataset written under OUTPUT_DIR/synthetic_data")
    g.add_argument("--synthetic-samples", type=positive_int, default=4,
                   help="samples in the synthetic dataset (no --data)")
    g.add_argument("--synthetic-latent-thw", type=triple, default=(2, 8, 8), metavar="T,H,W",
                   help="latent grid of the synthetic samples")
    g.add_argument("--output-dir", default="finetune-output", help="checkpoints, final weights, train log")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its checkpoints, weights and log)")
    g.add_argument("--seed", type=int, default=0, help="model init (tiny), data order and noise")
    g.add_argument("--image-tokens", type=non_negative_int, default=None,
                   help="HunyuanVideo-1.5: zero image tokens per sample (pipeline uses 729; tiny default 8)")

    g = add_ssta_arguments(p)
    g.add_argument("--no-ssta", action="store_true", help="train with the stock (dense) processors")
    g.add_argument("--dense-warmup-steps", type=non_negative_int, default=0, help="first steps run dense")
    g.add_argument("--sparsity-ramp-steps", type=non_negative_int, default=0,
                   help="steps over which topk and window shrink from dense to the target")

    g = p.add_argument_group("training")
    g.add_argument("--lora-rank", type=non_negative_int, default=0,
                   help="> 0: train a LoRA adapter instead of all weights")
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA scale numerator; default: the rank")
    g.add_argument("--lora-target-modules",
                   default="to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out",
                   help="comma-separated module names; names the model lacks are skipped")
    g.add_argument("--max-train-steps", type=positive_int, default=100, help="optimizer steps")
    g.add_argument("--train-batch-size", type=positive_int, default=1, help="samples per micro-batch and process")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                   help="autocast precision (accelerate); LoRA also stores the frozen base weights in it")
    g.add_argument("--learning-rate", type=positive_float, default=1e-5, help="AdamW learning rate")
    g.add_argument("--lr-scheduler", default="constant_with_warmup", choices=LR_SCHEDULERS,
                   help="diffusers.optimization.get_scheduler name")
    g.add_argument("--lr-warmup-steps", type=non_negative_int, default=0, help="linear learning-rate warm-up")
    g.add_argument("--adam-beta1", type=_unit_float, default=0.9, help="AdamW beta1, in [0, 1)")
    g.add_argument("--adam-beta2", type=_unit_float, default=0.999, help="AdamW beta2, in [0, 1)")
    g.add_argument("--adam-weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--adam-epsilon", type=positive_float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (<= 0: off)")
    g.add_argument("--weighting-scheme", default="logit_normal", choices=["logit_normal", "uniform", "mode"],
                   help="distribution of the sampled noise levels")
    g.add_argument("--timestep-shift", type=positive_float, default=1.0, help="flow shift applied to sampled sigmas")
    g.add_argument("--guidance-scale", type=float, default=6.0, help="HunyuanVideo: embedded guidance")
    g.add_argument("--dataloader-num-workers", type=non_negative_int, default=0, help="data loading processes")

    g = p.add_argument_group("context parallelism")
    g.add_argument("--cp", type=positive_int, default=1, metavar="N",
                   help="Ulysses context-parallel degree over all N launched processes (SSTA only)")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpointing-steps", type=positive_int, default=500, help="save_state every N steps")
    g.add_argument("--checkpoints-total-limit", type=positive_int, default=None,
                   help="keep at most this many checkpoints (oldest deleted after a new one is complete)")
    g.add_argument("--resume-from-checkpoint", default=None,
                   help="a checkpoint-<step> folder, or 'latest' (the newest complete one in --output-dir)")
    g.add_argument("--report-to", default=None, help="accelerate tracker (tensorboard, wandb, ...)")
    g.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar")


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def ssta_config_from_args(args: argparse.Namespace, tiny: bool) -> Optional[SSTAConfig]:
    """The target `SSTAConfig` of the run (None with ``--no-ssta``): ``--ssta-config`` (or the
    defaults: HunyuanVideo-1.5's, or small tiles for the tiny model), then the SSTA flags on top.
    A bad file or value raises `video_sparse_attn.cli.UsageError`."""
    if args.no_ssta:
        return None
    base = SSTAConfig(**TINY_SSTA) if tiny else SSTAConfig()
    return load_ssta_config(args.ssta_config, base, ssta_overrides(args))

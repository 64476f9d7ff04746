"""Command-line arguments of ``scripts/finetune.py`` (also used by tests to build a run)."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..config import SSTAConfig

__all__ = ["build_parser", "parse_args", "ssta_config_from_args"]


def _triple(text: str):
    parts = [int(x) for x in text.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three ints 't,h,w', got {text!r}")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Flow-matching fine-tuning of a diffusers video transformer with SSTA sparse attention.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="local diffusers pipeline or transformer folder "
                   "(HunyuanVideo-1.5, HunyuanVideo or Wan); default: a tiny random HunyuanVideo-1.5")
    g.add_argument("--tiny-family", default="hunyuan_video15",
                   choices=["hunyuan_video15", "hunyuan_video", "wan"],
                   help="family of the tiny model built when --model is not given")
    g.add_argument("--data", default=None, help="latent dataset folder (scripts/make_latent_dataset.py); "
                   "default: a small synthetic dataset written under OUTPUT_DIR/synthetic_data")
    g.add_argument("--synthetic-samples", type=int, default=4)
    g.add_argument("--synthetic-latent-thw", type=_triple, default=(2, 8, 8))
    g.add_argument("--output-dir", default="finetune-output")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image-tokens", type=int, default=None,
                   help="HunyuanVideo-1.5: zero image tokens per sample (pipeline uses 729; tiny default 8)")

    g = p.add_argument_group("sparse attention")
    g.add_argument("--no-ssta", action="store_true", help="train with the stock (dense) processors")
    g.add_argument("--ssta-config", default=None, help="SSTAConfig JSON file (overrides the flags below)")
    g.add_argument("--sparse-type", default="ssta", choices=["ssta", "sta", "block_attn", "dense"])
    g.add_argument("--tile", type=_triple, default=None, help="tile t,h,w (default 6,8,8; tiny model 1,4,4)")
    g.add_argument("--window", type=_triple, default=None,
                   help="STA window in tiles t,h,w (default 3,3,3; tiny model 1,1,1)")
    g.add_argument("--topk", type=int, default=None,
                   help="key tiles per query tile (default 64, halved for t <= 31 by the caller "
                        "rules; tiny model 4)")
    g.add_argument("--pad-type", default="zero", choices=["zero", "repeat", "mask"])
    g.add_argument("--ssta-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernels on CUDA, PyTorch reference on CPU")
    g.add_argument("--no-caller-rules", action="store_true",
                   help="use topk/tiles exactly as given (no HunyuanVideo-1.5 halving for short videos)")
    g.add_argument("--dense-warmup-steps", type=int, default=0, help="first steps run dense")
    g.add_argument("--sparsity-ramp-steps", type=int, default=0,
                   help="steps over which topk and window shrink from dense to the target")

    g = p.add_argument_group("training")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="> 0: train a LoRA adapter instead of all weights")
    g.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    g.add_argument("--lora-target-modules",
                   default="to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out",
                   help="comma-separated module names; names the model lacks are skipped")
    g.add_argument("--max-train-steps", type=int, default=100, help="optimizer steps")
    g.add_argument("--train-batch-size", type=int, default=1)
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                   help="autocast precision (accelerate); LoRA also stores the frozen base weights in it")
    g.add_argument("--learning-rate", type=float, default=1e-5)
    g.add_argument("--lr-scheduler", default="constant_with_warmup",
                   help="diffusers.optimization.get_scheduler name")
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", type=float, default=1e-4)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--weighting-scheme", default="logit_normal", choices=["logit_normal", "uniform", "mode"])
    g.add_argument("--timestep-shift", type=float, default=1.0, help="flow shift applied to sampled sigmas")
    g.add_argument("--guidance-scale", type=float, default=6.0, help="HunyuanVideo: embedded guidance")
    g.add_argument("--dataloader-num-workers", type=int, default=0)

    g = p.add_argument_group("context parallelism")
    g.add_argument("--cp", type=int, default=1, metavar="N",
                   help="Ulysses context-parallel degree over all N launched processes (SSTA only)")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpointing-steps", type=int, default=500, help="save_state every N steps")
    g.add_argument("--checkpoints-total-limit", type=int, default=None)
    g.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--report-to", default=None, help="accelerate tracker (tensorboard, wandb, ...)")
    g.add_argument("--no-progress-bar", action="store_true")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def ssta_config_from_args(args: argparse.Namespace, tiny: bool) -> Optional[SSTAConfig]:
    """The target `SSTAConfig` of the run (None with ``--no-ssta``)."""
    if args.no_ssta:
        return None
    if args.ssta_config:
        return SSTAConfig.load(args.ssta_config)
    tile = args.tile or ((1, 4, 4) if tiny else (6, 8, 8))
    window = args.window or ((1, 1, 1) if tiny else (3, 3, 3))
    topk = args.topk if args.topk is not None else (4 if tiny else 64)
    return SSTAConfig(tile_thw=tile, kernel_thw=window, topk=topk, sparse_type=args.sparse_type,
                      pad_type=args.pad_type, caller_rules=not args.no_caller_rules)

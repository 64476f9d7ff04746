"""Text-to-video with a diffusers pipeline and SSTA attention, with a timing / density report.

With ``--model`` (a local diffusers-format folder: HunyuanVideo-1.5, HunyuanVideo or Wan, picked
from its ``model_index.json``) it runs that pipeline with SSTA. Without it, it builds a tiny,
randomly initialised HunyuanVideo-1.5 pipeline offline (no download, prompt embeddings made up)
and runs the whole SSTA path on a CPU in seconds; that video is noise from random weights.

Every argument (and the ``--ssta-config`` / ``--schedule`` files) is checked before a model is
loaded; a mistake is one line naming the argument and what it accepts. Examples::

    vsa-generate                                                 # tiny offline demo, CPU
    vsa-generate --model ./HunyuanVideo-1.5-480p_t2v --prompt "a red fox in snow" \\
        --frames 121 --height 480 --width 848 --steps 50 --dense-steps 10 --output fox.mp4
    vsa-generate --model ./Wan2.1-T2V-1.3B-Diffusers --ssta-config ssta.json --compare-stock
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from typing import Optional, Sequence, Tuple

import torch

from ..cli import (OneLineParser, UsageError, add_ssta_arguments, load_ssta_config, non_negative_int,
                   positive_int, read_json, run_main, ssta_overrides)
from ..config import SSTAConfig
from ..families import FAMILIES, family_of

__all__ = ["add_arguments", "run", "main", "cli", "video_multiples"]

FORMATTER = argparse.RawDescriptionHelpFormatter
# SSTA settings of the tiny demo: 16-token tiles so that its small latent grid has many tiles.
TINY_CONFIG = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(3, 3, 3), topk=8, caller_rules=False)
PIPELINES = tuple(f.pipeline_class for f in FAMILIES.values())
TINY_DEFAULTS = dict(frames=9, height=64, width=64, steps=8)
MODEL_DEFAULTS = dict(frames=121, height=480, width=848, steps=50)
DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local diffusers pipeline folder; omitted: tiny random HunyuanVideo-1.5")
    p.add_argument("--prompt", default="A red fox walks through fresh snow at dawn, cinematic.",
                   help="text prompt (ignored by the tiny demo, which makes up embeddings)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (pipelines that take one)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="video frames, 4k+1 for the real models (default 121; tiny demo: 9, any 2k+1)")
    p.add_argument("--height", type=positive_int, default=None,
                   help="pixels, a multiple of the VAE's spatial factor x patch (default 480; tiny demo: 64)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="pixels, a multiple of the VAE's spatial factor x patch (default 848; tiny demo: 64)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default 50; tiny demo: 8)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (the stock run uses the same)")
    p.add_argument("--guidance-scale", type=float, default=None, help="pipelines that take one")
    p.add_argument("--fps", type=positive_int, default=24, help="frames per second of the written video")
    p.add_argument("--output", default="outputs/ssta_video.mp4", help="video path (.mp4)")
    # ---- context parallelism (--cp) ----
    p.add_argument("--cp", type=positive_int, default=1, metavar="N",
                   help="Ulysses context-parallel degree: launch with torchrun --nproc_per_node N (rank 0 writes)")
    p.add_argument("--report", default=None, help="JSON report path (default: OUTPUT with .json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (large models)")
    p.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles (less memory)")
    g = add_ssta_arguments(p)
    g.add_argument("--no-ssta", action="store_true", help="stock attention (baseline)")
    g.add_argument("--compare-stock", action="store_true",
                   help="also generate with stock attention (same seed), write it beside OUTPUT as "
                        "*_stock.mp4, and report the time ratio and PSNR vs stock")
    g.add_argument("--schedule", default=None, help="SSTASchedule JSON (or a bare mask-strategy JSON)")
    g.add_argument("--dense-steps", type=non_negative_int, default=None, help="first N denoising steps dense")
    g.add_argument("--dense-layers", type=non_negative_int, nargs="*", default=None,
                   help="layer indices kept dense")


def _parser(prog: Optional[str] = None) -> OneLineParser:
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=FORMATTER)
    add_arguments(p)
    return p


# ---------------------------------------------------------------------------- checks before loading
def video_multiples(model: Optional[str]) -> Tuple[int, int]:
    """(temporal, spatial) factors the frame count and the pixel sizes must respect, read from the
    model folder's ``vae/config.json`` and ``transformer/config.json`` (no weights loaded):
    frames = 1 + temporal·k, height and width multiples of spatial (VAE factor × patch size)."""
    if model is None:
        from ..testing.tiny import TINY_VAE

        patch = FAMILIES["hunyuan_video15"].tiny_config.get("patch_size", 1)
        return TINY_VAE["temporal_compression_ratio"], TINY_VAE["spatial_compression_ratio"] * patch
    vae, transformer = ({}, {})
    for name in ("vae", "transformer"):
        path = os.path.join(model, name, "config.json")
        if os.path.isfile(path):
            cfg = read_json(path, f"--model {name} config")
            vae, transformer = (cfg, transformer) if name == "vae" else (vae, cfg)
    temporal = vae.get("temporal_compression_ratio", vae.get("scale_factor_temporal", 4))
    spatial = vae.get("spatial_compression_ratio", vae.get("scale_factor_spatial", 8))
    patch = transformer.get("patch_size", 1)
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    return int(temporal), int(spatial) * int(patch or 1)


def _check_model(path: str) -> str:
    """The pipeline class named by ``path/model_index.json`` (UsageError otherwise)."""
    if not os.path.isdir(path):
        raise UsageError(f"--model {path!r}: no such folder (expected a local diffusers pipeline folder)")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise UsageError(f"--model {path!r}: no model_index.json; expected a local diffusers pipeline folder")
    cls_name = read_json(index, "--model").get("_class_name")
    if cls_name not in PIPELINES:
        print(f"warning: {cls_name} is not one of {PIPELINES}; trying it anyway", file=sys.stderr)
    return cls_name


def _check_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text!r}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve(args: argparse.Namespace) -> dict:
    """Check every argument and file; returns the values the run will use (nothing is loaded)."""
    tiny = args.model is None
    if args.model is not None:
        _check_model(args.model)
    device = _check_device(args.device)
    if args.no_ssta and args.compare_stock:
        raise UsageError("--compare-stock compares SSTA with stock attention; it cannot go with --no-ssta")
    defaults = TINY_DEFAULTS if tiny else MODEL_DEFAULTS
    used = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    temporal, spatial = video_multiples(args.model)
    if (used["frames"] - 1) % temporal:
        raise UsageError(f"--frames {used['frames']}: must be 1 + {temporal}k (e.g. "
                         f"{', '.join(str(1 + temporal * i) for i in range(4))}, ...) for this model's VAE")
    for name in ("height", "width"):
        if used[name] % spatial:
            raise UsageError(f"--{name} {used[name]}: must be a multiple of {spatial} for this model "
                             f"(nearest: {max(spatial, used[name] // spatial * spatial)})")
    if not args.output.lower().endswith(".mp4"):
        raise UsageError(f"--output {args.output!r}: the video is written as .mp4; give a path ending in .mp4")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = load_ssta_config(args.ssta_config, None if args.ssta_config else (TINY_CONFIG if tiny else SSTAConfig()),
                              ssta_overrides(args))
    schedule = _schedule(args)
    if args.dense_steps is not None and args.dense_steps > used["steps"]:
        raise UsageError(f"--dense-steps {args.dense_steps}: more than --steps {used['steps']}")
    return dict(used, tiny=tiny, device=device, dtype=dtype, config=config, schedule=schedule)


def _schedule(args):
    from ..processors import SSTASchedule

    try:
        schedule = SSTASchedule.load(args.schedule) if args.schedule else SSTASchedule()
        d = schedule.to_dict()
        if args.dense_steps is not None:
            d["dense_steps"] = args.dense_steps
        if args.dense_layers is not None:
            d["dense_layers"] = args.dense_layers
        return SSTASchedule.from_dict(d)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"--schedule {args.schedule!r}: {e}" if args.schedule else f"schedule options: {e}") from None


# ---------------------------------------------------------------------------- the run
def _load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    family_of(pipe.transformer)  # UnsupportedModelError naming the supported families otherwise
    return pipe


def _psnr(a, b) -> float:
    mse = float(((a.astype("float64") - b.astype("float64")) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ---- context parallelism (--cp): one process per GPU; every rank runs the pipeline, rank 0 writes ----
def _cp_start(args) -> int:
    """Join the launched process group when ``--cp N`` > 1; returns this process's rank (0 without)."""
    if args.cp <= 1:
        return 0
    if args.no_ssta or args.compare_stock:
        raise UsageError("--cp runs SSTA only (the stock HunyuanVideo-1.5 processor has no context-parallel "
                         "path in diffusers 0.42.1); drop --no-ssta / --compare-stock")
    if args.cpu_offload:
        raise UsageError("--cp keeps the pipeline on each rank's GPU; drop --cpu-offload")
    from ..processors import start_process_group

    return start_process_group()


def _cp_enable(args, pipe) -> None:
    """Split the transformer's sequence over the ranks (Ulysses) when ``--cp N`` > 1."""
    if args.cp > 1:
        from ..processors import enable_ulysses

        enable_ulysses(pipe, args.cp)
        print(f"context parallelism: Ulysses degree {args.cp}")
# ---- end of context parallelism ----


def run(args: argparse.Namespace) -> dict:
    """Generate as ``args`` say; returns the report (also written as JSON)."""
    from ..processors import SSTAStats, enable_ssta

    r = resolve(args)
    cp_rank = _cp_start(args)
    tiny, device, dtype, config, schedule = r["tiny"], r["device"], r["dtype"], r["config"], r["schedule"]
    frames, height, width, steps = r["frames"], r["height"], r["width"], r["steps"]

    t0 = time.perf_counter()
    if tiny:
        from ..testing.tiny import random_prompt_embeds, tiny_hunyuan_video15_pipeline

        print("No --model: building a tiny HunyuanVideo-1.5 pipeline with RANDOM weights (offline).\n"
              "The video it writes is noise from random weights; it shows the SSTA path runs end to end.")
        pipe = tiny_hunyuan_video15_pipeline(seed=args.seed, dtype=dtype)
        call = random_prompt_embeds(pipe, text_len=24, text_len_2=8, seed=args.seed, device=torch.device("cpu"))
    else:
        print(f"Loading {args.model} ...")
        pipe = _load_pipeline(args.model, dtype)
        call = {"prompt": args.prompt}
        if args.negative_prompt is not None:
            call["negative_prompt"] = args.negative_prompt
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if tiny:
        call = {k: v.to(device) for k, v in call.items()}
    if args.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    load_s = time.perf_counter() - t0
    _cp_enable(args, pipe)

    params = inspect.signature(pipe.__call__).parameters
    if args.guidance_scale is not None and "guidance_scale" in params:
        call["guidance_scale"] = args.guidance_scale

    def generate():
        """One pipeline call from the same seed; returns (frames [F, H, W, 3] in [0, 1], seconds)."""
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = pipe(**call, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                      generator=generator, output_type="np")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result.frames[0], time.perf_counter() - start

    from diffusers.utils import export_to_video

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    stock_video = stock_s = stock_path = None
    if args.compare_stock:
        print("Stock attention first (--compare-stock) ...")
        stock_video, stock_s = generate()
        stock_path = os.path.splitext(args.output)[0] + "_stock.mp4"
        export_to_video(list(stock_video), stock_path, fps=args.fps)

    runtime = None
    if not args.no_ssta:
        runtime = enable_ssta(pipe, config, schedule, backend=args.backend, stats=SSTAStats(time=True))
        print(f"SSTA on {type(pipe.transformer).__name__}: {config}\n  schedule: {schedule.to_json()}")
    else:
        print("SSTA off: stock attention processors")
    video, gen_s = generate()
    if cp_rank:   # --cp: rank 0 writes the video and the report
        return {}
    export_to_video(list(video), args.output, fps=args.fps)

    report = {
        "model": args.model or "tiny random HunyuanVideo-1.5 (offline)",
        "transformer": type(pipe.transformer).__name__, "device": str(device), "dtype": str(dtype),
        "frames": int(video.shape[0]), "height": int(video.shape[1]), "width": int(video.shape[2]),
        "steps": steps, "seed": args.seed, "backend": args.backend,
        "ssta": None if args.no_ssta else {"config": config.to_dict(), "schedule": schedule.to_dict()},
        "load_seconds": round(load_s, 3), "generate_seconds": round(gen_s, 3), "output": args.output,
    }
    print(f"\nGenerated {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]} in {gen_s:.2f} s "
          f"(load {load_s:.2f} s) -> {args.output}")
    if stock_video is not None:
        psnr = _psnr(video, stock_video)
        report.update(stock_output=stock_path, stock_generate_seconds=round(stock_s, 3),
                      speedup_vs_stock=round(stock_s / gen_s, 3), psnr_vs_stock_db=round(psnr, 2))
        print(f"stock attention: {stock_s:.2f} s -> {stock_path}; SSTA speed-up {stock_s / gen_s:.2f}x, "
              f"PSNR vs stock {psnr:.2f} dB")
    if runtime is not None:
        summary = runtime.stats.summary()
        report["latent_thw"] = runtime.thw
        report["attention"] = {k: summary[k] for k in ("calls", "mean_density", "attention_seconds")}
        report["attention"]["per_step"] = {str(k): v for k, v in summary["per_step"].items()}
        print(f"latent grid (t, h, w) = {runtime.thw}")
        print(runtime.stats.format())
    if tiny:
        print("Reminder: random weights, so the video is noise, and at this toy size attention is a small "
              "part of the time (SSTA's speed-up shows on a GPU at video sizes). "
              "Pass --model PATH for a real model.")
    report_path = args.report or os.path.splitext(args.output)[0] + ".json"
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"report: {report_path}")
    return report


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    return run(_parser(prog).parse_args(argv))


def cli(prog: str = "vsa-generate") -> None:
    """Console entry point ``vsa-generate`` (user mistakes: one line, exit status 2)."""
    sys.exit(run_main(lambda argv: main(argv, prog), prog=prog))

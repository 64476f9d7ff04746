#!/usr/bin/env python
"""Text-to-video with a diffusers pipeline and SSTA attention, with a timing / density report.

With ``--model`` (a local diffusers-format folder: HunyuanVideo-1.5, HunyuanVideo or Wan, picked
from its ``model_index.json``) it runs that pipeline with SSTA. Without it, it builds a tiny,
randomly initialised HunyuanVideo-1.5 pipeline offline (no download, prompt embeddings made up)
and runs the whole SSTA path on a CPU in seconds; that video is noise from random weights.

Examples::

    python scripts/generate.py                                   # tiny offline demo, CPU
    python scripts/generate.py --model ./HunyuanVideo-1.5-480p_t2v --prompt "a red fox in snow" \\
        --frames 121 --height 480 --width 848 --steps 50 --dense-steps 10 --output fox.mp4
    python scripts/generate.py --model ./Wan2.1-T2V-1.3B-Diffusers --config ssta.json --compare-stock
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time

import torch

from video_sparse_attn import SSTAConfig
from video_sparse_attn.families import FAMILIES, family_of
from video_sparse_attn.processors import SSTASchedule, SSTAStats, enable_ssta

# SSTA settings of the tiny demo: 16-token tiles so that its small latent grid has many tiles.
TINY_CONFIG = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(3, 3, 3), topk=8, caller_rules=False)
PIPELINES = tuple(f.pipeline_class for f in FAMILIES.values())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="local diffusers pipeline folder; omitted: tiny random HunyuanVideo-1.5")
    p.add_argument("--prompt", default="A red fox walks through fresh snow at dawn, cinematic.")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--frames", type=int, default=None, help="default 121 (tiny demo: 9)")
    p.add_argument("--height", type=int, default=None, help="default 480 (tiny demo: 64)")
    p.add_argument("--width", type=int, default=None, help="default 848 (tiny demo: 64)")
    p.add_argument("--steps", type=int, default=None, help="default 50 (tiny demo: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None, help="pipelines that take one")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--output", default="outputs/ssta_video.mp4")
    p.add_argument("--report", default=None, help="JSON report path (default: OUTPUT with .json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (large models)")
    p.add_argument("--vae-tiling", action="store_true")
    g = p.add_argument_group("SSTA")
    g.add_argument("--no-ssta", action="store_true", help="stock attention (baseline)")
    g.add_argument("--compare-stock", action="store_true",
                   help="also generate with stock attention (same seed): time ratio and PSNR vs stock")
    g.add_argument("--config", help="SSTAConfig JSON (or .safetensors with SSTA metadata)")
    g.add_argument("--schedule", help="SSTASchedule JSON (or a bare mask-strategy JSON)")
    g.add_argument("--dense-steps", type=int, default=None, help="first N denoising steps dense")
    g.add_argument("--dense-layers", type=int, nargs="*", default=None, help="layer indices kept dense")
    g.add_argument("--sparse-type", choices=("ssta", "sta", "block_attn", "dense"))
    g.add_argument("--topk", type=int)
    g.add_argument("--tile", type=int, nargs=3, metavar=("T", "H", "W"))
    g.add_argument("--kernel", type=int, nargs=3, metavar=("T", "H", "W"), help="STA window in tiles")
    g.add_argument("--pad-type", choices=("zero", "repeat", "mask"))
    g.add_argument("--sampling-type", choices=("importance", "similarity"))
    g.add_argument("--no-caller-rules", action="store_true", help="no HunyuanVideo-1.5 topk/tile rules")
    g.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    return p.parse_args(argv)


def build_config(args, tiny: bool) -> SSTAConfig:
    config = SSTAConfig.load(args.config) if args.config else (TINY_CONFIG if tiny else SSTAConfig())
    given = {
        "sparse_type": args.sparse_type, "topk": args.topk, "pad_type": args.pad_type,
        "sampling_type": args.sampling_type, "tile_thw": tuple(args.tile) if args.tile else None,
        "kernel_thw": tuple(args.kernel) if args.kernel else None,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if args.no_caller_rules:
        changes["caller_rules"] = False
    return config.replace(**changes) if changes else config


def build_schedule(args) -> SSTASchedule:
    schedule = SSTASchedule.load(args.schedule) if args.schedule else SSTASchedule()
    d = schedule.to_dict()
    if args.dense_steps is not None:
        d["dense_steps"] = args.dense_steps
    if args.dense_layers is not None:
        d["dense_layers"] = args.dense_layers
    return SSTASchedule.from_dict(d)


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise SystemExit(f"--model {path!r}: no model_index.json; expected a local diffusers pipeline folder")
    with open(index) as f:
        cls_name = json.load(f).get("_class_name")
    if cls_name not in PIPELINES:
        print(f"warning: {cls_name} is not one of {PIPELINES}; trying it anyway", file=sys.stderr)
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    family_of(pipe.transformer)  # UnsupportedModelError naming the supported families otherwise
    return pipe


def main(argv=None) -> dict:
    args = parse_args(argv)
    tiny = args.model is None
    device = torch.device(args.device)
    default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    frames = args.frames or (9 if tiny else 121)
    height = args.height or (64 if tiny else 480)
    width = args.width or (64 if tiny else 848)
    steps = args.steps or (8 if tiny else 50)

    t0 = time.perf_counter()
    if tiny:
        from video_sparse_attn.testing import random_prompt_embeds, tiny_hunyuan_video15_pipeline

        print("No --model: building a tiny HunyuanVideo-1.5 pipeline with RANDOM weights (offline).\n"
              "The video it writes is noise from random weights; it shows the SSTA path runs end to end.")
        pipe = tiny_hunyuan_video15_pipeline(seed=args.seed, dtype=dtype)
        call = random_prompt_embeds(pipe, text_len=24, text_len_2=8, seed=args.seed,
                                    device=torch.device("cpu"))
    else:
        print(f"Loading {args.model} ...")
        pipe = load_pipeline(args.model, dtype)
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

    stock_video = stock_s = None
    if args.compare_stock and not args.no_ssta:
        print("Stock attention first (--compare-stock) ...")
        stock_video, stock_s = generate()

    config, schedule, runtime = build_config(args, tiny), build_schedule(args), None
    if not args.no_ssta:
        runtime = enable_ssta(pipe, config, schedule, backend=args.backend, stats=SSTAStats(time=True))
        print(f"SSTA on {type(pipe.transformer).__name__}: {config}\n  schedule: {schedule.to_json()}")
    else:
        print("SSTA off: stock attention processors")
    video, gen_s = generate()

    from diffusers.utils import export_to_video

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    export_to_video(list(video), args.output, fps=args.fps)

    report = {
        "model": args.model or "tiny random HunyuanVideo-1.5 (offline)",
        "transformer": type(pipe.transformer).__name__, "device": str(device), "dtype": str(dtype),
        "frames": frames, "height": height, "width": width, "steps": steps, "seed": args.seed,
        "ssta": None if args.no_ssta else {"config": config.to_dict(), "schedule": schedule.to_dict()},
        "load_seconds": round(load_s, 3), "generate_seconds": round(gen_s, 3), "output": args.output,
    }
    print(f"\nGenerated {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]} in {gen_s:.2f} s "
          f"(load {load_s:.2f} s) -> {args.output}")
    if stock_video is not None:
        mse = float(((video.astype("float64") - stock_video.astype("float64")) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
        report["stock_generate_seconds"] = round(stock_s, 3)
        report["speedup_vs_stock"] = round(stock_s / gen_s, 3)
        report["psnr_vs_stock_db"] = round(psnr, 2)
        print(f"stock attention: {stock_s:.2f} s -> SSTA speed-up {stock_s / gen_s:.2f}x, "
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


if __name__ == "__main__":
    main()

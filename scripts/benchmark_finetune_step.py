#!/usr/bin/env python
"""Time one fine-tuning step (forward + backward + AdamW) of a HunyuanVideo-1.5-sized transformer
with its stock processors vs SSTA, on one GPU, random weights.

Default: 2 double-stream blocks (hidden 2048 = 16 heads × 128), bf16 autocast over fp32 weights
(as ``scripts/finetune.py --mixed-precision bf16`` runs), a 480p/121-frame latent grid
(31, 30, 53) = 49,290 video tokens plus 1,000 + 256 + 729 = 1,985 text/image tokens::

    python scripts/benchmark_finetune_step.py --layers 2 --steps 3

Modes: ``stock`` (the model's own processors), ``ssta`` (backend ``auto``) and ``ssta:NAME`` (an explicit
kernel backend, e.g. ``ssta:triton``, ``ssta:fa4``; skipped when that backend is not importable).
Prints per-mode median step time, peak memory and (SSTA) mean block density; writes JSON to
``--json`` when given.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from video_sparse_attn import SSTAConfig
from video_sparse_attn.training.flow_matching import add_noise, flow_matching_loss
from video_sparse_attn.training.models import transformer_inputs
from video_sparse_attn.training.sparsity import set_sparse_attention


def _triple(text):
    return tuple(int(x) for x in text.split(","))


def build(args, device):
    from diffusers import HunyuanVideo15Transformer3DModel

    with torch.device(device):
        torch.manual_seed(0)
        model = HunyuanVideo15Transformer3DModel(
            num_layers=args.layers, num_refiner_layers=args.refiner_layers, task_type="t2v")
    return model.to(device)


def batch_for(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    t, h, w = args.thw
    def mask(n, valid):
        return (torch.arange(n) < valid).long()[None].to(device)
    return {"latents": torch.randn(1, 32, t, h, w, generator=g).to(device),
            "prompt_embeds": torch.randn(1, args.text_len, 3584, generator=g).to(device),
            "prompt_mask": mask(args.text_len, args.text_valid),
            "prompt_embeds_2": torch.randn(1, args.text_len_2, 1472, generator=g).to(device),
            "prompt_mask_2": mask(args.text_len_2, args.text_valid_2)}


def step(model, opt, batch, args, i):
    gen = torch.Generator().manual_seed(1000 + i)  # not 0: the batch latents were drawn with seed 0
    sigmas = torch.tensor([0.6])
    noisy, target = add_noise(batch["latents"], sigmas, gen)
    timesteps = sigmas.to(noisy.device) * 1000
    kwargs = transformer_inputs(model, batch, noisy, timesteps, image_tokens=args.image_tokens)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model(**kwargs)[0]
    loss = flow_matching_loss(pred, target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def run_mode(model, batch, args, config, backend):
    set_sparse_attention(model, config, backend)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(model, opt, batch, args, i)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    density = None
    if config is not None:
        from video_sparse_attn.processors import enable_ssta

        runtime = enable_ssta(model, config, backend=backend, stats=True)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            t600 = torch.tensor([600.0], device=batch["latents"].device)
            kw = transformer_inputs(model, batch, batch["latents"], t600, image_tokens=args.image_tokens)
            model(**kw)
        density = runtime.stats.summary()["mean_density"]
    del opt
    return {"median_s": statistics.median(times), "times_s": times, "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "density": density}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--refiner-layers", type=int, default=1)
    p.add_argument("--thw", type=_triple, default=(31, 30, 53))
    p.add_argument("--text-len", type=int, default=1000)
    p.add_argument("--text-valid", type=int, default=120)
    p.add_argument("--text-len-2", type=int, default=256)
    p.add_argument("--text-valid-2", type=int, default=40)
    p.add_argument("--image-tokens", type=int, default=729)
    p.add_argument("--topk", type=int, default=64, help="before the caller rules (halved for t <= 31)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--modes", default="stock,ssta:triton,ssta:fa4", help="comma-separated: stock, ssta, ssta:NAME")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    device = torch.device("cuda")
    model = build(args, device).train()
    batch = batch_for(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    t, h, w = args.thw
    print(f"{torch.cuda.get_device_name()}: {args.layers} blocks, {n_params / 1e6:.0f}M params, video tokens "
          f"{t * h * w} ({t},{h},{w}), text+image tokens "
          f"{args.text_len + args.text_len_2 + args.image_tokens}")
    from video_sparse_attn.kernels.registry import BACKENDS

    results = {}
    for mode in args.modes.split(","):
        kind, _, backend = mode.partition(":")
        if kind not in ("stock", "ssta") or (backend and backend not in BACKENDS):
            sys.exit(f"unknown mode {mode!r}; expected stock, ssta or ssta:<one of {sorted(BACKENDS)}>")
        if backend and BACKENDS[backend].importable() is not None:
            print(f"{mode}: skipped ({BACKENDS[backend].importable()})")
            continue
        config = None if kind == "stock" else SSTAConfig(topk=args.topk)
        results[mode] = r = run_mode(model, batch, args, config, backend or "auto")
        dens = f", density {r['density']:.3f}" if r["density"] is not None else ""
        print(f"{mode:>6}: step {r['median_s'] * 1e3:8.1f} ms (median of {args.steps}; "
              f"{', '.join(f'{x * 1e3:.1f}' for x in r['times_s'])}), peak {r['peak_gib']:.1f} GiB{dens}, "
              f"losses {', '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
    for mode, r in results.items():
        if "stock" in results and mode != "stock":
            print(f"speed-up per step, {mode}: {results['stock']['median_s'] / r['median_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""One HunyuanVideo-1.5-sized double-stream block: stock processor vs SSTA, forward and forward+backward.

Default shape: hidden 2048 = 16 heads x 128, MLP ratio 4, random weights, bf16, latent grid
thw = (31, 45, 80) (720p, 121 frames: 111,600 video tokens) + 1,985 text tokens of which 1,200
are valid. Modes (``--modes``):

- ``stock``: diffusers' `HunyuanVideo15AttnProcessor2_0` (builds a dense S x S boolean mask);
- ``sdpa_nomask``: same projections, ``F.scaled_dot_product_attention`` with no mask (a dense speed
  reference: ignores text padding, so it is not the stock result);
- ``cudnn_valid``: the exact dense baseline: cuDNN SDPA over the valid tokens only (video + valid
  text; the invalid text rows are dropped, batch 1) — exact attention, and the fastest dense;
- ``ssta_dense``: `SSTAAttnProcessor` keeping every block (exact dense attention, our kernels);
- ``ssta``: `SSTAAttnProcessor` with the released HunyuanVideo-1.5 settings (``SSTAConfig()``;
  caller rules give topk 32 at t = 31).

Prints ms per block call, speed-ups over ``stock``, peak memory, SSTA density and the relative L2
error of the block's video output vs ``stock``; ``--csv`` appends the rows to a file. Out-of-memory
is reported as such.

    python scripts/benchmark_transformer.py                     # H100, ~1-2 min
    python scripts/benchmark_transformer.py --device cpu --thw 2 8 8 --text-len 40 --valid 20 \\
        --hidden 128 --heads 2 --tile 1 4 4 --dtype float32    # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import time

import torch
import torch.nn.functional as F


from video_sparse_attn import SSTAConfig
from video_sparse_attn.families import FAMILIES
from video_sparse_attn.kernels.registry import backend_names
from video_sparse_attn.processors import (SSTAAttnProcessor, SSTARuntime,
                                          SSTAStats, bind_runtime)

MODES = ("stock", "sdpa_nomask", "cudnn_valid", "ssta_dense", "ssta")


class SDPANoMaskProcessor(SSTAAttnProcessor):
    """HunyuanVideo-1.5 projections with plain dense SDPA and no mask (speed reference only)."""

    def attend(self, attn, query, key, value, text_len=0, text_mask=None):
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)


class CuDNNValidTokensProcessor(SSTAAttnProcessor):
    """Exact dense attention at the speed of the best dense kernel: cuDNN SDPA over the valid tokens
    (video + valid text), batch 1; invalid text rows get zeros (the stock path's values for them are
    not used by the model's video output)."""

    def attend(self, attn, query, key, value, text_len=0, text_mask=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if query.shape[0] != 1:
            raise ValueError("cudnn_valid runs batch 1")
        n = query.shape[1] - text_len + (int(text_mask.sum()) if text_mask is not None else text_len)
        q, k, v = (x[:, :n].transpose(1, 2) for x in (query, key, value))
        backends = [SDPBackend.CUDNN_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return torch.cat([out, out.new_zeros(1, query.shape[1] - n, *out.shape[2:])], dim=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--thw", type=int, nargs=3, default=(31, 45, 80))
    p.add_argument("--text-len", type=int, default=1985)
    p.add_argument("--valid", type=int, default=1200, help="valid text tokens (a prefix)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--config", help="SSTAConfig JSON for the 'ssta' mode (default: released values)")
    p.add_argument("--topk", type=int)
    p.add_argument("--tile", type=int, nargs=3)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=backend_names(), default="auto",
                   help="attention backend of the SSTA modes (auto: fastest available)")
    p.add_argument("--compile", action="store_true",
                   help="also time every mode with the block under torch.compile (rows 'MODE+compile')")
    p.add_argument("--csv", help="append result rows to this CSV")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters) -> float:
    """Mean milliseconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv=None):
    args = parse_args(argv)
    from diffusers.models.transformers.transformer_hunyuan_video15 import (HunyuanVideo15AttnProcessor2_0,
                                                                           HunyuanVideo15RotaryPosEmbed,
                                                                           HunyuanVideo15TransformerBlock)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    head_dim = args.hidden // args.heads
    t, h, w = args.thw
    n_video, L = t * h * w, args.text_len
    block = HunyuanVideo15TransformerBlock(args.heads, head_dim, mlp_ratio=4.0).to(device, dtype)
    rope_dims = (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)  # (16, 56, 56) at head dim 128
    rope = HunyuanVideo15RotaryPosEmbed(1, 1, list(rope_dims))
    freqs = rope(torch.empty(1, 1, t, h, w, device=device))
    hs = torch.randn(1, n_video, args.hidden, device=device, dtype=dtype)
    ehs = torch.randn(1, L, args.hidden, device=device, dtype=dtype)
    temb = torch.randn(1, args.hidden, device=device, dtype=dtype)
    mask = torch.zeros(1, L, dtype=torch.bool, device=device)
    mask[:, : args.valid] = True

    config = SSTAConfig.load(args.config) if args.config else SSTAConfig()
    if args.topk:
        config = config.replace(topk=args.topk)
    if args.tile:
        config = config.replace(tile_thw=tuple(args.tile))
    family = FAMILIES["hunyuan_video15"]
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"thw {tuple(args.thw)} ({n_video} video + {L} text tokens, {args.valid} valid), "
          f"hidden {args.hidden} = {args.heads} x {head_dim}")
    print(f"ssta config at this grid: {config.for_thw(tuple(args.thw))}")

    def processor_for(mode):
        if mode == "stock":
            return HunyuanVideo15AttnProcessor2_0(), None
        stats = SSTAStats(time=False)
        runtime = SSTARuntime(family, (1, 1, 1), stats=stats)
        runtime.thw = tuple(args.thw)
        bind_runtime(block.attn, runtime)
        if mode == "sdpa_nomask":
            return SDPANoMaskProcessor(config, backend=args.backend), stats
        if mode == "cudnn_valid":
            return CuDNNValidTokensProcessor(config, backend=args.backend), stats
        if mode == "ssta_dense":
            dense = config.replace(sparse_type="dense", pad_type="mask")
            return SSTAAttnProcessor(dense, backend=args.backend), stats
        return SSTAAttnProcessor(config, backend=args.backend), stats

    grads = (torch.randn_like(hs), torch.randn_like(ehs))
    rows, ref = [], None
    runs = [(m, False) for m in args.modes] + ([(m, True) for m in args.modes] if args.compile else [])
    for mode, compiled in runs:
        proc, stats = processor_for(mode)
        block.attn.set_processor(proc)
        torch._dynamo.reset()
        run_block = torch.compile(block) if compiled else block
        if compiled:
            mode = mode + "+compile"
        row = {"mode": mode, "thw": "x".join(map(str, args.thw)), "text": L, "valid": args.valid,
               "dtype": args.dtype, "device": str(device)}

        def fwd():
            with torch.no_grad():
                return run_block(hs, ehs, temb, mask, freqs)

        def fwd_bwd():
            block.zero_grad(set_to_none=True)
            x, e = hs.detach().requires_grad_(True), ehs.detach().requires_grad_(True)
            torch.autograd.backward(run_block(x, e, temb, mask, freqs), grads)

        for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            if name == "fwd_bwd" and args.no_backward:
                continue
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                row[f"{name}_ms"] = round(timed(fn, device, args.warmup, args.iters), 3)
                if device.type == "cuda":
                    row[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except torch.OutOfMemoryError as e:
                row[f"{name}_ms"] = "OOM"
                print(f"  {mode} {name}: out of memory ({str(e).splitlines()[0]})")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            out = fwd()[0].float()
            if mode == "stock":
                ref = out
            elif ref is not None:
                row["rel_l2_vs_stock"] = f"{float((out - ref).norm() / ref.norm()):.2e}"
            del out
        except torch.OutOfMemoryError:
            pass
        if stats is not None and stats.records:
            row["density"] = round(float(stats.records[-1].density), 4)
        rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("thw", "text", "valid", "dtype", "device")}
        print("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    base = next((r for r in rows if r["mode"] == "stock"), None)
    exact = next((r for r in rows if r["mode"] == "cudnn_valid"), None)
    print(f"\n{'mode':<12} {'fwd ms':>10} {'fwd+bwd ms':>11} {'fwd x':>7} {'fwd+bwd x':>10} "
          f"{'fwd x ex':>9} {'f+b x ex':>9} {'density':>8} {'peak GiB':>9}")

    def ratio(ref, row, key):
        a, b = (ref or {}).get(key), row.get(key)
        return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"

    for r in rows:
        r["fwd_speedup_vs_stock"], r["fwd_bwd_speedup_vs_stock"] = (ratio(base, r, "fwd_ms"),
                                                                    ratio(base, r, "fwd_bwd_ms"))
        r["fwd_speedup_vs_exact_dense"], r["fwd_bwd_speedup_vs_exact_dense"] = (ratio(exact, r, "fwd_ms"),
                                                                                ratio(exact, r, "fwd_bwd_ms"))
        peak = r.get("fwd_bwd_peak_gib", r.get("fwd_peak_gib", "-"))
        print(f"{r['mode']:<12} {r.get('fwd_ms', '-')!s:>10} {r.get('fwd_bwd_ms', '-')!s:>11} "
              f"{r['fwd_speedup_vs_stock']:>7} {r['fwd_bwd_speedup_vs_stock']:>10} "
              f"{r['fwd_speedup_vs_exact_dense']:>9} {r['fwd_bwd_speedup_vs_exact_dense']:>9} "
              f"{r.get('density', '-')!s:>8} {peak!s:>9}")
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()

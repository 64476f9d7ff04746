#!/usr/bin/env python
"""Where the time of one `ssta_attention` forward (``--backward``: forward + backward) goes at 720p/121f
(the released config, padding-free), per backend: wall time, the host time to enqueue one call, the
GPU time of its kernels and the GPU idle time between them, and the kernels by total time
(torch.profiler).

    PYTHONPATH=$PWD python scripts/profile_ssta.py [--backends triton fa4] [--backward] [--out DIR]

Needs CUDA. The call's GPU time is the sum of its kernels' durations; idle = wall − GPU time (the GPU
waiting for the host to enqueue the next kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def profile_backend(p, backend: str, backward: bool = False, reps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    from video_sparse_attn import ssta_attention
    from ssta720p import TEXT, THW

    q, k, v = (t.detach().requires_grad_(backward) for t in (p.q, p.k, p.v))
    grad = torch.randn_like(q) if backward else None

    def call():
        out = ssta_attention(q, k, v, THW, p.cfg, TEXT, p.text_mask, backend=backend)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)
        return out

    with torch.set_grad_enabled(backward):
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        wall = float(do_bench(call, warmup=10, rep=200, return_mode="median"))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        host = (time.perf_counter() - t0) * 1e3 / reps          # enqueue time per call (the GPU lags behind)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
            torch.cuda.synchronize()
    kernels = {}
    n_launch = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            name = e.name[:80]
            t, c = kernels.get(name, (0.0, 0))
            kernels[name] = (t + e.device_time_total / 1e3 / reps, c + 1)
            n_launch += 1
    gpu = sum(t for t, _ in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {"backend": backend, "backward": backward, "wall_ms": wall, "host_enqueue_ms": host, "gpu_ms": gpu,
            "idle_ms": wall - gpu, "launches_per_call": n_launch / reps,
            "kernels": [{"name": n, "ms": t, "per_call": c / reps} for n, (t, c) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["triton", "fa4"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--out", default=None, help="write profile.json here")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--backward", action="store_true", help="profile forward + backward")
    args = ap.parse_args()
    from video_sparse_attn.kernels.registry import BACKENDS

    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backends {unknown}; known: {sorted(BACKENDS)}")
    if not torch.cuda.is_available():
        sys.exit("profile_ssta.py needs CUDA")
    import ssta720p

    p = ssta720p.build(heads=args.heads)
    rows = []
    for be in args.backends:
        if BACKENDS[be].importable() is not None:
            print(f"{be}: not importable, skipped")
            continue
        r = profile_backend(p, be, args.backward)
        rows.append(r)
        mode = " fwd+bwd" if args.backward else ""
        print(f"\n{be}{mode}: wall {r['wall_ms']:.2f} ms, host enqueue {r['host_enqueue_ms']:.2f} ms/call, "
              f"GPU kernels {r['gpu_ms']:.2f} ms, GPU idle {r['idle_ms']:.2f} ms, "
              f"{r['launches_per_call']:.0f} kernels per call")
        print(f"  {'kernel':80s} {'ms':>7s} {'n':>4s}")
        for k in r["kernels"][:args.top]:
            print(f"  {k['name']:80s} {k['ms']:7.3f} {k['per_call']:4.0f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

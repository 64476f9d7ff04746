#!/usr/bin/env python
"""One HunyuanVideo-1.5 double-stream block with SSTA at Ulysses degree 1 vs N (under torchrun).

Same block, shapes and SSTA settings as `benchmark_transformer.py` (720p / 121 frames by default).
Degree 1 runs on rank 0 alone; degree N splits the video tokens (and rotary tables) into N equal
shards, keeps the text whole, and runs the block on every rank through the package's Ulysses path.
Prints ms per block call (forward, forward+backward), the all-to-all share of it (CUDA events around
each video all-to-all exchange), and the relative L2 error of the gathered degree-N output vs degree 1.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc_per_node 2 \\
        scripts/benchmark_context_parallel.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_transformer import parse_args, timed

from video_sparse_attn import SSTAConfig
from video_sparse_attn.families import FAMILIES
from video_sparse_attn.processors import (SSTAAttnProcessor, SSTARuntime,
                                          bind_runtime)
from video_sparse_attn.processors import collectives


class ExchangeTimer:
    """Wraps `collectives._exchange` (every all-to-all of the Ulysses path, forward and backward) with
    CUDA events (wall clock on CPU); ``ms()`` returns and clears the summed time."""

    def __init__(self, cuda: bool):
        self.cuda, self.events, self.on, self.cpu_ms = cuda, [], False, 0.0
        self._inner = collectives._exchange

    def __call__(self, x, group):
        if not self.on:
            return self._inner(x, group)
        if not self.cuda:
            t0 = time.perf_counter()
            out = self._inner(x, group)
            self.cpu_ms += (time.perf_counter() - t0) * 1e3
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self._inner(x, group)
        end.record()
        self.events.append((start, end))
        return out

    def ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in self.events) + self.cpu_ms
        self.events, self.cpu_ms = [], 0.0
        return total


def ulysses_config(world: int, device: torch.device):
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (1, world), mesh_dim_names=("ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    config.setup(dist.get_rank(), world, device, mesh=mesh)
    return config


def main():
    args = parse_args([a for a in sys.argv[1:]])
    from diffusers.models.transformers.transformer_hunyuan_video15 import (HunyuanVideo15RotaryPosEmbed,
                                                                           HunyuanVideo15TransformerBlock)

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    head_dim = args.hidden // args.heads
    t, h, w = args.thw
    n, L = t * h * w, args.text_len
    if n % world:
        raise SystemExit(f"{n} video tokens do not split into {world} equal shards")
    block = HunyuanVideo15TransformerBlock(args.heads, head_dim, mlp_ratio=4.0).to(device, dtype)
    rope = HunyuanVideo15RotaryPosEmbed(1, 1, [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16])
    freqs = rope(torch.empty(1, 1, t, h, w, device=device))
    hs = torch.randn(1, n, args.hidden, device=device, dtype=dtype)
    ehs = torch.randn(1, L, args.hidden, device=device, dtype=dtype)
    temb = torch.randn(1, args.hidden, device=device, dtype=dtype)
    mask = torch.zeros(1, L, dtype=torch.bool, device=device)
    mask[:, : args.valid] = True
    grads = (torch.randn_like(hs), torch.randn_like(ehs))
    config = SSTAConfig.load(args.config) if args.config else SSTAConfig()
    if args.topk:
        config = config.replace(topk=args.topk)
    if args.tile:
        config = config.replace(tile_thw=tuple(args.tile))
    runtime = SSTARuntime(FAMILIES["hunyuan_video15"], (1, 1, 1))
    runtime.thw = tuple(args.thw)
    bind_runtime(block.attn, runtime)
    timer = ExchangeTimer(cuda)
    collectives._exchange = timer

    def measure(x, e, f, g):
        def fwd():
            with torch.no_grad():
                return block(x, e, temb, mask, f)

        def fwd_bwd():
            block.zero_grad(set_to_none=True)
            xx, ee = x.detach().requires_grad_(True), e.detach().requires_grad_(True)
            torch.autograd.backward(block(xx, ee, temb, mask, f), g)

        row = {}
        for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            if name == "fwd_bwd" and args.no_backward:
                continue
            for _ in range(args.warmup):
                fn()
            timer.ms()
            timer.on = True
            row[name] = timed(fn, device, 0, args.iters)
            timer.on = False
            row[name + "_a2a"] = timer.ms() / args.iters
        return row, fwd()

    rows = {}
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"{world} x {name}, {dtype}, thw {tuple(args.thw)} ({n} video + {L} text tokens), hidden "
              f"{args.hidden} = {args.heads} x {head_dim}\n{config.for_thw(tuple(args.thw))}")
        block.attn.set_processor(SSTAAttnProcessor(config, backend=args.backend))
        rows[1], ref = measure(hs, ehs, freqs, grads)
    dist.barrier()

    proc = SSTAAttnProcessor(config, backend=args.backend)
    proc._parallel_config = ulysses_config(world, device)
    block.attn.set_processor(proc)
    shard = slice(rank * n // world, (rank + 1) * n // world)
    rows[world], out = measure(hs[:, shard], ehs, tuple(f[shard] for f in freqs),
                               (grads[0][:, shard], grads[1]))
    video = [torch.empty_like(out[0]) for _ in range(world)]
    dist.all_gather(video, out[0].contiguous())
    if rank == 0:
        def rel(a, b):
            return float((a.float() - b.float()).norm() / b.float().norm())

        err_video, err_text = rel(torch.cat(video, dim=1), ref[0]), rel(out[1], ref[1])
        print(f"\n{'degree':>6} | {'fwd ms':>9} {'a2a ms':>8} {'a2a %':>6} | {'f+b ms':>9} {'a2a ms':>8} "
              f"{'a2a %':>6} | {'speed-up':>8}")
        for d, r in rows.items():
            def cell(k):
                if not r.get(k):
                    return f"{'-':>9} {'-':>8} {'-':>6}"
                return f"{r[k]:9.1f} {r[k + '_a2a']:8.1f} {100 * r[k + '_a2a'] / r[k]:6.1f}"
            key = "fwd_bwd" if r.get("fwd_bwd") else "fwd"
            print(f"{d:>6} | {cell('fwd')} | {cell('fwd_bwd')} | {rows[1][key] / r[key]:8.2f}")
        print(f"speed-up on {'forward+backward' if rows[1].get('fwd_bwd') else 'forward'}; a2a = the video "
              f"all-to-alls (CUDA events), the text all-gather is not counted")
        print(f"degree {world} vs 1: rel L2 video {err_video:.2e}, text {err_text:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

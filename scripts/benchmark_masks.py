"""Time SSTA block-mask and plan construction (not attention) at a video DiT shape.

Default: HunyuanVideo-1.5 720p / 121 frames — latent (31, 45, 80), 16 heads × 128, topk 32 (the
caller rule halves the released 64 at t <= 31), 1,985 text tokens of which 1,200 valid, bf16.
Reports, per device: tiling q and k into block order (needed by the attention anyway), the same
pass also producing the tile means (`TileLayout.tile_with_means`, what `ssta_attention` runs), the
block mask from those means, the plan from the mask, and mask + plan together (the number with a target:
<= 1 ms on an H100). GPU timings use `triton.testing.do_bench` (median) when Triton is present.

    python scripts/benchmark_masks.py                  # CPU, and CUDA when present
    python scripts/benchmark_masks.py --devices cuda --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time

import torch

from video_sparse_attn import BlockSparsePlan, SSTAConfig, TileLayout
from video_sparse_attn.masks import block_mask_from_tiled


def _time(fn, device: str, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))
        except ImportError:
            pass
    fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(device: str, args) -> dict:
    thw, L, H, D = tuple(args.thw), args.text_len, args.heads, args.dim
    dtype = getattr(torch, args.dtype)
    config = SSTAConfig(topk=args.topk, caller_rules=False, sparse_type=args.sparse_type)
    S = math.prod(thw) + L
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, H, S, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, H, S, D, device=device, dtype=dtype, generator=g)
    tm = torch.zeros(1, L, dtype=torch.bool, device=device)
    tm[:, : args.valid] = True
    layout = TileLayout(thw, config.tile_thw, L, config.pad_type)
    (q_t, qm), (k_t, km) = layout.tile_with_means(q), layout.tile_with_means(k)
    bs = layout.block_size

    def mask_only():
        return block_mask_from_tiled(q_t, k_t, layout, config, tm, qm, km)

    mask = mask_only()

    def plan_only():
        return BlockSparsePlan.from_block_mask(mask, bs, bs, layout.key_valid(tm, device))

    def mask_and_plan():
        m = block_mask_from_tiled(q_t, k_t, layout, config, tm, qm, km)
        return BlockSparsePlan.from_block_mask(m, bs, bs, layout.key_valid(tm, device))

    reps = args.reps if device.startswith("cuda") else max(1, min(args.reps, 5))
    if args.profile and device.startswith("cuda"):
        mask_and_plan()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            mask_and_plan()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    row = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "thw": "x".join(map(str, thw)), "heads": H, "dim": D, "text": L, "blocks": layout.num_blocks,
        "tile_qk_ms": _time(lambda: (layout.tile(q), layout.tile(k)), device, reps),
        "tile_qk_means_ms": _time(lambda: (layout.tile_with_means(q), layout.tile_with_means(k)), device, reps),
        "mask_plan_unfused_ms": _time(lambda: BlockSparsePlan.from_block_mask(
            block_mask_from_tiled(q_t, k_t, layout, config, tm), bs, bs, layout.key_valid(tm, device)), device, reps),
        "mask_ms": _time(mask_only, device, reps),
        "plan_ms": _time(plan_only, device, reps),
        "mask_plan_ms": _time(mask_and_plan, device, reps),
        "density": float(mask.float().mean()),
    }
    if device.startswith("cuda"):
        # The path has no host sync, so it can be captured in a CUDA graph; replaying it measures
        # the GPU work alone (what it costs inside a pipeline, where launches overlap the attention).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            mask_and_plan()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mask_and_plan()
        row["mask_plan_graph_ms"] = _time(graph.replay, device, reps)
    else:
        row["mask_plan_graph_ms"] = float("nan")
    row["tile_means_floor_ms"] = 2 * q_t.numel() * q_t.element_size() / 3.0e12 * 1e3  # read q_t, k_t at ~3 TB/s
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thw", type=int, nargs=3, default=(31, 45, 80))
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--text-len", type=int, default=1985)
    p.add_argument("--valid", type=int, default=1200)
    p.add_argument("--sparse-type", default="ssta")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    p.add_argument("--csv", default=None)
    p.add_argument("--profile", action="store_true", help="print the CUDA kernels of mask + plan")
    args = p.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows = [run(d, args) for d in devices]
    cols = ["device", "blocks", "density", "tile_qk_ms", "tile_qk_means_ms", "mask_ms", "plan_ms", "mask_plan_ms",
            "mask_plan_graph_ms", "mask_plan_unfused_ms", "tile_means_floor_ms"]
    for r in rows:
        print("\n".join(f"{c:>22}: {r[c]:.3f}" if isinstance(r[c], float) else f"{c:>22}: {r[c]}" for c in cols))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()

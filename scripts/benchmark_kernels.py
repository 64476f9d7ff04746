"""Time the Triton block-sparse attention against cuDNN SDPA (dense) and compiled FlexAttention.

Cases (B=1, H=16, D=128, bf16 by default), all with 384-token blocks (tiles 6×8×8):
  sta46k   STA (3,3,3) windows, latent (30,48,32) + 256 text tokens  → S = 46,336
  sta115k  STA (3,3,3) windows, latent (30,48,80) + 256 text tokens  → S = 115,456
  ssta720p SSTA, latent (31,45,80), topk 32, 1,985 text tokens (HunyuanVideo-1.5 720p/121f)
  dense46k every block kept, S = 46,080 (the kernels' dense mode)
Text rows attend every block and every row attends the text blocks. Sequences are padded to whole
blocks and every key counts as valid, so FlexAttention (`BlockMask.from_kv_blocks`, full blocks) runs
the same mask. FLOPs: forward 4·S_q·S_k·D per kept pair, backward 2.5×; effective TFLOP/s count
only kept blocks; cuDNN is dense over the same padded length.

Variants (``--variants``) are kernel options + backward mode of `block_sparse_attention_triton`, all
timed in one process: ``tma`` (defaults: descriptors where usable, single-pass backward with pointer
atomics for dQ), ``ptr`` (pointer loads forced, the Ampere/Ada path), ``det`` / ``ptrdet``
(deterministic two-pass backward), ``tmared`` (single pass, dQ by TMA reduce-add), ``flat`` /
``flatdet`` (dK/dV in one flat loop over every query sub-tile instead of an inner loop per kept
query block up to q_valid; the benchmark masks have no padded queries, so this is the cost of the
inner loop), and forward variants ``ws`` / ``v3`` / ``peel`` / ``lazy``. A variant's forward is timed once per distinct set of
forward options. Every variant's output and gradients are compared with FlexAttention's.

Tuning: the shipped table of tuned configs is used as users get it, and families it lacks are
autotuned into a fresh ``--tuning-cache`` (picks printed at the end in the shipped table's format);
``--retune`` bypasses the table and autotunes every family.

    python scripts/benchmark_kernels.py --csv bench.csv --plot bench.png
"""

from __future__ import annotations

import argparse
import csv
import math
import os

import torch

from video_sparse_attn import SSTAConfig, TileLayout
from video_sparse_attn.masks import build_block_mask
from video_sparse_attn.plan import BlockSparsePlan

CASES = {
    "sta46k": dict(thw=(30, 48, 32), text=256, config=dict(sparse_type="sta", kernel_thw=(3, 3, 3))),
    "sta115k": dict(thw=(30, 48, 80), text=256, config=dict(sparse_type="sta", kernel_thw=(3, 3, 3))),
    "ssta720p": dict(thw=(31, 45, 80), text=1985, config=dict(sparse_type="ssta", topk=32)),
    "dense46k": dict(thw=(30, 48, 32), text=0, config=dict(sparse_type="dense")),
}


# Kernel variants: (kernel_options, deterministic backward).
VARIANTS = {
    "tma": ({}, False),                                          # defaults
    "ptr": ({"tma": False}, False),                              # pointer loads (Ampere/Ada path), forced
    "det": ({}, True),                                           # deterministic two-pass backward
    "ptrdet": ({"tma": False}, True),
    "tmared": ({"dq_reduce": "tma"}, False),                     # single pass, dQ by TMA reduce-add
    "flat": ({"skip_padded_queries": False}, False),             # single pass, flat dK/dV loop (no q_valid skip)
    "flatdet": ({"skip_padded_queries": False}, True),           # deterministic with the v5 flat dK/dV loop
    "ws": ({"warp_specialize": True}, False),                    # warp-specialised forward key loop
    "v3": ({"fwd_peel": False, "fwd_lazy": False}, False),       # branch in the loop, eager rescale
    "peel": ({"fwd_lazy": False}, False),                        # peeled ragged tiles only
    "lazy": ({"fwd_peel": False}, False),                        # lazy rescaling only
}
_FWD_KEYS = ("tma", "warp_specialize", "fwd_peel", "fwd_lazy")


def block_mask_for(name: str, heads: int, dim: int, dtype) -> tuple:
    """(bool block mask [1, H or 1, N, N], block size) of a named case, from random q, k."""
    case = CASES[name]
    config = SSTAConfig(tile_thw=(6, 8, 8), caller_rules=False, **case["config"])
    S = math.prod(case["thw"]) + case["text"]
    q, k = (torch.randn(1, heads, S, dim, device="cuda", dtype=dtype) for _ in range(2))
    mask = build_block_mask(q, k, case["thw"], config, case["text"])
    return mask, TileLayout(case["thw"], config.tile_thw, case["text"], config.pad_type).block_size


def bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=100, rep=400, return_mode="median"))


def run_case(name: str, args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    H, D, dtype = args.heads, args.dim, getattr(torch, args.dtype)
    mask, bs = block_mask_for(name, H, D, dtype)
    mask = mask.expand(1, H, -1, -1).contiguous()
    N = mask.shape[-1]
    S = N * bs
    plan = BlockSparsePlan.from_block_mask(mask, bs, bs)
    kept = int(mask.sum())
    fwd_flop = 4.0 * kept * bs * bs * D
    dense_flop = 4.0 * H * S * S * D
    if args.bshd:   # diffusers' layout: [B,H,S,D] views of [B,S,H,D] tensors, no copies
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    else:
        q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    row = {"case": name + ("_bshd" if args.bshd else ""), "S": S, "blocks": N, "density": kept / (H * N * N)}

    def fwd_bwd_times(fwd):
        t_f = bench(lambda: fwd())
        if args.fwd_only:
            return t_f, float("nan")
        out = fwd()
        t_b = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        return t_f, t_b

    counts = plan.kv_count.expand(1, H, N).contiguous()
    index = plan.kv_index.expand(1, H, N, N).contiguous()
    block_mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), index, counts, index, BLOCK_SIZE=bs)
    flex = torch.compile(flex_attention, dynamic=False)
    flex_out = flex(q, k, v, block_mask=block_mask)
    flex_grads = torch.autograd.grad(flex_out, (q, k, v), dout)
    row["flex_fwd_ms"], row["flex_bwd_ms"] = fwd_bwd_times(lambda: flex(q, k, v, block_mask=block_mask))

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    fwd_seen = {}
    for variant in args.variants:                      # see VARIANTS
        options, det = VARIANTS[variant]
        options = {**options, **({"autotune": False} if args.no_autotune else {})}
        fn = lambda: block_sparse_attention_triton(q, k, v, plan, kernel_options=options, deterministic=det)[0]  # noqa: E731
        try:
            out = fn()
            row[f"{variant}_vs_flex_rel_l2"] = rel(out, flex_out)
            if not args.fwd_only:
                grads = torch.autograd.grad(out, (q, k, v), dout)
                row[f"{variant}_grad_vs_flex_rel_l2"] = max(rel(g, r) for g, r in zip(grads, flex_grads))
            fkey = tuple(options.get(x) for x in _FWD_KEYS)
            if fkey not in fwd_seen:
                fwd_seen[fkey] = bench(fn)
            row[f"{variant}_fwd_ms"] = fwd_seen[fkey]
            if args.fwd_only:
                row[f"{variant}_bwd_ms"] = float("nan")
            else:
                out = fn()
                row[f"{variant}_bwd_ms"] = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        except Exception as e:  # a variant that fails to build is reported, not fatal
            print(f"variant {variant} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            row[f"{variant}_fwd_ms"] = row[f"{variant}_bwd_ms"] = float("inf")
    row["ours_fwd_ms"] = min(row[f"{x}_fwd_ms"] for x in args.variants)
    row["ours_bwd_ms"] = min(row[f"{x}_bwd_ms"] for x in args.variants)
    row["flex_vs_ours_rel_l2"] = max(row.get(f"{x}_vs_flex_rel_l2", float("inf")) for x in args.variants)

    if not args.skip_cudnn:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa = torch.nn.functional.scaled_dot_product_attention
            row["cudnn_fwd_ms"], row["cudnn_bwd_ms"] = fwd_bwd_times(lambda: sdpa(q, k, v))
    else:
        row["cudnn_fwd_ms"] = row["cudnn_bwd_ms"] = float("nan")

    for who in ("ours", "flex", *args.variants):
        row[f"{who}_fwd_tflops"] = fwd_flop / row[f"{who}_fwd_ms"] * 1e-9
        row[f"{who}_bwd_tflops"] = 2.5 * fwd_flop / row[f"{who}_bwd_ms"] * 1e-9
    row["cudnn_fwd_tflops"] = dense_flop / row["cudnn_fwd_ms"] * 1e-9
    row["cudnn_bwd_tflops"] = 2.5 * dense_flop / row["cudnn_bwd_ms"] * 1e-9
    row["fwd_vs_flex"] = row["flex_fwd_ms"] / row["ours_fwd_ms"]
    row["bwd_vs_flex"] = row["flex_bwd_ms"] / row["ours_bwd_ms"]
    row["fwd_eff_vs_cudnn"] = row["ours_fwd_tflops"] / row["cudnn_fwd_tflops"]
    row["bwd_eff_vs_cudnn"] = row["ours_bwd_tflops"] / row["cudnn_bwd_tflops"]
    return row


def print_table(row, variants) -> None:
    """One case: ms, effective TFLOP/s and FlexAttention time / ours, per variant."""
    print(f"\n{row['case']}  S={row['S']}  density={row['density']:.3f}")
    print(f"  {'variant':8s} {'fwd ms':>8s} {'TF':>5s} {'vs flex':>7s} | {'bwd ms':>8s} {'TF':>5s} {'vs flex':>7s} | "
          f"{'out~flex':>8s} {'grad~flex':>9s}")
    for who in (*variants, "flex", "cudnn"):
        f, b = row[f"{who}_fwd_ms"], row[f"{who}_bwd_ms"]
        ff, bf = row[f"{who}_fwd_tflops"], row[f"{who}_bwd_tflops"]
        err = f"{row.get(who + '_vs_flex_rel_l2', float('nan')):8.1e} {row.get(who + '_grad_vs_flex_rel_l2', float('nan')):9.1e}"
        print(f"  {who:8s} {f:8.2f} {ff:5.0f} {row['flex_fwd_ms'] / f:7.2f} | {b:8.2f} {bf:5.0f} "
              f"{row['flex_bwd_ms'] / b:7.2f} | {err if who in variants else ''}", flush=True)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    who = ["ours", "flex", "cudnn"]
    for ax, phase in zip(axes, ("fwd", "bwd")):
        width = 0.27
        for i, w in enumerate(who):
            ax.bar([j + (i - 1) * width for j in range(len(rows))], [r[f"{w}_{phase}_tflops"] for r in rows],
                   width, label={"ours": "Triton block-sparse", "flex": "FlexAttention", "cudnn": "cuDNN dense"}[w])
        ax.set_xticks(range(len(rows)), [f"{r['case']}\nd={r['density']:.3f}" for r in rows])
        ax.set_ylabel("effective TFLOP/s")
        ax.set_title(f"{phase}, {torch.cuda.get_device_name()} D=128")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    # the backward is timed by repeating autograd.grad(..., retain_graph=True) over one forward; a
    # compiled FlexAttention backward refuses that with donated buffers (torch >= 2.11)
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--variants", nargs="+", default=["tma", "det"], choices=list(VARIANTS),
                   help="kernel variants to time (ours = the fastest)")
    p.add_argument("--no-autotune", action="store_true", help="first config of each list (kernel_options autotune=False)")
    p.add_argument("--retune", action="store_true", help="bypass the shipped table of tuned configs: tune everything")
    p.add_argument("--tuning-cache", default=None, help="tuning cache file (default: next to --csv)")
    p.add_argument("--bshd", action="store_true", help="q, k, v as transposed [B, S, H, D] tensors")
    p.add_argument("--fwd-only", action="store_true", help="time the forward only (backward reported as nan)")
    p.add_argument("--skip-cudnn", action="store_true", help="skip the dense cuDNN reference")
    p.add_argument("--csv", default="benchmark_kernels.csv")
    p.add_argument("--plot", default="benchmark_kernels.png")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_kernels.py needs a CUDA device")
    from video_sparse_attn.kernels import tuning

    cache = args.tuning_cache or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "tuning_cache.json")
    if os.path.exists(cache):
        os.remove(cache)                                  # families not in the shipped table are measured now
    tuning.configure(cache_path=cache, use_shipped_table=not args.retune)
    rows = []
    for name in args.cases:
        row = run_case(name, args)
        rows.append(row)
        print(f"{name:9s} S={row['S']:6d} dens={row['density']:.3f} | fwd ours {row['ours_fwd_ms']:7.2f} ms "
              f"({row['ours_fwd_tflops']:5.0f} TF) flex {row['flex_fwd_ms']:7.2f} cudnn {row['cudnn_fwd_ms']:7.2f} "
              f"({row['cudnn_fwd_tflops']:4.0f} TF) x{row['fwd_vs_flex']:.2f} vs flex | bwd ours {row['ours_bwd_ms']:7.2f} "
              f"({row['ours_bwd_tflops']:4.0f} TF) flex {row['flex_bwd_ms']:7.2f} cudnn ({row['cudnn_bwd_tflops']:4.0f} TF) "
              f"x{row['bwd_vs_flex']:.2f} | flex~ours {row['flex_vs_ours_rel_l2']:.1e} | "
              + " ".join(f"{x} {row[x + '_fwd_ms']:.2f}/{row[x + '_bwd_ms']:.2f}" for x in args.variants), flush=True)
        print_table(row, args.variants)
        with open(args.csv, "w", newline="") as f:          # rewritten after every case
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
            w.writeheader()
            w.writerows(rows)
    plot(rows, args.plot)
    gpu = torch.cuda.get_device_name()
    picked = {k: c for k, c in tuning.load_table(cache).items() if k.startswith(gpu + "|")}
    print(f"\nautotuned configs ({len(picked)}, {cache}; format of kernels/tuned_configs.json):")
    for k, c in sorted(picked.items()):
        print(f"  {k}: {c}")


if __name__ == "__main__":
    main()

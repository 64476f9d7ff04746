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


# Kernel variants: environment switches of the forward kernel (the backward only follows TMA on/off).
_BASE = {"VSA_TRITON_TMA": "1", "VSA_TRITON_WS": "0", "VSA_TRITON_FWD_PEEL": "1", "VSA_TRITON_FWD_LAZY": "1"}
VARIANTS = {
    "tma": _BASE,                                               # defaults: descriptors where usable, peeled, lazy
    "ptr": {**_BASE, "VSA_TRITON_TMA": "0"},                    # pointer loads
    "ws": {**_BASE, "VSA_TRITON_WS": "1"},                      # warp-specialised forward key loop
    "v3": {**_BASE, "VSA_TRITON_FWD_PEEL": "0", "VSA_TRITON_FWD_LAZY": "0"},   # branch in the loop, eager rescale
    "peel": {**_BASE, "VSA_TRITON_FWD_LAZY": "0"},              # peeled ragged tiles only
    "lazy": {**_BASE, "VSA_TRITON_FWD_PEEL": "0"},              # lazy rescaling only
}


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

    refs = {}
    for variant in args.variants:                      # see VARIANTS
        os.environ.update(VARIANTS[variant])
        try:
            with torch.no_grad():
                refs[variant] = block_sparse_attention_triton(q, k, v, plan)[0]
            row[f"{variant}_fwd_ms"], row[f"{variant}_bwd_ms"] = fwd_bwd_times(
                lambda: block_sparse_attention_triton(q, k, v, plan)[0])
        except Exception as e:  # a variant that fails to build is reported, not fatal
            print(f"variant {variant} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            row[f"{variant}_fwd_ms"] = row[f"{variant}_bwd_ms"] = float("inf")
    row["ours_fwd_ms"] = min(row[f"{x}_fwd_ms"] for x in args.variants)
    row["ours_bwd_ms"] = min(row[f"{x}_bwd_ms"] for x in args.variants)

    counts = plan.kv_count.expand(1, H, N).contiguous()
    index = plan.kv_index.expand(1, H, N, N).contiguous()
    block_mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), index, counts, index, BLOCK_SIZE=bs)
    flex = torch.compile(flex_attention, dynamic=False)
    flex_out = flex(q, k, v, block_mask=block_mask)
    for variant, ref in refs.items():
        row[f"{variant}_vs_flex_rel_l2"] = float((ref.float() - flex_out.float()).norm() / flex_out.float().norm())
    row["flex_vs_ours_rel_l2"] = max(row[f"{x}_vs_flex_rel_l2"] for x in refs)
    row["flex_fwd_ms"], row["flex_bwd_ms"] = fwd_bwd_times(lambda: flex(q, k, v, block_mask=block_mask))

    if not args.skip_cudnn:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa = torch.nn.functional.scaled_dot_product_attention
            row["cudnn_fwd_ms"], row["cudnn_bwd_ms"] = fwd_bwd_times(lambda: sdpa(q, k, v))
    else:
        row["cudnn_fwd_ms"] = row["cudnn_bwd_ms"] = float("nan")

    for who in ("ours", "flex"):
        row[f"{who}_fwd_tflops"] = fwd_flop / row[f"{who}_fwd_ms"] * 1e-9
        row[f"{who}_bwd_tflops"] = 2.5 * fwd_flop / row[f"{who}_bwd_ms"] * 1e-9
    row["cudnn_fwd_tflops"] = dense_flop / row["cudnn_fwd_ms"] * 1e-9
    row["cudnn_bwd_tflops"] = 2.5 * dense_flop / row["cudnn_bwd_ms"] * 1e-9
    row["fwd_vs_flex"] = row["flex_fwd_ms"] / row["ours_fwd_ms"]
    row["bwd_vs_flex"] = row["flex_bwd_ms"] / row["ours_bwd_ms"]
    row["fwd_eff_vs_cudnn"] = row["ours_fwd_tflops"] / row["cudnn_fwd_tflops"]
    row["bwd_eff_vs_cudnn"] = row["ours_bwd_tflops"] / row["cudnn_bwd_tflops"]
    return row


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
        ax.set_title(f"{phase}, H100 bf16 D=128")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--variants", nargs="+", default=["tma"], choices=list(VARIANTS),
                   help="kernel variants to time (ours = the fastest)")
    p.add_argument("--bshd", action="store_true", help="q, k, v as transposed [B, S, H, D] tensors")
    p.add_argument("--fwd-only", action="store_true", help="time the forward only (backward reported as nan)")
    p.add_argument("--skip-cudnn", action="store_true", help="skip the dense cuDNN reference")
    p.add_argument("--csv", default="benchmark_kernels.csv")
    p.add_argument("--plot", default="benchmark_kernels.png")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_kernels.py needs a CUDA device")
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
        with open(args.csv, "w", newline="") as f:          # rewritten after every case
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    plot(rows, args.plot)
    from video_sparse_attn.kernels import triton_bwd, triton_fwd

    for name, tuner in (("fwd", triton_fwd._tuned_fwd(384, 384, False, False)), ("fwd_ws", triton_fwd._tuned_fwd(384, 384, False, True)),
                        ("dkdv", triton_bwd._tuned("dkdv", 384, 384, False)),
                        ("dq", triton_bwd._tuned("dq", 384, 384, False))):
        for key, config in tuner.cache.items():
            print(f"autotuned {name} {key}: {config}")


if __name__ == "__main__":
    main()

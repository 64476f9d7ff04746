"""SSTA at HunyuanVideo-1.5 720p/121f, end to end and per kernel, against exact dense attention.

Shape: thw (31, 45, 80), tiles 6×8×8, released config (`SSTAConfig().for_thw(thw)`: top-k 32, window
3×3×3, pad_type "zero"; ``--pad-type`` changes only the padding), 1,985 text tokens of which 1,200
valid; B=1, H=16, D=128, bf16.

Rows (each a `triton.testing.do_bench` median in one process, random data):
  kernel/*    one SSTA plan, block-ordered tensors: the padded plan vs the padding-free plan, per backend,
              raw FA4 (its own call on the same converted lists), and FlexAttention (compiled) on the mask
  ssta/*      `ssta_attention` (mask + plan + reorder + kernels + untile), fwd and fwd+bwd
  dense/*     exact dense baseline: cuDNN SDPA over the 112,800 valid tokens only (invalid text dropped)
Ratios are against the exact dense baseline. Effective TFLOP/s count kept blocks of the padded plan.

    python scripts/benchmark_ssta.py --json out/ssta.json
    python scripts/benchmark_ssta.py --pad-type repeat --backends triton   # repeat copies skipped (key bias)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from video_sparse_attn import block_sparse_attention, ssta_attention
from video_sparse_attn.config import PAD_TYPES
from video_sparse_attn.masks.build import block_mask_from_tiled
from video_sparse_attn.kernels.registry import BACKENDS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ssta720p  # noqa: E402
from ssta720p import TEXT, THW, VALID  # noqa: E402


def bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def fwd_bwd(fn, inputs, grad):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(grad)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--backends", default="fa4,triton", help="comma-separated kernel backends to time")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--pad-type", choices=PAD_TYPES, default=None,
                    help="padding of the released config to use instead of its own (zero)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile(ssta_attention) end to end (mask, plan and gathers fused by Inductor)")
    ap.add_argument("--forward-only-kernels", action="store_true",
                    help="kernel rows: time the plan a forward alone runs too (repeat copies kept where the backend "
                         "skips them only for training)")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="also profile one padding-free fwd+bwd of ssta_attention per backend; CUDA kernel table here")
    args = ap.parse_args()
    H, D, dev = args.heads, 128, "cuda"
    backends = [b for b in args.backends.split(",") if BACKENDS[b].importable() is None]
    problem = ssta720p.build(H, D, args.pad_type, device=dev, requires_grad=True)
    cfg, layout, q, k, v, tm = problem.cfg, problem.layout, problem.q, problem.k, problem.v, problem.text_mask
    rows = []

    def add(name, ms, flop=None):
        row = {"name": name, "ms": ms}
        if flop:
            row["eff_tflops"] = flop / ms / 1e9
        rows.append(row)
        print(f"{name:44s} {ms:9.2f} ms" + (f"  {row['eff_tflops']:6.0f} TF" if flop else ""), flush=True)

    # ---- one plan, kernels alone
    bs = layout.block_size
    q_t, k_t, v_t = problem.tiled
    mask = problem.mask
    padded = ssta720p.padded_plan(problem)

    def padding_free_plan(be, backward=True):   # the keys ssta_attention skips on this backend when training
        # (zero keys by whole key tiles, repeat copies with a key bias where the backend adds one), or in a forward alone
        return ssta720p.padding_free_plan(problem, be, backward)

    flop = problem.flop(D)
    print(f"pad_type {cfg.pad_type}, density {float(mask.float().mean()):.3f}, blocks {mask.shape[-1]}, "
          f"padded S {layout.padded_len}")
    tq, tk, tv = (x.detach().requires_grad_() for x in (q_t, k_t, v_t))
    g_t = torch.randn_like(tq)
    for be in backends:
        plans = [("padded", padded), ("padding-free", padding_free_plan(be))]
        if args.forward_only_kernels:
            plans.append(("padding-free-inference", padding_free_plan(be, backward=False)))
        for label, plan in plans:
            f = lambda p=plan, b=be: block_sparse_attention(tq, tk, tv, p, backend=b)[0]   # noqa: E731
            with torch.no_grad():
                add(f"kernel/{be}/{label}/fwd", bench(f), flop)
            t_fb = bench(fwd_bwd(f, (tq, tk, tv), g_t))
            add(f"kernel/{be}/{label}/fwd+bwd", t_fb, 3.5 * flop)
    if "fa4" in backends:
        from flash_attn.cute.interface import _flash_attn_fwd

        from video_sparse_attn.kernels.fa4 import _fa4_tensors, _key_mask_mod, fa4_block_lists

        lists = fa4_block_lists(padded, 1)
        with torch.no_grad():
            add("kernel/fa4-raw/padded/fwd", bench(lambda: _flash_attn_fwd(
                tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2), mask_mod=_key_mask_mod(),
                block_sparse_tensors=_fa4_tensors(lists.fwd), return_lse=True, aux_tensors=[lists.key_ok])), flop)
    if not args.no_flex:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        flex = torch.compile(flex_attention)
        m = mask.expand(1, H, -1, -1)
        cnt = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort(~m, dim=-1, stable=True).to(torch.int32)
        bm = BlockMask.from_kv_blocks(torch.zeros_like(cnt), idx, cnt, idx, BLOCK_SIZE=bs, mask_mod=None)
        f = lambda: flex(tq, tk, tv, block_mask=bm)                                       # noqa: E731
        with torch.no_grad():
            add("kernel/flex/padded/fwd", bench(f), flop)
        add("kernel/flex/padded/fwd+bwd", bench(fwd_bwd(f, (tq, tk, tv), g_t)), 3.5 * flop)

    # ---- the parts of ssta_attention around the kernel (forward)
    import dataclasses

    from video_sparse_attn.padding_free import add_zero_keys, untile_with_zero_keys, zero_keys_per_row_block

    with torch.no_grad():
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        add("part/tile q,k with means + tile v", bench(lambda: (layout.tile_with_means(qd), layout.tile_with_means(kd),
                                                                layout.tile(vd))))
        q_m, k_m = layout.tile_with_means(qd)[1], layout.tile_with_means(kd)[1]
        add("part/block mask", bench(lambda: block_mask_from_tiled(q_t, k_t, layout, cfg, tm, q_m, k_m)))
        add("part/plan", bench(lambda: padding_free_plan(backends[0])))
        if "fa4" in backends:
            from video_sparse_attn.kernels.fa4 import fa4_block_lists

            free = padding_free_plan("fa4")
            add("part/fa4 block lists", bench(lambda: fa4_block_lists(dataclasses.replace(free), 1)))
        o_t, l_t = block_sparse_attention(q_t, k_t, v_t, padding_free_plan(backends[0]), backend=backends[0])
        add("part/untile", bench(lambda: layout.untile(o_t)))
        if cfg.pad_type == "zero":
            n = zero_keys_per_row_block(mask, layout.zero_keys(dev, BACKENDS[backends[0]].key_tile))
            add("part/zero-key correction", bench(lambda: add_zero_keys(o_t, l_t, n, bs)))
            add("part/untile + zero-key correction, fused",
                bench(lambda: untile_with_zero_keys(layout, o_t, l_t, n, q)))

    # ---- end to end
    g = torch.randn_like(q)
    for be in backends:
        for pf in (False, True):
            label = "padding-free" if pf else "padded"
            f = lambda b=be, p=pf: ssta_attention(q, k, v, THW, cfg, TEXT, tm, backend=b, padding_free=p)  # noqa: E731
            with torch.no_grad():
                add(f"ssta/{be}/{label}/fwd", bench(f))
            add(f"ssta/{be}/{label}/fwd+bwd", bench(fwd_bwd(f, (q, k, v), g)))
        if args.compile:   # the same call compiled: Inductor fuses the small mask / plan / list kernels
            try:
                cf = torch.compile(lambda q_, k_, v_, b=be: ssta_attention(q_, k_, v_, THW, cfg, TEXT, tm, backend=b))
                f = lambda: cf(q, k, v)                                                     # noqa: E731
                with torch.no_grad():
                    add(f"ssta-compiled/{be}/padding-free/fwd", bench(f))
                add(f"ssta-compiled/{be}/padding-free/fwd+bwd", bench(fwd_bwd(f, (q, k, v), g)))
            except Exception as e:                                                          # noqa: BLE001
                print(f"ssta-compiled/{be}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with open(args.profile, "w") as fh:
            for be in backends:
                f = fwd_bwd(lambda b=be: ssta_attention(q, k, v, THW, cfg, TEXT, tm, backend=b), (q, k, v), g)
                f()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    f()
                    torch.cuda.synchronize()
                fh.write(f"## {be}: one padding-free ssta_attention fwd+bwd\n")
                fh.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
                fh.write("\n\n")
        print(f"profile written to {args.profile}")

    # ---- exact dense baseline: cuDNN over the valid tokens
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_valid = math.prod(THW) + VALID
    dq, dk, dv = (torch.randn(1, H, n_valid, D, device=dev, dtype=q.dtype, requires_grad=True) for _ in range(3))
    gd = torch.randn_like(dq)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        f = lambda: torch.nn.functional.scaled_dot_product_attention(dq, dk, dv)          # noqa: E731
        with torch.no_grad():
            add("dense/cudnn-valid/fwd", bench(f))
        add("dense/cudnn-valid/fwd+bwd", bench(fwd_bwd(f, (dq, dk, dv), gd)))

    base = {r["name"].rsplit("/", 1)[1]: r["ms"] for r in rows if r["name"].startswith("dense/")}
    print("\n| row | ms | × exact dense |\n|---|---|---|")
    for r in rows:
        kind = r["name"].rsplit("/", 1)[1]
        ratio = base[kind] / r["ms"] if kind in base else float("nan")
        r["x_dense"] = ratio
        print(f"| {r['name']} | {r['ms']:.2f} | {ratio:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": {"thw": THW, "text": TEXT, "valid": VALID, "heads": H, "dim": D},
                       "pad_type": cfg.pad_type,
                       "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

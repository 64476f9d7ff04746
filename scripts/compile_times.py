"""Compile seconds of every Triton kernel variant one `ssta_attention` call compiles, for an sm90 GPU,
on a machine without one (Triton compiles for a given target; ptxas ships with it).

The variants come from the launch code itself: the call's forward and backward run inside
`kernels.precompile.compile_only` (launches only compile, buffers are meta tensors), with the
decisions a Hopper GPU would take (tensor descriptors usable, the shipped table's configs for the GPU
named by ``--gpu``). Each variant is compiled into a fresh, empty Triton cache.

    python scripts/compile_times.py                      # one variant after another
    python scripts/compile_times.py --overlap            # also: forward on this thread, backward beside it
    python scripts/compile_times.py --variants           # only list variants: warm-up vs a real SSTA call

``--variants`` compiles nothing: it records Triton's specialisation key of every launch
(`video_sparse_attn.kernels.variants`) of one real ``ssta_attention`` call (forward, backward, and what
the forward compiles in the background) in both q/k/v layouts, and of `warmup.warmup` for the same
heads / head dim / tile, and prints the variants the call would still compile after the warm-up.

Prints one line per variant (kernel, constexprs, seconds, of which ptxas) and the totals.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="NVIDIA H200", help="GPU name for the tuned-config lookup")
    p.add_argument("--thw", default="31,45,80")
    p.add_argument("--text-len", type=int, default=1985)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--overlap", action="store_true",
                   help="after the sequential pass, compile again (fresh cache) with the backward in a thread")
    p.add_argument("--variants", action="store_true",
                   help="list the variants of the call and of the warm-up (no compilation) and exit")
    args = p.parse_args()
    if args.variants:
        return list_variants(args)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.pop("TRITON_INTERPRET", None)

    from video_sparse_attn.kernels import variants

    with variants.sm90(args.gpu):     # Triton targets sm90; the package decides as on that GPU
        compile_times(args)


def compile_times(args) -> None:
    import torch
    import triton

    from video_sparse_attn import SSTAConfig
    from video_sparse_attn.kernels import precompile as pc
    from video_sparse_attn.kernels import triton_fwd, tuning
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options
    from video_sparse_attn.kernels.triton_gather import gather_rows_with_means
    from video_sparse_attn.layout import TileLayout
    from video_sparse_attn.plan import BlockSparsePlan

    import triton.backends.nvidia.compiler as nv

    ptxas = threading.local()
    real_run = nv.subprocess.run

    def timed_run(*a, **kw):
        t = time.perf_counter()
        try:
            return real_run(*a, **kw)
        finally:
            ptxas.s = getattr(ptxas, "s", 0.0) + time.perf_counter() - t

    nv.subprocess.run = timed_run
    rows, lock = [], threading.Lock()
    real_launch = pc.launch

    def launch(kernel, grid, *a, **kw):
        name = getattr(getattr(kernel, "tuner", kernel), "fn", kernel)
        name = getattr(name, "__name__", None) or getattr(getattr(name, "fn", None), "__name__", str(name))
        ptxas.s = 0.0
        t = time.perf_counter()
        real_launch(kernel, grid, *a, **kw)
        consts = {k: v for k, v in kw.items() if k not in ("D", "D_PAD", "DOT_PREC")}
        with lock:
            rows.append((name, consts, time.perf_counter() - t, ptxas.s, threading.current_thread().name))

    pc.launch = launch

    thw = tuple(int(x) for x in args.thw.split(","))
    cfg = SSTAConfig().for_thw(thw)
    layout = TileLayout(thw, cfg.tile_thw, args.text_len, cfg.pad_type)
    bs, N, H, D = layout.block_size, layout.num_blocks, args.heads, args.head_dim
    idx = layout.indices("cpu")
    band = (torch.arange(N)[None, :] - torch.arange(N)[:, None]).abs() <= 16
    mask = band.expand(1, H, N, N).contiguous()                       # per head, as SSTA's selection
    plan = BlockSparsePlan.from_block_mask(mask, bs, bs, layout.key_valid(None, "cpu", True), layout.query_valid("cpu"))
    x = torch.empty(1, H, layout.seq_len, D, dtype=torch.bfloat16, device="meta")
    t_ = torch.empty(1, H, N * bs, D, dtype=torch.bfloat16, device="meta")
    opts = resolve_kernel_options(None)
    scale = D ** -0.5

    def forward():
        gather_rows_with_means(x, idx["kernel_src"], bs, layout.num_video_blocks, layout.tile_volume)
        gather_rows_with_means(x, idx["kernel_src"], bs, 0)
        triton_fwd.attention_forward(t_, t_, t_, plan, scale, opts)

    def backward():
        pc.precompile_backward(t_, t_, t_, plan, scale, opts, False)

    def fresh_cache():
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="vsa-compile-")
        from video_sparse_attn.kernels.variants import kernels
        for fn in kernels():
            fn.device_caches.clear()
        tuning._kernels.clear()

    # one throw-away compile first: process-wide start-up (LLVM / MLIR initialisation), not per variant
    fresh_cache()
    with pc.compile_only():
        gather_rows_with_means(torch.empty(1, 1, 64, 16, device="meta"), idx["kernel_src"][:64], 16, 0)
    rows.clear()

    fresh_cache()
    t0 = time.perf_counter()
    with pc.compile_only():
        forward()
        t_fwd = time.perf_counter() - t0
        backward()
    total = time.perf_counter() - t0
    print(f"sm90 compile seconds on this machine (Triton {triton.__version__}, {os.cpu_count()} CPUs), "
          f"B=1 H={H} S={layout.seq_len} D={D} bf16, block {bs}, {args.gpu} configs")
    for name, consts, s, px, _ in rows:
        print(f"  {name:20s} {s:6.2f} s  (ptxas {px:5.2f} s)  {consts}")
    print(f"sequential: forward kernels {t_fwd:.2f} s, all {total:.2f} s")

    if args.overlap:
        rows.clear()
        fresh_cache()
        t0 = time.perf_counter()
        th = threading.Thread(target=backward, name="bwd")
        th.start()
        with pc.compile_only():
            forward()
        t_fwd = time.perf_counter() - t0
        th.join()
        total = time.perf_counter() - t0
        for name, consts, s, px, who in rows:
            print(f"  [{who:10s}] {name:20s} {s:6.2f} s  (ptxas {px:5.2f} s)")
        print(f"overlapped (backward in a thread): forward kernels {t_fwd:.2f} s, all {total:.2f} s")


def list_variants(args) -> None:
    import torch

    from video_sparse_attn.kernels import variants as V

    thw = tuple(int(x) for x in args.thw.split(","))
    warm = V.warmup_variants((1, args.heads, thw, args.head_dim, torch.bfloat16, 384), gpu=args.gpu)
    print(f"warm-up ({args.heads} heads, D={args.head_dim}, bf16, tile 6,8,8): {len(warm)} variants")
    for line in V.describe(warm):
        print("  ", line)
    for bshd in (False, True):
        phases = V.ssta_call_variants(args.heads, args.head_dim, thw, args.text_len, bshd=bshd, gpu=args.gpu)
        call = set().union(*phases.values())
        print(f"ssta_attention {thw}+{args.text_len}, q/k/v {'[B,S,H,D] views' if bshd else '[B,H,S,D]'}: "
              + ", ".join(f"{p} {len(v)}" for p, v in phases.items()))
        for p, v in phases.items():
            for line in V.describe(v):
                print(f"   {p:10s} {line}")
        print("  compiled by the call after the warm-up:", V.describe(call - warm) or "nothing")
        late = phases["backward"] - phases["forward"] - phases["background"]
        print("  compiled by the backward (not by the forward or beside it):", V.describe(late) or "nothing")


if __name__ == "__main__":
    main()

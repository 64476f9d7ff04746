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
forward options. Every variant's output and gradients are compared with FlexAttention's. ``--rounds N``
times FlexAttention and the variants N times, alternating the order, and reports medians.

Parity cases (the public ops on ``--backend``, each beside compiled FlexAttention over the same token
mask: Flex's `BlockMask` is built by `create_block_mask`, at Flex's 128-token blocks, from a
``mask_mod`` that reads the same block masks and adds the same token terms), SSTA masks (tiles 6×8×8, topk 32), H=32, D=128:
  plain    one video (30,48,32), non-causal, H_kv = H           (the yardstick)
  gqa      the same with H_kv = 8 (grouped-query attention)
  causal   the same with causal=True (token-level, diagonal blocks partial, blocks above dropped)
  varlen   4 videos of different grids packed (`block_sparse_attention_varlen`), one SSTA mask each
Each reports forward and forward+backward time, the kept blocks (summed over q heads, after
dropping) and the time per kept block relative to ``plain`` (1.0 = as efficient as the plain case).
``varlen`` times the whole public call (packing and its plan included); the others reuse one plan
(``varlen_plan``: the same four videos, their block-diagonal plan built once).
``--dry-run`` builds the parity cases at tiny shapes on the CPU (torch backend; masks, plans and the
Flex token mask checked against each other) without timing anything.

Tuning: the shipped table of tuned configs is used as users get it, and families it lacks are
autotuned into a fresh ``--tuning-cache`` (picks printed at the end in the shipped table's format);
``--retune`` bypasses the table and autotunes every family.

    python scripts/benchmark_kernels.py --csv bench.csv --plot bench.png
    python scripts/benchmark_kernels.py --cases plain gqa causal varlen --csv parity.csv
    python scripts/benchmark_kernels.py --dry-run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import statistics

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


# Kernel variants: (kernel_options, deterministic backward[, "natural": the plan's query / key blocks
# walked in block order instead of heaviest first]).
VARIANTS = {
    "tma": ({}, False),                                          # defaults (Gluon kernels on Hopper)
    "triton": ({"gluon": False}, False),                         # the Triton kernels on Hopper too
    "fs3": ({"gluon_fwd_stages": 3}, False),                     # Gluon forward, 3-slot K/V rings
    "noidle": ({"gluon_fwd_skip_idle": False}, False),           # Gluon forward, all-padding warpgroup computes too
    "bs3": ({"gluon_bwd_stages": 3}, False),                     # Gluon backward, 3-slot Q/dO ring
    "natural": ({}, False, "natural"),                           # defaults, grid in block order
    "stepwise": ({"gluon_bwd_overlap": False}, False),           # Gluon backward, no Sᵀ under the dQ adds
    "overlap": ({"gluon_bwd_overlap": True}, False),             # = the default, named (to time A/B/A with stepwise)
    "ptr": ({"tma": False}, False),                              # pointer loads (Ampere/Ada path), forced
    "det": ({}, True),                                           # deterministic backward (Gluon fixed point on sm90)
    "tritondet": ({"gluon": False}, True),                       # deterministic two-pass Triton backward
    "ptrdet": ({"tma": False}, True),
    "tmared": ({"dq_reduce": "tma"}, False),                     # single pass, dQ by TMA reduce-add
    "flat": ({"skip_padded_queries": False}, False),             # single pass, flat dK/dV loop (no q_valid skip)
    "flatdet": ({"skip_padded_queries": False}, True),           # deterministic with the v5 flat dK/dV loop
    "ws": ({"warp_specialize": True}, False),                    # warp-specialised forward key loop
    "v3": ({"fwd_peel": False, "fwd_lazy": False}, False),       # branch in the loop, eager rescale
    "peel": ({"fwd_lazy": False}, False),                        # peeled ragged tiles only
    "lazy": ({"fwd_peel": False}, False),                        # lazy rescaling only
}
_FWD_KEYS = ("tma", "warp_specialize", "fwd_peel", "fwd_lazy", "gluon", "gluon_fwd_stages",
             "gluon_fwd_skip_idle")


def natural_order(plan):
    """``plan`` with its query and key blocks walked in block order (``row_order`` / ``col_order``
    ascending) instead of heaviest first."""
    def ascending(order):
        return torch.arange(order.shape[-1], device=order.device, dtype=order.dtype).expand(order.shape).contiguous()

    return dataclasses.replace(plan, row_order=ascending(plan.row_order), col_order=ascending(plan.col_order))


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

    def bwd_timer(fwd):
        """A function timing the backward of one forward (its graph kept for every round)."""
        if args.fwd_only:
            return lambda: float("nan")
        out = fwd()
        return lambda: bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))

    counts = plan.kv_count.expand(1, H, N).contiguous()
    index = plan.kv_index.expand(1, H, N, N).contiguous()
    block_mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), index, counts, index, BLOCK_SIZE=bs)
    flex = torch.compile(flex_attention, dynamic=False)
    flex_fn = lambda: flex(q, k, v, block_mask=block_mask)  # noqa: E731
    flex_out = flex_fn()
    flex_grads = torch.autograd.grad(flex_out, (q, k, v), dout)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    # (name, forward, backward timer, forward key): FlexAttention and every variant that builds and runs
    timed = [("flex", flex_fn, bwd_timer(flex_fn), "flex")]
    for variant in args.variants:                      # see VARIANTS
        options, det, *order = VARIANTS[variant]
        options = {**options, **({"autotune": False} if args.no_autotune else {})}
        p = natural_order(plan) if order else plan
        fn = lambda options=options, det=det, p=p: block_sparse_attention_triton(  # noqa: E731
            q, k, v, p, kernel_options=options, deterministic=det)[0]
        try:
            out = fn()
            row[f"{variant}_vs_flex_rel_l2"] = rel(out, flex_out)
            if not args.fwd_only:
                grads = torch.autograd.grad(out, (q, k, v), dout)
                row[f"{variant}_grad_vs_flex_rel_l2"] = max(rel(g, r) for g, r in zip(grads, flex_grads))
            timed.append((variant, fn, bwd_timer(fn), (*(options.get(x) for x in _FWD_KEYS), *order)))
        except Exception as e:  # a variant that fails to build is reported, not fatal
            print(f"variant {variant} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            row[f"{variant}_fwd_ms"] = row[f"{variant}_bwd_ms"] = float("inf")
    # Rounds: every entry timed once per round, in reverse order every other round (timings drift with
    # the order of measurement in one process); each reports its median over the rounds. A forward is
    # timed once per round per distinct set of forward options.
    samples = {name: ([], []) for name, *_ in timed}
    for r in range(args.rounds):
        fwd_round = {}
        for name, fwd, bwd, fkey in (timed if r % 2 == 0 else timed[::-1]):
            if fkey not in fwd_round:
                fwd_round[fkey] = bench(fwd)
            samples[name][0].append(fwd_round[fkey])
            samples[name][1].append(bwd())
    for name, (f_ms, b_ms) in samples.items():
        row[f"{name}_fwd_ms"], row[f"{name}_bwd_ms"] = statistics.median(f_ms), statistics.median(b_ms)
        if args.rounds > 1:
            row[f"{name}_bwd_ms_rounds"] = " ".join(f"{t:.2f}" for t in b_ms)
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


# ------------------------------------------------------------------------------------- parity cases
PARITY = {
    "plain": dict(grids=[(30, 48, 32)], kv_heads=32, causal=False),
    "gqa": dict(grids=[(30, 48, 32)], kv_heads=8, causal=False),
    "causal": dict(grids=[(30, 48, 32)], kv_heads=32, causal=True),
    "varlen": dict(grids=[(30, 48, 32), (18, 32, 32), (12, 24, 40), (6, 16, 16)], kv_heads=32, causal=False),
    # the same four videos through `block_sparse_attention` with the block-diagonal plan built once:
    # varlen's kernel work alone, so that the wrapper's cost and the kernels' efficiency show apart
    "varlen_plan": dict(grids=[(30, 48, 32), (18, 32, 32), (12, 24, 40), (6, 16, 16)], kv_heads=32, causal=False),
}
PARITY_HEADS, PARITY_TILE, PARITY_TOPK = 32, (6, 8, 8), 32
FLEX_BLOCK = 128   # Flex's own block: it skips 128-token sub-blocks above a causal diagonal, as fa4 does
# --dry-run: the same cases scaled down (16-token tiles, 4 heads) so that they build on a CPU
TINY = dict(heads=4, kv_heads={8: 2, 32: 4}, tile=(2, 2, 4), topk=2,
            grids={(30, 48, 32): (6, 4, 8), (18, 32, 32): (4, 4, 4), (12, 24, 40): (2, 6, 8), (6, 16, 16): (2, 2, 4)})


def parity_setup(name: str, device="cuda", dtype=torch.bfloat16, dim: int = 128, tiny: bool = False,
                 backend: str = "auto") -> dict:
    """Inputs, our call and FlexAttention's for a parity case (grids are whole tiles, so each video
    is whole blocks and the packed varlen layout is the concatenation).

    Returns a dict: ``q, k, v`` (``[1, H, S, D]`` / ``[1, H_kv, S, D]``; varlen: packed ``[T, H, D]``),
    ``ours()`` → out in q's layout, ``flex_qkv`` (``[1, H|H_kv, S, D]`` views), ``mask_mod``, ``S``,
    ``block``, ``kept`` (kept blocks summed over q heads, after dropping), ``gqa``, ``to_flex(out)``.
    """
    from video_sparse_attn import block_sparse_attention, block_sparse_attention_varlen

    case = PARITY[name]
    H, Hk = (TINY["heads"], TINY["kv_heads"][case["kv_heads"]]) if tiny else (PARITY_HEADS, case["kv_heads"])
    tile, topk = (TINY["tile"], TINY["topk"]) if tiny else (PARITY_TILE, PARITY_TOPK)
    grids = [TINY["grids"][g] for g in case["grids"]] if tiny else case["grids"]
    config = SSTAConfig(tile_thw=tile, sparse_type="ssta", topk=topk, caller_rules=False)
    bs = math.prod(tile)
    lengths = [math.prod(g) for g in grids]
    S = sum(lengths)
    q = torch.randn(1, H, S, dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, Hk, S, dim, device=device, dtype=dtype) for _ in range(2))
    masks, r0 = [], 0
    for g, n in zip(grids, lengths):   # one SSTA mask per video, from its own q and (head-repeated) k
        kk = k[:, :, r0:r0 + n].repeat_interleave(H // Hk, 1)
        masks.append(build_block_mask(q[:, :, r0:r0 + n], kk, g, config)[0].expand(H, -1, -1))
        r0 += n
    N = S // bs
    full = torch.zeros(H, N, N, dtype=torch.bool, device=device)      # block-diagonal over the videos
    b0 = 0
    for m in masks:
        full[:, b0:b0 + m.shape[-1], b0:b0 + m.shape[-1]] = m
        b0 += m.shape[-1]
    causal = case["causal"]
    plan = BlockSparsePlan.from_block_mask(full[None], bs, bs, window_hi=0 if causal else None)
    if name == "varlen":
        cu = [0] + [sum(lengths[:i + 1]) for i in range(len(lengths))]
        qp, kp, vp = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))     # packed [T, H, D]

        def ours(qp=qp, kp=kp, vp=vp):
            return block_sparse_attention_varlen(qp, kp, vp, cu, cu, masks, q_block=bs, backend=backend)[0]

        inputs, to_flex = (qp, kp, vp), (lambda out: out.transpose(0, 1)[None])
    else:
        def ours(q=q, k=k, v=v):
            return block_sparse_attention(q, k, v, plan, backend=backend)[0]

        inputs, to_flex = (q, k, v), (lambda out: out)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = full[h, q_idx // bs, kv_idx // bs]
        return keep & (kv_idx <= q_idx) if causal else keep

    return dict(q=inputs[0], k=inputs[1], v=inputs[2], ours=ours, flex_qkv=(q, k, v), mask_mod=mask_mod, S=S,
                block=bs, kept=int(plan.kv_count.sum()), gqa=Hk != H, heads=H, to_flex=to_flex)


def token_mask(setup: dict) -> torch.Tensor:
    """bool ``[H, S, S]``: the mask_mod FlexAttention is given, evaluated everywhere (small cases)."""
    S, H, dev = setup["S"], setup["heads"], setup["flex_qkv"][0].device
    idx = torch.arange(S, device=dev)
    return setup["mask_mod"](0, torch.arange(H, device=dev)[:, None, None], idx[None, :, None], idx[None, None, :])


def dry_run(backend: str = "torch") -> list:
    """Build every parity case at tiny shapes on the CPU and check ours against dense attention over
    FlexAttention's token mask (float32). Returns ``(name, kept blocks, rel. error)`` rows."""
    rows = []
    for name in PARITY:
        st = parity_setup(name, device="cpu", dtype=torch.float32, dim=16, tiny=True, backend=backend)
        q, k, v = st["flex_qkv"]
        H = q.shape[1]
        k, v = (x.repeat_interleave(H // x.shape[1], 1) for x in (k, v))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~token_mask(st)[None], float("-inf"))
        ref = torch.softmax(s, -1).nan_to_num(0.0) @ v
        out = st["to_flex"](st["ours"]())
        err = float((out - ref).norm() / ref.norm())
        rows.append((name, st["kept"], err))
    return rows


def run_parity_case(name: str, args) -> dict:
    """Ours (the public op on ``--backend``) and compiled FlexAttention over the same token mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    st = parity_setup(name, "cuda", getattr(torch, args.dtype), args.dim, backend=args.backend)
    qf, kf, vf = st["flex_qkv"]
    H, S, bs = qf.shape[1], st["S"], st["block"]
    block_mask = create_block_mask(st["mask_mod"], 1, H, S, S, device="cuda", BLOCK_SIZE=FLEX_BLOCK, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    ins = [x.detach().requires_grad_() for x in (st["q"], st["k"], st["v"])]
    fins = [x.detach().requires_grad_() for x in (qf, kf, vf)]

    def ours():
        return st["ours"](*ins)

    def theirs():
        return flex(*fins, block_mask=block_mask, enable_gqa=st["gqa"])

    row = {"case": name, "S": S, "heads": H, "kept_blocks": st["kept"], "block": bs}
    out, ref = ours(), theirs()
    row["flex_vs_ours_rel_l2"] = float((st["to_flex"](out).float() - ref.float()).norm() / ref.float().norm())
    for who, fn, xs in (("ours", ours, ins), ("flex", theirs, fins)):
        row[f"{who}_fwd_ms"] = bench(fn)
        if not args.fwd_only:
            out = fn()
            dout = torch.randn_like(out)
            row[f"{who}_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(fn(), xs, dout))
        else:
            row[f"{who}_fwdbwd_ms"] = float("nan")
        for phase in ("fwd", "fwdbwd"):   # µs per 1000 kept blocks (per q head)
            row[f"{who}_{phase}_us_per_kblock"] = row[f"{who}_{phase}_ms"] / st["kept"] * 1e6
    return row


def add_relative(rows) -> None:
    """Time per kept block of each parity row relative to the ``plain`` row (when it was run)."""
    base = next((r for r in rows if r["case"] == "plain"), None)
    for r in rows:
        if r["case"] not in PARITY:
            continue
        for who in ("ours", "flex"):
            for phase in ("fwd", "fwdbwd"):
                key = f"{who}_{phase}_us_per_kblock"
                r[f"{who}_{phase}_vs_plain"] = r[key] / base[key] if base else float("nan")


def print_parity(row) -> None:
    print(f"{row['case']:7s} S={row['S']:6d} kept={row['kept_blocks']:7d} | "
          + " | ".join(f"{who} fwd {row[who + '_fwd_ms']:7.2f} ms fwd+bwd {row[who + '_fwdbwd_ms']:7.2f} ms"
                       for who in ("ours", "flex"))
          + f" | ours~flex {row['flex_vs_ours_rel_l2']:.1e}", flush=True)


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


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:          # rewritten after every case
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    # the backward is timed by repeating autograd.grad(..., retain_graph=True) over one forward; a
    # compiled FlexAttention backward refuses that with donated buffers (torch >= 2.11)
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES) + list(PARITY))
    p.add_argument("--backend", default="auto", help="parity cases: backend of the public ops (auto, fa4, triton)")
    p.add_argument("--dry-run", action="store_true", help="build the parity cases at tiny shapes on the CPU and check them")
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
    p.add_argument("--rounds", type=int, default=1,
                   help="time FlexAttention and every variant this many times, in reverse order every other "
                        "round, and report medians (A/B comparisons within a run)")
    p.add_argument("--skip-cudnn", action="store_true", help="skip the dense cuDNN reference")
    p.add_argument("--csv", default="benchmark_kernels.csv")
    p.add_argument("--plot", default="benchmark_kernels.png")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.dry_run:
        for name, kept, err in dry_run():
            print(f"{name:7s} kept blocks {kept:5d}  ours vs dense over Flex's token mask: rel. error {err:.1e}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_kernels.py needs a CUDA device")
    from video_sparse_attn.kernels import tuning

    cache = args.tuning_cache or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "tuning_cache.json")
    if os.path.exists(cache):
        os.remove(cache)                                  # families not in the shipped table are measured now
    tuning.configure(cache_path=cache, use_shipped_table=not args.retune)
    rows = []
    for name in args.cases:
        if name in PARITY:
            rows.append(run_parity_case(name, args))
            add_relative(rows)
            print_parity(rows[-1])
            _write_csv(args.csv, rows)
            continue
        row = run_case(name, args)
        rows.append(row)
        print(f"{name:9s} S={row['S']:6d} dens={row['density']:.3f} | fwd ours {row['ours_fwd_ms']:7.2f} ms "
              f"({row['ours_fwd_tflops']:5.0f} TF) flex {row['flex_fwd_ms']:7.2f} cudnn {row['cudnn_fwd_ms']:7.2f} "
              f"({row['cudnn_fwd_tflops']:4.0f} TF) x{row['fwd_vs_flex']:.2f} vs flex | bwd ours {row['ours_bwd_ms']:7.2f} "
              f"({row['ours_bwd_tflops']:4.0f} TF) flex {row['flex_bwd_ms']:7.2f} cudnn ({row['cudnn_bwd_tflops']:4.0f} TF) "
              f"x{row['bwd_vs_flex']:.2f} | flex~ours {row['flex_vs_ours_rel_l2']:.1e} | "
              + " ".join(f"{x} {row[x + '_fwd_ms']:.2f}/{row[x + '_bwd_ms']:.2f}" for x in args.variants), flush=True)
        print_table(row, args.variants)
        _write_csv(args.csv, rows)
    parity = [r for r in rows if r["case"] in PARITY]
    if parity:
        print("\ntime per kept block relative to plain (ours / flex; fwd, fwd+bwd):")
        for r in parity:
            print(f"  {r['case']:7s} ours {r['ours_fwd_vs_plain']:.2f} / {r['ours_fwdbwd_vs_plain']:.2f}   "
                  f"flex {r['flex_fwd_vs_plain']:.2f} / {r['flex_fwdbwd_vs_plain']:.2f}")
    if any(r["case"] not in PARITY for r in rows):
        plot([r for r in rows if r["case"] not in PARITY], args.plot)
    gpu = torch.cuda.get_device_name()
    picked = {k: c for k, c in tuning.load_table(cache).items() if k.startswith(gpu + "|")}
    print(f"\nautotuned configs ({len(picked)}, {cache}; format of kernels/tuned_configs.json):")
    for k, c in sorted(picked.items()):
        print(f"  {k}: {c}")


if __name__ == "__main__":
    main()

"""Check and time the Gluon sm90 attention forward against the Triton forward and cuDNN (H100/H200).

    PYTHONPATH=$PWD python scripts/gluon_probe.py --out DIR

Rows: the block-sparse Gluon forward on a dense plan (``gluon_sparse:dense_plan``), the package's
Triton forward on the same plan (kernel option ``gluon=False``, 384-token blocks) and cuDNN SDPA. The
Gluon row is first checked against float32 attention on random bf16 data (B=1, H=16, D=128, S=4096 and
S=16384, dense plans of 128-token blocks): relative L2 error of ``out`` and max abs error of ``lse``.
Then every row is timed with ``triton.testing.do_bench`` (median) at B=1, H=16, D=128 and S=32640 (85
blocks of 384). TFLOP/s counts 4·S²·D·H.

With ``--sparse``: the block-sparse forward at HunyuanVideo-1.5 720p/121f (thw (31, 45, 80), released
config, 1,985 text tokens of which 1,200 valid, B=1, H=16, D=128, bf16; the mask and plans as
``scripts/benchmark_ssta.py`` builds them). Rows: the Triton backend's forward
(`block_sparse_attention_triton`) with kernel option ``gluon`` True / False on the padded and the
padding-free plan, and `ssta_attention(backend="triton")` end to end (forward, forward+backward) with the
option's default switched. Gluon rows are first checked against ``gluon=False`` on the same inputs
(relative L2 of out < 1e-2, lse max abs over finite rows < 1e-2, the same -inf rows). Effective TFLOP/s
count the padded plan's kept blocks: 4·kept·384²·128 per forward, 3.5× that for forward+backward.

Every row runs in its own child process with a time limit, so a row that fails, or hangs (a barrier
protocol gone wrong in a warp-specialised kernel), is reported and the others still run. Prints a table
and writes ``gluon_probe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isolated_rows import add_arguments, check_text, child, parent, print_table  # noqa: E402
from ssta720p import TEXT, THW  # noqa: E402

ROWS = ["gluon_sparse:dense_plan", "triton:dense_plan", "cudnn"]
CHECK_SEQS = (4096, 16384)
H, D = 16, 128
OUT_TOL, LSE_TOL = 1e-2, 1e-2


def _reference(q, k, v, scale):
    """float32 out (SDPA, math on upcast inputs) and lse (natural log), a few heads at a time."""
    import torch
    import torch.nn.functional as F

    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    for h in range(0, q.shape[1], 4):
        qf, kf, vf = (t[:, h:h + 4].float() for t in (q, k, v))
        out[:, h:h + 4] = F.scaled_dot_product_attention(qf, kf, vf, scale=scale)
        lse[:, h:h + 4] = torch.logsumexp((qf @ kf.transpose(-1, -2)) * scale, dim=-1)
    return out, lse


def _make_fn(row, S):
    """(callable running the row once, q, k, v) on random bf16 data [1, H, S, D]."""
    import torch

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if row in ("triton:dense_plan", "gluon_sparse:dense_plan"):   # the Triton forward / the Gluon block-sparse one
        from video_sparse_attn import BlockSparsePlan
        from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

        n = S // 384
        plan = BlockSparsePlan.dense(1, 1, n, n, 384, device="cuda")
        opts = {"gluon": row.startswith("gluon_sparse")}
        return (lambda: block_sparse_attention_triton(q, k, v, plan, kernel_options=opts)), q, k, v
    if row == "cudnn":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        return run, q, k, v
    raise ValueError(row)


SPARSE_ROWS = ["kernel:gluon", "kernel:triton", "ssta:gluon", "ssta:triton"]


def _sparse_setup():
    """720p inputs, mask, the padded and the padding-free plan (`ssta720p`, as benchmark_ssta.py builds them)."""
    import ssta720p

    p = ssta720p.build(H, D)
    plans = {"padded": ssta720p.padded_plan(p), "padding-free": ssta720p.padding_free_plan(p, "triton")}
    return dict(cfg=p.cfg, q=p.q, k=p.k, v=p.v, tm=p.text_mask, tiled=p.tiled, plans=plans, flop=p.flop(D),
                density=float(p.mask.float().mean()))


def _compare(a, b):
    """(rel L2 of out, lse max abs over finite rows, same -inf rows) of two (out, lse) pairs."""
    import torch

    (o1, l1), (o2, l2) = a, b
    rel = ((o1.float() - o2.float()).norm() / o2.float().norm()).item()
    same_inf = bool(torch.equal(torch.isneginf(l1), torch.isneginf(l2)))
    fin = torch.isfinite(l2)
    lse_err = (l1[fin] - l2[fin]).abs().max().item() if fin.any() else 0.0
    return rel, lse_err, same_inf


def run_sparse_row(row):
    """Child process: one --sparse row (check, then time); returns a dict."""
    import torch
    from triton.testing import do_bench

    from video_sparse_attn import ssta_attention
    from video_sparse_attn.kernels import triton_common
    from video_sparse_attn.kernels.triton_fwd import gluon_usable
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    kind, which = row.split(":")
    gluon = which == "gluon"
    st = _sparse_setup()
    res = {"row": row, "checks": [], "timings": {}, "density": st["density"]}
    bench = lambda f: float(do_bench(f, warmup=30, rep=300, return_mode="median"))   # noqa: E731
    if kind == "kernel":
        tq, tk, tv = st["tiled"]
        for label, plan in st["plans"].items():
            def fwd(g, p=plan):
                return block_sparse_attention_triton(tq, tk, tv, p, kernel_options={"gluon": g})
            with torch.no_grad():
                if gluon:
                    res[f"gluon_used/{label}"] = gluon_usable(tq, tk, tv, plan, triton_common.resolve_kernel_options(None))
                    rel, lse_err, same_inf = _compare(fwd(True), fwd(False))
                    ok = rel < 1e-2 and lse_err < 1e-2 and same_inf
                    res["checks"].append({"seq": label, "out_rel_l2": rel, "lse_max_abs": lse_err, "ok": ok})
                    print(f"  [{row}] {label}: out rel L2 {rel:.2e}, lse max abs {lse_err:.2e}, -inf rows "
                          f"{'same' if same_inf else 'DIFFER'} -> {'ok' if ok else 'FAILED'}", flush=True)
                fwd(gluon)
                torch.cuda.synchronize()
                res["timings"][f"{label}/fwd"] = (bench(lambda: fwd(gluon)), 1.0)
    else:
        q, k, v, tm, cfg = st["q"], st["k"], st["v"], st["tm"], st["cfg"]
        triton_common._DEFAULTS["gluon"] = gluon
        args = (THW, cfg, TEXT, tm)
        if gluon:
            with torch.no_grad():
                a = ssta_attention(q, k, v, *args, backend="triton", return_lse=True)
                triton_common._DEFAULTS["gluon"] = False
                b = ssta_attention(q, k, v, *args, backend="triton", return_lse=True)
                triton_common._DEFAULTS["gluon"] = True
            rel, lse_err, same_inf = _compare(a, b)
            ok = rel < 1e-2 and lse_err < 1e-2 and same_inf
            res["checks"].append({"seq": "ssta", "out_rel_l2": rel, "lse_max_abs": lse_err, "ok": ok})
            print(f"  [{row}] ssta: out rel L2 {rel:.2e}, lse max abs {lse_err:.2e} -> {'ok' if ok else 'FAILED'}",
                  flush=True)
        with torch.no_grad():
            f = lambda: ssta_attention(q, k, v, *args, backend="triton")   # noqa: E731
            f()
            res["timings"]["ssta/fwd"] = (bench(f), 1.0)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        g = torch.randn_like(q)

        def fb():
            for x in (qg, kg, vg):
                x.grad = None
            ssta_attention(qg, kg, vg, *args, backend="triton").backward(g)
        fb()
        torch.cuda.synchronize()
        res["timings"]["ssta/fwd+bwd"] = (bench(fb), 3.5)
    if gluon:
        res["correct"] = all(c["ok"] for c in res["checks"])
    res["timings"] = {name: {"ms": ms, "tflops": mult * st["flop"] / ms / 1e9} for name, (ms, mult) in res["timings"].items()}
    return res


def print_sparse_table(results):
    def lines(r):
        chk = check_text(r, lambda c: f"{c['seq']}: {c['out_rel_l2']:.1e}/{c['lse_max_abs']:.1e}")
        used = {k: v for k, v in r.items() if k.startswith("gluon_used/")}
        if used:
            chk += " used: " + ", ".join(f"{k[11:]}={v}" for k, v in used.items())
        for i, (name, t) in enumerate(r["timings"].items()):
            yield r["row"], name, f"{t['ms']:.3f}", f"{t['tflops']:.1f}", chk if i == 0 else ""

    print_table(results, [("row", 16, "<"), ("what", 24, "<"), ("ms", 9, ">"), ("eff TF", 8, ">")], lines)


def run_row(row, bench_seq):
    """Child process: check (Gluon rows) and time one row; returns a dict."""
    import torch
    from triton.testing import do_bench

    res = {"row": row, "checks": [], "seq": bench_seq}
    if row.startswith("gluon_sparse:"):   # checked on dense plans of 128-token blocks against float32 attention
        from video_sparse_attn import BlockSparsePlan
        from video_sparse_attn.kernels.gluon_fwd import gluon_sparse_forward

        def g(q, k, v):
            n = q.shape[2] // 128
            return gluon_sparse_forward(q, k, v, BlockSparsePlan.dense(1, 1, n, n, 128, device="cuda"), D ** -0.5)
        for S in CHECK_SEQS:
            torch.manual_seed(1)
            q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            scale = D ** -0.5
            out, lse = g(q, k, v)
            torch.cuda.synchronize()
            ref_out, ref_lse = _reference(q, k, v, scale)
            rel = ((out.float() - ref_out).norm() / ref_out.norm()).item()
            lse_err = (lse - ref_lse).abs().max().item()
            ok = rel < OUT_TOL and lse_err < LSE_TOL and bool(torch.isfinite(out).all())
            res["checks"].append({"seq": S, "out_rel_l2": rel, "lse_max_abs": lse_err, "ok": ok})
            print(f"  [{row}] S={S}: out rel L2 {rel:.2e}, lse max abs {lse_err:.2e} -> {'ok' if ok else 'FAILED'}",
                  flush=True)
            del q, k, v, out, lse, ref_out, ref_lse
        res["correct"] = all(c["ok"] for c in res["checks"])
    fn, q, *_ = _make_fn(row, bench_seq)
    fn()
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=50, rep=400, return_mode="median")
    flops = 4.0 * bench_seq * bench_seq * D * H
    res.update(ms=ms, tflops=flops / ms / 1e9)
    return res


def main():
    ap = argparse.ArgumentParser()
    add_arguments(ap, ROWS, "seconds per row (child process); default 100, 120 with --sparse")
    ap.add_argument("--sparse", action="store_true", help="the block-sparse rows at 720p (SPARSE_ROWS)")
    args = ap.parse_args()
    if args.sparse and args.rows == ROWS:
        args.rows = SPARSE_ROWS
    if args.row_timeout is None:
        args.row_timeout = 120.0 if args.sparse else 100.0

    if args.child:
        child(lambda: run_sparse_row(args.child) if args.sparse else run_row(args.child, args.seq), args.child)
        return

    extra = ["--seq", str(args.seq)] + (["--sparse"] if args.sparse else [])
    parent(__file__, args.rows, extra, args, H, D, print_sparse_table if args.sparse else _table,
           "gluon_probe_sparse.json" if args.sparse else "gluon_probe.json")


def _table(results):
    def lines(r):
        chk = check_text(r, lambda c: f"S={c['seq']}: {c['out_rel_l2']:.1e}/{c['lse_max_abs']:.1e}")
        yield r["row"], f"{r['ms']:.3f}", f"{r['tflops']:.1f}", chk

    print_table(results, [("row", 24, "<"), ("ms", 9, ">"), ("TFLOP/s", 9, ">")], lines)


if __name__ == "__main__":
    main()

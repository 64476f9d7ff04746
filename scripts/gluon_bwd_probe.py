"""Check and time the Gluon sm90 attention backward prototype against the Triton backward and cuDNN (H100/H200).

    PYTHONPATH=$PWD python scripts/gluon_bwd_probe.py --out DIR [--sparse]

Rows (each in its own child process with a time limit, so a failing or hanging row, e.g. a barrier
protocol gone wrong, is reported and the others still run):

* ``gluon:atomic`` / ``gluon:tma`` (`video_sparse_attn.kernels.gluon_bwd`, dQ by atomics / by TMA
  reduce-add): first checked against float32 autograd of SDPA on random bf16 data (B=1, H=16, D=128,
  S=4096 and 16384): relative L2 error of dq, dk, dv (tolerance 1e-2 each); then the backward alone
  (given out / lse of a forward) timed at S=32640.
* ``triton:dense_plan``: the package's Triton backward (`triton_bwd.attention_backward`, default
  options: single pass, dQ atomics) on a dense plan of 384-token blocks, called directly.
* ``cudnn``: cuDNN SDPA forward+backward minus its forward.

Times are ``triton.testing.do_bench`` medians; TFLOP/s count 10·S²·D·H (2.5× the forward's 4·S²·D·H).
``--sparse`` adds rows on the padded SSTA plan at 720p/121f (as `benchmark_ssta.py` builds it): the
Gluon backward checked against the Triton backward on that plan (rel. L2), and both timed; TFLOP/s
count 10·kept·384²·D. Prints a table and writes ``gluon_bwd_probe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from isolated_rows import add_arguments, check_text, child, parent, print_table  # noqa: E402

ROWS = ["gluon:atomic", "gluon:tma", "triton:dense_plan", "cudnn"]
SPARSE_ROWS = ["sparse:gluon:atomic", "sparse:gluon:tma", "sparse:triton"]
CHECK_SEQS = (4096, 16384)
H, D = 16, 128
TOL = 1e-2


def _inputs(S, seed):
    import torch

    torch.manual_seed(seed)
    q, k, v, do = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    return q, k, v, do


def _forward(q, k, v, scale):
    """out and lse (natural log) from the Gluon forward on a dense plan of 128-token blocks, else float32 math."""
    import torch

    try:
        from video_sparse_attn import BlockSparsePlan
        from video_sparse_attn.kernels.gluon_fwd import gluon_sparse_forward

        n = q.shape[2] // 128
        return gluon_sparse_forward(q, k, v, BlockSparsePlan.dense(1, 1, n, n, 128, device="cuda"), scale)
    except Exception:  # noqa: BLE001 - any forward will do
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        return (torch.softmax(s, -1) @ v.float()).to(q.dtype), torch.logsumexp(s, -1)


def _reference_grads(q, k, v, do, scale):
    """float32 autograd of SDPA, four heads at a time."""
    import torch
    import torch.nn.functional as F

    grads = [torch.empty(q.shape, device=q.device, dtype=torch.float32) for _ in range(3)]
    for h in range(0, q.shape[1], 4):
        qf, kf, vf = (t[:, h:h + 4].float().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qf, kf, vf, scale=scale)
        out.backward(do[:, h:h + 4].float())
        for g, t in zip(grads, (qf, kf, vf)):
            g[:, h:h + 4] = t.grad
        del qf, kf, vf, out
    return grads


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dense_row(row, S):
    """(callable timing the row's backward, flops) at sequence length S."""
    import torch

    q, k, v, do = _inputs(S, 0)
    scale = D ** -0.5
    flops = 10.0 * S * S * D * H
    if row.startswith("gluon:"):
        from video_sparse_attn.kernels.gluon_bwd import gluon_attention_backward

        out, lse = _forward(q, k, v, scale)
        mode = row.split(":")[1]
        return (lambda: gluon_attention_backward(q, k, v, out, do, lse, scale, dq_reduce=mode)), flops
    if row == "triton:dense_plan":
        from video_sparse_attn import BlockSparsePlan
        from video_sparse_attn.kernels.triton_bwd import attention_backward
        from video_sparse_attn.kernels.triton_common import resolve_kernel_options
        from video_sparse_attn.kernels.triton_fwd import attention_forward

        n = S // 384
        plan = BlockSparsePlan.dense(1, 1, n, n, 384, device="cuda")
        opts = resolve_kernel_options(None)
        out, lse = attention_forward(q, k, v, plan, scale, opts)
        return (lambda: attention_backward(q, k, v, out, lse, do, plan, scale, opts)), flops
    if row == "cudnn":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from triton.testing import do_bench

        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def fwd():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qg, kg, vg, scale=scale)

        def fwd_bwd():
            for t in (qg, kg, vg):
                t.grad = None
            fwd().backward(do)

        fwd_bwd()
        with torch.no_grad():
            t_fwd = do_bench(fwd, warmup=25, rep=200, return_mode="median")
        return ("minus", fwd_bwd, t_fwd), flops
    raise ValueError(row)


def _sparse_setup():
    """q/k/v/dout on the padded SSTA plan at 720p/121f (`ssta720p`; block-ordered tensors), the plan and its
    backward flops."""
    import torch

    import ssta720p

    p = ssta720p.build(H, D)
    q_t, k_t, v_t = (x.contiguous() for x in p.tiled)
    return q_t, k_t, v_t, torch.randn_like(q_t), ssta720p.padded_plan(p), 2.5 * p.flop(D), float(p.mask.float().mean())


def _sparse_row(row, res):
    from video_sparse_attn.kernels.gluon_bwd import gluon_attention_backward, step_table
    from video_sparse_attn.kernels.triton_bwd import attention_backward
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options
    from video_sparse_attn.kernels.triton_fwd import attention_forward

    q, k, v, do, plan, flops, density = _sparse_setup()
    scale = D ** -0.5
    opts = resolve_kernel_options(None)
    out, lse = attention_forward(q, k, v, plan, scale, opts)
    out = out.contiguous()
    res.update(seq=q.shape[2], density=density)
    triton_fn = lambda: attention_backward(q, k, v, out, lse, do, plan, scale, opts)   # noqa: E731
    if row == "sparse:triton":
        return triton_fn, flops
    mode = row.split(":")[2]
    steps = step_table(plan)
    fn = lambda: gluon_attention_backward(q, k, v, out, do, lse, scale, plan=plan, dq_reduce=mode,  # noqa: E731
                                          steps=steps)
    got, ref = fn(), triton_fn()
    errs = [_rel(a, b) for a, b in zip(got, ref)]
    ok = all(e < TOL for e in errs)
    res["checks"] = [{"seq": q.shape[2], "vs": "triton", "dq": errs[0], "dk": errs[1], "dv": errs[2], "ok": ok}]
    res["correct"] = ok
    print(f"  [{row}] vs Triton backward: dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e} -> "
          f"{'ok' if ok else 'FAILED'}", flush=True)
    return fn, flops


def run_row(row, bench_seq):
    """Child process: check (Gluon rows) and time one row; returns a dict."""
    import torch
    from triton.testing import do_bench

    res = {"row": row, "checks": [], "seq": bench_seq}
    if row.startswith("gluon:"):
        from video_sparse_attn.kernels.gluon_bwd import gluon_attention_backward

        mode = row.split(":")[1]
        for S in CHECK_SEQS:
            q, k, v, do = _inputs(S, 1)
            scale = D ** -0.5
            out, lse = _forward(q, k, v, scale)
            got = gluon_attention_backward(q, k, v, out, do, lse, scale, dq_reduce=mode)
            torch.cuda.synchronize()
            ref = _reference_grads(q, k, v, do, scale)
            errs = [_rel(a, b) for a, b in zip(got, ref)]
            finite = all(bool(torch.isfinite(g).all()) for g in got)
            ok = finite and all(e < TOL for e in errs)
            res["checks"].append({"seq": S, "dq": errs[0], "dk": errs[1], "dv": errs[2], "ok": ok})
            print(f"  [{row}] S={S}: rel L2 dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e} -> "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
            del q, k, v, do, out, lse, got, ref
            torch.cuda.empty_cache()
        res["correct"] = all(c["ok"] for c in res["checks"])
    if row.startswith("sparse:"):
        fn, flops = _sparse_row(row, res)
    else:
        fn, flops = _dense_row(row, bench_seq)
    if isinstance(fn, tuple):            # (minus, fwd+bwd callable, forward ms)
        _, fb, t_fwd = fn
        ms = do_bench(fb, warmup=25, rep=300, return_mode="median") - t_fwd
        res["fwd_ms"] = t_fwd
    else:
        fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=25, rep=300, return_mode="median")
    res.update(ms=ms, tflops=flops / ms / 1e9)
    return res


def main():
    ap = argparse.ArgumentParser()
    add_arguments(ap, None, "seconds per row (child process)", 90.0)
    ap.add_argument("--sparse", action="store_true", help="add the 720p/121f SSTA plan rows")
    args = ap.parse_args()

    if args.child:
        child(lambda: run_row(args.child, args.seq), args.child)
        return

    rows = args.rows or (ROWS + (SPARSE_ROWS if args.sparse else []))
    parent(__file__, rows, ["--seq", str(args.seq)], args, H, D, _table, "gluon_bwd_probe.json")


def _table(results):
    def lines(r):
        chk = check_text(r, lambda c: f"S={c['seq']}: {c['dq']:.1e}/{c['dk']:.1e}/{c['dv']:.1e}")
        yield r["row"], str(r["seq"]), f"{r['ms']:.3f}", f"{r['tflops']:.1f}", chk

    print_table(results, [("row", 24, "<"), ("S", 7, ">"), ("bwd ms", 9, ">"), ("TFLOP/s", 9, ">")], lines,
                "check (rel L2 dq/dk/dv)")


if __name__ == "__main__":
    main()

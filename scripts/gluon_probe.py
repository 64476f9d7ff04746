"""Check and time the Gluon sm90 attention forward prototype against the Triton forward and cuDNN (H100/H200).

    PYTHONPATH=$PWD python scripts/gluon_probe.py --out DIR

Rows: each Gluon schedule (`video_sparse_attn.kernels.gluon_fwd.SCHEDULES`, plus ``ws_pingpong`` with a
3-deep K/V ring), the package's Triton forward on a dense plan (``backend="triton"``, 384-token blocks)
and cuDNN SDPA. Gluon rows are first checked against float32 attention on random bf16 data (B=1, H=16,
D=128, S=4096 and S=16384): relative L2 error of ``out`` and max abs error of ``lse``. Then every row is
timed with ``triton.testing.do_bench`` (median) at B=1, H=16, D=128 and S=32640 (85 blocks of 384: the
Triton row needs whole 384-token blocks, the Gluon kernels multiples of 128; all rows use the same S).
TFLOP/s counts 4·S²·D·H.

Every row runs in its own child process with a time limit, so a row that fails, or hangs (a barrier
protocol gone wrong in a warp-specialised kernel), is reported and the others still run. Prints a table
and writes ``gluon_probe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROWS = ["gluon:pipelined", "gluon:ws", "gluon:ws_pingpong", "gluon:ws_pingpong:3", "triton:dense_plan", "cudnn"]
CHECK_SEQS = (4096, 16384)
H, D = 16, 128
OUT_TOL, LSE_TOL = 1e-2, 1e-2


def _gluon_fn(row):
    from video_sparse_attn.kernels.gluon_fwd import gluon_attention_forward

    parts = row.split(":")
    schedule = parts[1]
    stages = int(parts[2]) if len(parts) > 2 else None
    return lambda q, k, v: gluon_attention_forward(q, k, v, schedule=schedule, stages=stages)


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
    if row.startswith("gluon:"):
        g = _gluon_fn(row)
        return (lambda: g(q, k, v)), q, k, v
    if row == "triton:dense_plan":
        from video_sparse_attn import BlockSparsePlan, block_sparse_attention

        n = S // 384
        plan = BlockSparsePlan.dense(1, 1, n, n, 384, device="cuda")
        return (lambda: block_sparse_attention(q, k, v, plan, backend="triton")), q, k, v
    if row == "cudnn":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)
        return run, q, k, v
    raise ValueError(row)


def run_row(row, bench_seq):
    """Child process: check (Gluon rows) and time one row; returns a dict."""
    import torch
    from triton.testing import do_bench

    res = {"row": row, "checks": [], "seq": bench_seq}
    if row.startswith("gluon:"):
        g = _gluon_fn(row)
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
    ap.add_argument("--out", default=".")
    ap.add_argument("--seq", type=int, default=85 * 384, help="timing sequence length (multiple of 384)")
    ap.add_argument("--rows", nargs="*", default=ROWS)
    ap.add_argument("--row-timeout", type=float, default=100.0, help="seconds per row (child process)")
    ap.add_argument("--budget", type=float, default=225.0, help="seconds for all rows; later rows are skipped")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        try:
            res = run_row(args.child, args.seq)
        except Exception as e:  # noqa: BLE001 - reported by the parent
            import traceback

            traceback.print_exc()
            res = {"row": args.child, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print("RESULT " + json.dumps(res), flush=True)
        return

    import torch
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "seq": args.seq,
            "heads": H, "head_dim": D}
    print(f"torch {info['torch']}, triton {info['triton']}, {info['device']}; timing at B=1 H={H} "
          f"S={args.seq} D={D}", flush=True)
    t0 = time.time()
    results = []
    for row in args.rows:
        left = args.budget - (time.time() - t0)
        if left < 15:
            results.append({"row": row, "error": "skipped: time budget spent"})
            print(f"[{row}] skipped (time budget)", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--seq", str(args.seq)]
        print(f"[{row}] ...", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.row_timeout, left))
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            for ln in p.stdout.splitlines():
                if not ln.startswith("RESULT "):
                    print(ln)
            if lines:
                res = json.loads(lines[-1][len("RESULT "):])
            else:
                res = {"row": row, "error": f"child exited {p.returncode}: {p.stderr[-2000:]}"}
            if "error" in res and p.stderr:
                print(p.stderr[-3000:])
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            print(out)
            res = {"row": row, "error": f"timed out after {e.timeout:.0f} s (hang or slow compile)"}
        results.append(res)
        if "error" in res:
            print(f"[{row}] ERROR: {res['error'][:500]}", flush=True)
        elif row.startswith("gluon:") and not res.get("correct", False):
            print(f"[{row}] FAILED correctness (timed anyway)", flush=True)

    print()
    print(f"{'row':24s} {'ms':>9s} {'TFLOP/s':>9s}  check")
    for r in results:
        if "error" in r:
            print(f"{r['row']:24s} {'-':>9s} {'-':>9s}  error: {r['error'][:80]}")
            continue
        chk = "" if "correct" not in r else ("ok" if r["correct"] else "FAILED") + " (" + ", ".join(
            f"S={c['seq']}: {c['out_rel_l2']:.1e}/{c['lse_max_abs']:.1e}" for c in r["checks"]) + ")"
        print(f"{r['row']:24s} {r['ms']:9.3f} {r['tflops']:9.1f}  {chk}")
    print(f"total {time.time() - t0:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gluon_probe.json")
    with open(path, "w") as f:
        json.dump({"info": info, "rows": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

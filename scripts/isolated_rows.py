"""Run benchmark rows each in its own child process, so that one that fails, crashes or hangs (a
barrier protocol gone wrong in a warp-specialised kernel) is reported and the others still run.

The child is the calling script itself with ``--child ROW`` (plus the caller's extra arguments); it
prints one line ``RESULT {json}`` (a dict with at least ``row``); any other output is passed through.
Used by `gluon_probe.py` and `gluon_bwd_probe.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List, Sequence


def run_rows(script: str, rows: Sequence[str], extra_args: Sequence[str], budget_s: float, row_timeout_s: float,
             t0: float) -> List[dict]:
    """One child process per row, within ``budget_s`` seconds counted from ``t0`` (rows that would
    start with less than 15 s left are skipped) and ``row_timeout_s`` per row. Returns the rows'
    results (an ``error`` key where a row failed, timed out or was skipped)."""
    results = []
    for row in rows:
        left = budget_s - (time.time() - t0)
        if left < 15:
            results.append({"row": row, "error": "skipped: time budget spent"})
            print(f"[{row}] skipped (time budget)", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(script), "--child", row, *extra_args]
        print(f"[{row}] ...", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(row_timeout_s, left))
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
        elif "correct" in res and not res["correct"]:
            print(f"[{row}] FAILED correctness (timed anyway)", flush=True)
    return results


def child(run, row: str) -> None:
    """The child side: ``run()`` returns the row's result dict; print it as the ``RESULT`` line (or the
    error, with its traceback on stderr)."""
    try:
        res = run()
    except Exception as e:  # noqa: BLE001 - reported by the parent
        import traceback

        traceback.print_exc()
        res = {"row": row, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    print("RESULT " + json.dumps(res), flush=True)


def check_text(result: dict, item) -> str:
    """A row's check column: "" when it was not checked, else "ok" / "FAILED" and ``item(check)`` of each
    of its ``checks``."""
    if "correct" not in result:
        return ""
    return ("ok" if result["correct"] else "FAILED") + " (" + ", ".join(item(c) for c in result["checks"]) + ")"


def print_table(results: Sequence[dict], columns: Sequence[tuple], lines, check_title: str = "check") -> None:
    """The probes' result table: a header of ``columns`` (``(title, width, "<" or ">")``) and the check
    column, then per result the lines ``lines(result)`` gives (each its cells, the check text last), or
    for a row that failed to run its name, dashes and the error."""
    def fmt(cells):
        return " ".join(f"{c:{align}{width}s}" for c, (_, width, align) in zip(cells, columns))

    print(fmt([title for title, *_ in columns]) + "  " + check_title)
    for r in results:
        if "error" in r:
            print(fmt([r["row"]] + ["-"] * (len(columns) - 1)) + f"  error: {r['error'][:80]}")
            continue
        for *cells, check in lines(r):
            print(fmt(cells) + "  " + check)


def add_arguments(ap, rows, row_timeout_help: str, row_timeout=None) -> None:
    """The options every probe built on this takes: ``--out``, ``--seq``, ``--rows`` (default ``rows``),
    ``--row-timeout``, ``--budget`` and the hidden ``--child``."""
    import argparse

    ap.add_argument("--out", default=".")
    ap.add_argument("--seq", type=int, default=85 * 384, help="timing sequence length (multiple of 384)")
    ap.add_argument("--rows", nargs="*", default=rows)
    ap.add_argument("--row-timeout", type=float, default=row_timeout, help=row_timeout_help)
    ap.add_argument("--budget", type=float, default=230.0, help="seconds for all rows; later rows are skipped")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)


def parent(script: str, rows: Sequence[str], extra_args: Sequence[str], args, heads: int, head_dim: int,
           table, json_name: str) -> List[dict]:
    """The parent side: print the setup, `run_rows`, print ``table(results)`` and the total time, and write
    ``{"info", "rows"}`` as ``json_name`` under ``args.out``. Returns the results."""
    import torch
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "seq": args.seq,
            "heads": heads, "head_dim": head_dim}
    print(f"torch {info['torch']}, triton {info['triton']}, {info['device']}; timing at B=1 H={heads} "
          f"S={args.seq} D={head_dim}", flush=True)
    t0 = time.time()
    results = run_rows(script, rows, extra_args, args.budget, args.row_timeout, t0)
    print()
    table(results)
    print(f"total {time.time() - t0:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, json_name)
    with open(path, "w") as f:
        json.dump({"info": info, "rows": results}, f, indent=1)
    print(f"wrote {path}")
    return results

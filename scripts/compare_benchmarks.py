#!/usr/bin/env python
"""Guard the kernels' speed: compare a `scripts/benchmark_kernels.py` CSV with a recorded baseline.

Raw milliseconds drift between runs (clocks, temperature), so each variant is compared through its
time relative to FlexAttention measured in the same run (``<variant>_fwd_ms / flex_fwd_ms``, the same
for bwd). A variant whose relative time grew by more than ``--tolerance`` in some case is a
regression; the exit status is 1 then, else 0. Cases and variants missing from either file are listed
as such and skipped.

    python scripts/compare_benchmarks.py benchmarks/kernels_h200_v7.csv out/bench.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Dict, List, Tuple

REFERENCE = "flex"
SKIP = {"flex", "cudnn", "ours"}          # "ours" repeats the default variant


def relative_times(path: str) -> Dict[Tuple[str, str], float]:
    """``{(case, "<variant>_<fwd|bwd>"): variant ms / FlexAttention ms}`` of one CSV."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                for phase in ("fwd", "bwd"):
                    suffix = f"_{phase}_ms"
                    if not key.endswith(suffix) or key[:-len(suffix)] in SKIP:
                        continue
                    ref = row.get(f"{REFERENCE}{suffix}")
                    try:
                        mine, base = float(value), float(ref)
                    except (TypeError, ValueError):
                        continue
                    if mine == mine and base == base and base > 0:       # not NaN
                        out[(row["case"], key[:-3])] = mine / base
    return out


def compare(base_path: str, new_path: str, tolerance: float) -> Tuple[List[str], List[str]]:
    """Report lines and the regressions among them."""
    base, new = relative_times(base_path), relative_times(new_path)
    lines, regressions = [], []
    for key in sorted(set(base) | set(new)):
        case, column = key
        if key not in base or key not in new:
            lines.append(f"{case:12s} {column:16s} only in {'the baseline' if key in base else 'the new run'}")
            continue
        change = new[key] / base[key] - 1.0
        line = (f"{case:12s} {column:16s} x Flex time {base[key]:.3f} -> {new[key]:.3f} "
                f"({change:+.1%})")
        if change > tolerance:
            line += "  REGRESSION"
            regressions.append(line)
        lines.append(line)
    return lines, regressions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("baseline")
    p.add_argument("new")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed growth of the time relative to Flex")
    args = p.parse_args(argv)
    lines, regressions = compare(args.baseline, args.new, args.tolerance)
    print("\n".join(lines))
    print(f"{len(regressions)} regression(s) over {args.tolerance:.0%}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/compare_benchmarks.py flags a variant whose time relative to FlexAttention grew past the
tolerance, and only that; the recorded baseline parses."""

import csv
import os

import pytest

from helpers import load_script

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


@pytest.fixture(scope="module")
def cmp():
    return load_script("compare_benchmarks.py")


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_regression_is_relative_to_flex(cmp, tmp_path):
    base = _csv(tmp_path / "a.csv", [{"case": "c", "flex_fwd_ms": 10, "flex_bwd_ms": 20, "tma_fwd_ms": 8,
                                      "tma_bwd_ms": 18, "ptr_fwd_ms": 9, "ptr_bwd_ms": "nan", "cudnn_fwd_ms": 5}])
    # everything 20% slower, Flex too (a slower clock): no regression
    same = _csv(tmp_path / "b.csv", [{"case": "c", "flex_fwd_ms": 12, "flex_bwd_ms": 24, "tma_fwd_ms": 9.6,
                                      "tma_bwd_ms": 21.6, "ptr_fwd_ms": 10.8, "ptr_bwd_ms": 30, "cudnn_fwd_ms": 9}])
    assert cmp.main([base, same]) == 0
    # the pointer path's forward 10% slower against the same Flex: flagged, nothing else
    slow = _csv(tmp_path / "c.csv", [{"case": "c", "flex_fwd_ms": 10, "flex_bwd_ms": 20, "tma_fwd_ms": 8,
                                      "tma_bwd_ms": 18.5, "ptr_fwd_ms": 9.9, "ptr_bwd_ms": 20, "cudnn_fwd_ms": 5}])
    lines, regressions = cmp.compare(base, slow, 0.05)
    assert len(regressions) == 1 and "ptr_fwd" in regressions[0]
    assert any("ptr_bwd" in line and "only in the new run" in line for line in lines)   # NaN in the baseline
    assert cmp.main([base, slow]) == 1 and cmp.main([base, slow, "--tolerance", "0.2"]) == 0


def test_recorded_baseline_parses(cmp):
    times = cmp.relative_times(os.path.join(ROOT, "benchmarks", "kernels_h200_v7.csv"))
    assert {"tma_fwd", "tma_bwd", "ptr_fwd", "ptr_bwd"} <= {col for _, col in times}
    assert all(0.3 < r < 3 for r in times.values())

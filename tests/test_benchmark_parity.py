"""scripts/benchmark_kernels.py's parity cases (GQA, varlen, causal beside FlexAttention) build on the CPU
at tiny shapes, and our op matches dense attention over the token mask Flex would be given."""

import os

import pytest

from helpers import load_script

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "benchmark_kernels.py")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_kernels.py")


def test_parity_cases_dry_run(bench):
    rows = {name: (kept, err) for name, kept, err in bench.dry_run()}
    assert set(rows) == {"plain", "gqa", "causal", "varlen", "varlen_plan"}
    for name, (kept, err) in rows.items():
        assert kept > 0 and err < 1e-5, (name, kept, err)
    assert rows["causal"][0] < rows["plain"][0]          # blocks above the diagonal are dropped
    st = bench.parity_setup("gqa", device="cpu", dim=16, tiny=True, backend="torch")
    assert st["gqa"] and st["flex_qkv"][1].shape[1] < st["flex_qkv"][0].shape[1]


def test_parity_relative_times(bench):
    rows = [{"case": "plain", "ours_fwd_us_per_kblock": 2.0, "ours_fwdbwd_us_per_kblock": 4.0,
             "flex_fwd_us_per_kblock": 3.0, "flex_fwdbwd_us_per_kblock": 6.0},
            {"case": "gqa", "ours_fwd_us_per_kblock": 3.0, "ours_fwdbwd_us_per_kblock": 4.0,
             "flex_fwd_us_per_kblock": 3.0, "flex_fwdbwd_us_per_kblock": 12.0}]
    bench.add_relative(rows)
    assert rows[1]["ours_fwd_vs_plain"] == 1.5 and rows[1]["flex_fwdbwd_vs_plain"] == 2.0


@pytest.mark.parametrize("name", ["gqa", "causal", "varlen", "varlen_plan"])
def test_parity_case_equals_flex_over_its_mask_mod(bench, name):
    """FlexAttention (eager, CPU) over the case's mask_mod computes what our op does."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    st = bench.parity_setup(name, device="cpu", dtype=torch.float32, dim=16, tiny=True, backend="torch")
    q, k, v = st["flex_qkv"]
    mask = create_block_mask(st["mask_mod"], 1, q.shape[1], st["S"], st["S"], device="cpu")
    ref = flex_attention(q, k, v, block_mask=mask, enable_gqa=st["gqa"])
    out = st["to_flex"](st["ours"]())
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_rounds_below_one_is_a_usage_error():
    """``--rounds 0`` would time nothing and then fail taking a median: refused as one usage line."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, SCRIPT, "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].endswith("--rounds must be at least 1, got 0")
    assert "Traceback" not in p.stderr


def test_profile_script_refuses_an_unknown_backend():
    """scripts/profile_ssta.py: an unknown backend is one usage line naming the known ones (not a
    KeyError after the 720p problem was built)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "profile_ssta.py")
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), os.pardir)}
    p = subprocess.run([sys.executable, script, "--backends", "nope"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "unknown backends ['nope']" in p.stderr.strip().splitlines()[-1]


def test_natural_order_variant(bench):
    """Variant ``natural``: the same plan walked in block order (ascending row / col orders, broadcast
    shapes kept), the kept lists untouched; our op gives the same output as with heaviest first."""
    import torch

    from video_sparse_attn import block_sparse_attention
    from video_sparse_attn.plan import BlockSparsePlan

    torch.manual_seed(0)
    plan = BlockSparsePlan.from_block_mask(torch.rand(1, 2, 5, 5) < 0.5, 64, 64)
    nat = bench.natural_order(plan)
    assert not torch.equal(plan.row_order, nat.row_order) or not torch.equal(plan.col_order, nat.col_order)
    for got, ref in ((nat.row_order, plan.row_order), (nat.col_order, plan.col_order)):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got, torch.arange(ref.shape[-1], dtype=ref.dtype).expand(ref.shape))
    assert torch.equal(nat.kv_index, plan.kv_index) and torch.equal(nat.q_index, plan.q_index)
    assert bench.VARIANTS["natural"][2:] == ("natural",)
    q, k, v = (torch.randn(1, 2, 320, 32) for _ in range(3))
    out, _ = block_sparse_attention(q, k, v, plan, backend="torch")
    out_nat, _ = block_sparse_attention(q, k, v, nat, backend="torch")
    assert torch.allclose(out, out_nat)

"""Gluon sm90 forward prototype: import guard, its algorithm (torch, any device), sm90 compilation
without a GPU (needs Gluon) and, on a Hopper GPU, the kernels themselves."""

import pytest
import torch

from video_sparse_attn.kernels import gluon_fwd as gf


def _dense(q, k, v, scale):
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.float(), torch.logsumexp(s, -1)


def test_import_without_gluon_is_safe():
    assert isinstance(gf.HAS_GLUON, bool)
    if not gf.HAS_GLUON:
        with pytest.raises(RuntimeError):
            gf.gluon_attention_forward(*(torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16),) * 3)


@pytest.mark.parametrize("block_n", [128, 64])
def test_gluon_tile_loop_reference_matches_dense(block_n):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64, dtype=torch.bfloat16) * 2 for _ in range(3))
    out, lse = gf.tile_loop_reference(q, k, v, block_n=block_n)
    ref_out, ref_lse = _dense(q, k, v, 64 ** -0.5)
    assert ((out.float() - ref_out).norm() / ref_out.norm()) < 1e-2
    assert (lse - ref_lse).abs().max() < 1e-4


@pytest.mark.skipif(not gf.HAS_GLUON, reason="needs Triton with Gluon")
def test_gluon_compiles_for_sm90():
    """Every schedule compiles for sm90 without a GPU, with no stack (spills) and within 227 KiB of
    shared memory. In a child process: the CPU suite runs Triton's interpreter, Gluon has none."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(root / "scripts" / "gluon_compile_check.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    shared = [int(x) for x in re.findall(r"shared=(\d+) B", p.stdout)]
    stacks = re.findall(r"STACK:(\d+)", p.stdout)
    assert len(shared) == len(gf.SCHEDULES) and len(stacks) >= len(gf.SCHEDULES), p.stdout
    assert all(x <= 232448 for x in shared) and all(st == "0" for st in stacks), p.stdout


@pytest.mark.skipif(not (torch.cuda.is_available() and gf.HAS_GLUON
                         and torch.cuda.get_device_capability()[0] == 9), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("schedule", gf.SCHEDULES)
@pytest.mark.parametrize("head_dim", [128, 64])
def test_gluon_forward_gpu(schedule, head_dim):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = gf.gluon_attention_forward(q, k, v, schedule=schedule)
    ref_out, ref_lse = _dense(q, k, v, head_dim ** -0.5)
    assert ((out.float() - ref_out).norm() / ref_out.norm()) < 1e-2
    assert (lse - ref_lse).abs().max() < 1e-2

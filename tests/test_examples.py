"""The examples run as shipped (CPU, offline, tiny models) and their exact modes match the stock result."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _run(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the output:\n{text}"
    return float(m.group(1))


def test_set_attn_processor_example():
    out = _run("set_attn_processor.py")
    assert _number(r"all blocks kept vs stock: max abs diff ([0-9.e+-]+)", out) < 1e-4
    assert 0 < _number(r"sparse vs stock: relative L2 ([0-9.e+-]+)", out) < 1


def test_ssta_attention_direct_example():
    out = _run("ssta_attention_direct.py")
    assert _number(r"exact mode vs dense SDPA: max abs diff ([0-9.e+-]+)", out) < 1e-4
    assert 0 < _number(r"density ([0-9.]+)", out) < 1


def test_enable_ssta_schedule_example():
    out = _run("enable_ssta_schedule.py")
    assert "step 2, layer 1" in out and "ssta" in out

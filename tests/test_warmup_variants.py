"""The warm-up compiles every Triton kernel variant a real SSTA call compiles (CPU, no GPU needed).

`kernels.variants` runs the package's launch code on meta tensors with the decisions an sm90 GPU takes
and records Triton's specialisation key of each launch instead of compiling. Triton's interpreter
(set for the CPU test run) has no keys, so the enumeration runs in a fresh process without it.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CODE = r"""
import json, sys, torch
from video_sparse_attn.kernels import variants as V
import video_sparse_attn.warmup  # noqa: F401
warmup_module = sys.modules["video_sparse_attn.warmup"]

def names(vs):
    return sorted(V.describe(vs))

out = {}
for H, D, thw, L in [(16, 128, (31, 45, 80), 1985), (16, 128, (1, 45, 80), 300), (24, 72, (21, 30, 53), 256)]:
    warm = V.warmup_variants((1, H, 8 * 384, D, torch.bfloat16, 384))
    for bshd in (False, True):
        ph = V.ssta_call_variants(H, D, thw, L, bshd=bshd)
        call = set().union(*ph.values())
        out[f"{H}/{D}/{thw}/{bshd}"] = {
            "call": len(call), "missing": names(call - warm),
            "background_not_launched": names(ph["background"] - ph["backward"]),
            "backward_compiles": names(ph["backward"] - ph["forward"] - ph["background"]),
        }
# the check can fail: without the SSTA call the warm-up misses the SSTA path's kernels
warmup_module._warm_ssta = lambda *a, **k: None
old = V.warmup_variants((1, 16, 8 * 384, 128, torch.bfloat16, 384))
out["without_ssta_call"] = names(set().union(*V.ssta_call_variants().values()) - old)
print("RESULT" + json.dumps(out))
"""


def test_warmup_compiles_every_variant_of_a_real_ssta_call():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))
    got = json.loads(line[len("RESULT"):])
    without = got.pop("without_ssta_call")
    assert any("_untile_scaled" in v for v in without) and any("'GROUP': 64" in v for v in without)
    for case, r in got.items():
        assert r["call"] >= 8, case                              # gathers, forward, untile, backward
        assert r["missing"] == [], (case, r["missing"])          # the warm-up compiled each of them
        assert r["background_not_launched"] == [], case          # the background compiles what runs
        assert r["backward_compiles"] == [], case                # ... and all the backward needs

"""Compile the Gluon forward kernels for sm90 on any machine (no GPU needed) and report their resources.

    PYTHONPATH=$PWD python scripts/gluon_compile_check.py [--schedule NAME ...] [--dump DIR]

Variants: ``sparse`` / ``sparse64`` / ``sparse_fp16`` (the block-sparse forward,
`gluon_fwd.gluon_sparse_forward`, over a dense `BlockSparsePlan` of 384-token blocks at head dim 128 /
64, bf16; and at head dim 128 in fp16).

The active Triton driver is replaced by one that only answers "sm90, device 0, stream 0"; q/k/v are
meta tensors, so nothing runs. Per schedule: registers, stack and spills (cuobjdump on the cubin),
static shared memory, and a few facts read from the TTGIR / PTX (wgmma count and waits, mbarrier
waits, layout conversions through shared memory, named barriers).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys

import torch
import triton
from triton.runtime import driver

from video_sparse_attn.kernels import gluon_fwd as gf
from video_sparse_attn.kernels.variants import _Sm90Driver


def resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = "/tmp/_gluon_check.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    return " ".join(line.strip() for line in out.splitlines() if "REG" in line)


def facts(ttgir: str, ptx: str) -> dict:
    return {
        "wgmma (ptx)": len(re.findall(r"wgmma\.mma_async", ptx)),
        "wgmma.wait_group (ptx)": len(re.findall(r"wgmma\.wait_group", ptx)),
        "mbarrier try_wait (ptx)": len(re.findall(r"mbarrier\.try_wait", ptx)),
        "bar.sync/barrier.sync (ptx)": len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx)),
        "bar.arrive (ptx)": len(re.findall(r"\bbar\.arrive|barrier\.arrive", ptx)),
        "setmaxnreg (ptx)": len(re.findall(r"setmaxnreg", ptx)),
        "st.shared (ptx)": len(re.findall(r"\bst\.shared", ptx)),
        "ld.shared (ptx)": len(re.findall(r"\bld\.shared", ptx)),
        "ex2 (ptx)": len(re.findall(r"ex2\.approx", ptx)),
        "convert_layout (ttgir)": len(re.findall(r"ttg\.convert_layout", ttgir)),
        "local_alloc (ttgir)": len(re.findall(r"ttg\.local_alloc", ttgir)),
    }


SPARSE = {"sparse": (128, torch.bfloat16), "sparse64": (64, torch.bfloat16), "sparse_fp16": (128, torch.float16)}


def compile_sparse(sched: str, seq: int, stages: int | None = None):
    """The block-sparse kernel compiled for sm90 on meta tensors (a dense plan of 384-token blocks), its
    K / V rings ``stages`` deep (None: the launcher's default)."""
    from video_sparse_attn import BlockSparsePlan

    D, dtype = SPARSE[sched]
    n = seq // 384
    q = torch.empty(1, 16, n * 384, D, device="meta", dtype=dtype)
    plan = BlockSparsePlan.dense(1, 1, n, n, 384, device="meta")
    compiled = []

    def launch(kernel, grid, *args, **kwargs):
        compiled.append(kernel.warmup(*args, grid=grid, **kwargs))

    gf.gluon_sparse_forward(q, q, q, plan, D ** -0.5, launch=launch, stages=stages)
    return compiled[0]


@contextlib.contextmanager
def sm90_target():
    """Within: Triton's active driver answers "sm90, device 0, stream 0" (compiles only; launch nothing)."""
    old = driver._active if hasattr(driver, "_active") else None
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        if old is not None:
            driver._active = old


def report(name: str, build, dump=None, more=None) -> bool:
    """Compile one kernel (``build()`` returns Triton's compiled kernel) and print its resources and
    facts (plus ``more(ttgir, ptx)``, a dict), or the failure; optionally dump its ttgir / ptx. True
    when it compiled."""
    try:
        ck = build()
    except Exception as e:  # noqa: BLE001 - report and go on with the next kernel
        cause = f" <- {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ is not None else ""
        print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[-3000:]}{str(cause)[:3000]}")
        return False
    ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
    md = ck.metadata
    print(f"[{name}] compiled for sm90: num_warps={md.num_warps} shared={md.shared} B ({md.shared / 1024:.1f} KiB)")
    print(f"  {resources(ck.asm['cubin'])}")
    for key, val in {**facts(ttgir, ptx), **(more(ttgir, ptx) if more else {})}.items():
        print(f"  {key}: {val}")
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{name.replace(':', '_')}.{ext}"), "w") as f:
                f.write(ck.asm[ext])
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", nargs="*", default=list(SPARSE), choices=list(SPARSE))
    ap.add_argument("--dump", default=None, help="write each kernel's ttgir / ptx here")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--stages", nargs="*", type=int, default=[None], help="K / V ring depths (default: the launcher's)")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    ok = True
    with sm90_target():
        for sched in args.schedule:
            for st in args.stages:
                name = sched if st is None else f"{sched}:stages{st}"
                ok = report(name, lambda sched=sched, st=st: compile_sparse(sched, args.seq, st), args.dump) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Compile the Gluon backward kernel for sm90 on any machine (no GPU needed) and report its resources.

    PYTHONPATH=$PWD python scripts/gluon_bwd_compile_check.py [--stages N ...] [--overlap 0 1] [--sparse] [--dump DIR]

As `gluon_compile_check.py` does for the forward: the active Triton driver is replaced by one that
only answers "sm90, device 0, stream 0" and the tensors are meta tensors, so nothing runs. Per
variant: registers, stack and spills (cuobjdump on the cubin), static shared memory, registers per
partition (setmaxnreg in the PTX) and a few facts read from the TTGIR / PTX.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_compile_check import report, sm90_target  # noqa: E402

from video_sparse_attn.kernels import gluon_bwd as gb  # noqa: E402


def _meta_plan(S, block):
    """A dense `BlockSparsePlan` of ``block``-token blocks on the meta device (only shapes matter)."""
    from video_sparse_attn.plan import BlockSparsePlan

    n = S // block
    return BlockSparsePlan.dense(1, 1, n, n, block, device="cpu")


def _bwd_facts(ttgir: str, ptx: str) -> dict:
    """Registers per partition (setmaxnreg) and the global reductions (the dQ atomics)."""
    red = re.findall(r"(?:red|atom)\.global[\w.]*", ptx)
    return {"setmaxnreg (ptx)": re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx),
            "red/atom global (ptx)": f"{len(red)} {sorted(set(red))}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="*", type=int, default=[2, 3])
    ap.add_argument("--sparse", action="store_true", help="also the block-sparse variant (384-token blocks)")
    ap.add_argument("--dq", nargs="*", default=["atomic", "tma"], help="dQ reductions to compile")
    ap.add_argument("--overlap", nargs="*", type=int, default=[0, 1],
                    help="walks to compile: 0 the stepwise walk, 1 the overlapping one (gluon_bwd overlap=)")
    ap.add_argument("--fixed", action="store_true", help="also the fixed-point dQ variants (dq_fixed)")
    ap.add_argument("--dump", default=None, help="write each kernel's ttgir / ptx here")
    ap.add_argument("--seq", type=int, default=4608)
    args = ap.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    variants = [(st, sp, dq, ov, False) for sp in ([False, True] if args.sparse else [False]) for dq in args.dq
                for st in args.stages for ov in args.overlap]
    if args.fixed:
        variants += [(st, sp, dq, ov, True) for sp in ([False, True] if args.sparse else [False]) for dq in args.dq
                     for st in args.stages for ov in args.overlap]
    ok = True
    with sm90_target():
        for stages, sparse, dq, overlap, fixed in variants:
            name = (f"{'sparse' if sparse else 'dense'}:{dq}:stages{stages}{':overlap' if overlap else ''}"
                    f"{':fixed' if fixed else ''}")
            q = torch.empty(1, 16, args.seq, 128, device="meta", dtype=torch.bfloat16)
            lse = torch.empty(1, 16, args.seq, device="meta", dtype=torch.float32)
            plan = _meta_plan(args.seq, 384) if sparse else None
            def build(q=q, lse=lse, plan=plan, stages=stages, dq=dq, overlap=overlap, fixed=fixed):
                return gb.gluon_attention_backward(q, q, q, q, q, lse, plan=plan, stages=stages, dq_reduce=dq,
                                                   compile_only=True, overlap=bool(overlap), dq_fixed=fixed)
            ok = report(name, build, args.dump, _bwd_facts) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

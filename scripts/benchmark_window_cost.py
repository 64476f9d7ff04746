"""What a token window costs the Triton forward / backward per kept block (CUDA).

Dense 384-token blocks (B=1, H=16, D=128, bf16, S = 120 blocks), three plans: no window; a window that
contains every key (the windowed kernels, nothing masked); causal (blocks above the diagonal dropped).
Prints ms and ms per kept block relative to the first.

    python scripts/benchmark_window_cost.py
"""

import argparse
import dataclasses

import torch
from triton.testing import do_bench

from video_sparse_attn import BlockSparsePlan
from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton
from video_sparse_attn.plan import WINDOW_INF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-autotune", action="store_true", help="first config of each list for every plan")
    ap.add_argument("--fwd-config", default=None, metavar="BM,BN,WARPS,STAGES",
                    help="this forward config for every plan (implies --no-autotune)")
    args = ap.parse_args()
    options = {"autotune": False} if args.no_autotune or args.fwd_config else None
    if args.fwd_config:
        from video_sparse_attn.kernels import triton_fwd

        triton_fwd.FWD_CONFIGS["small_d"] = [tuple(int(x) for x in args.fwd_config.split(","))]
    n, blk, H, D = 120, 384, 16, 128
    q, k, v = (torch.randn(1, H, n * blk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dense = BlockSparsePlan.dense(1, 1, n, n, blk, device="cuda")
    tril = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None]
    plans = {"no window": dense,
             "window holding every key": dataclasses.replace(dense, window_lo=-WINDOW_INF + 1, window_hi=WINDOW_INF - 1),
             "causal": BlockSparsePlan.from_block_mask(tril, blk, window_hi=0)}
    dout = torch.randn_like(q)
    base = None
    for name, plan in plans.items():
        kept = int(plan.kv_count.sum()) * H

        def fwd():
            return block_sparse_attention_triton(q, k, v, plan, kernel_options=options)[0]

        def fwd_bwd():
            torch.autograd.grad(fwd(), (q, k, v), dout)

        f, fb = do_bench(fwd, warmup=10, rep=100), do_bench(fwd_bwd, warmup=5, rep=100)
        per = (f / kept, fb / kept)
        base = base or per
        print(f"{name:26s} kept {kept:7d}  fwd {f:7.2f} ms  fwd+bwd {fb:7.2f} ms  per kept block vs no window "
              f"{per[0] / base[0]:.2f} / {per[1] / base[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()

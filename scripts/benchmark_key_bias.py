"""Where the Triton forward's key-bias cost goes: the repeat-padded SSTA plan at HunyuanVideo-1.5
720p/121f with the copies kept or skipped, with and without a (zero or real) key bias, lazy or eager
rescaling. Plain Triton kernels (``gluon=False``: the Gluon forward takes no bias). One process,
`triton.testing.do_bench` medians, B=1, H=16, D=128, bf16 (benchmarks/SSTA_FA4.md, v5).

    PYTHONPATH=$PWD python scripts/benchmark_key_bias.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    from triton.testing import do_bench

    import ssta720p
    from video_sparse_attn import BlockSparsePlan
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    H, D = 16, 128
    p = ssta720p.build(H, D, pad_type="repeat")
    q_t, k_t, v_t = p.tiled
    free = ssta720p.padding_free_plan(p, "triton", backward=True)            # copies skipped, with their bias
    k_valid, key_bias, qv = free.k_valid, free.key_bias, free.q_valid
    bs = p.layout.block_size
    full = torch.full_like(k_valid, bs)

    def plan(kv, kb):
        return BlockSparsePlan.from_block_mask(p.mask, bs, bs, kv, qv, key_bias=kb)

    rows = [
        ("copies kept, no bias (the inference plan)", plan(full, None), {}),
        ("copies skipped (ragged key blocks), no bias", plan(k_valid, None), {}),
        ("copies kept, bias of zeros (the bias variant)", plan(full, torch.zeros_like(key_bias)), {}),
        ("copies skipped, real bias", plan(k_valid, key_bias), {}),
        ("copies skipped, real bias, eager rescaling", plan(k_valid, key_bias), {"fwd_lazy": False}),
        ("copies skipped, no bias, eager rescaling", plan(k_valid, None), {"fwd_lazy": False}),
    ]
    flop = p.flop(D)
    print("| plan (repeat padding, padded query rows skipped) | fwd ms | eff. TF |\n|---|---|---|")
    with torch.no_grad():
        for name, pl, opts in rows:
            opts = {"gluon": False, **opts}
            try:
                f = lambda pl=pl, o=opts: block_sparse_attention_triton(q_t, k_t, v_t, pl, kernel_options=o)  # noqa: E731
                f()
                torch.cuda.synchronize()
                ms = do_bench(f, warmup=50, rep=300, return_mode="median")
                print(f"| {name} | {ms:.2f} | {flop / ms / 1e9:.0f} |", flush=True)
            except Exception as e:  # noqa: BLE001 - report the row and go on
                print(f"| {name} | failed: {type(e).__name__}: {str(e)[:150]} |", flush=True)


if __name__ == "__main__":
    main()

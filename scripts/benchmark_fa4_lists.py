"""Time the conversion of a 720p/121f SSTA plan into FlashAttention-4's block lists (CUDA; FA4 itself
is not needed): the per-block conversion of plans without a window vs the per-sub-block
classification that windows (causal, sliding) need, on the same plan.

    python scripts/benchmark_fa4_lists.py
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    from triton.testing import do_bench

    from video_sparse_attn import BlockSparsePlan, SSTAConfig, TileLayout
    from video_sparse_attn.kernels.fa4 import fa4_block_lists
    from video_sparse_attn.kernels.registry import BACKENDS
    from video_sparse_attn.masks.build import block_mask_from_tiled

    thw, text, valid = (31, 45, 80), 1985, 1200
    cfg = SSTAConfig().for_thw(thw)
    lay = TileLayout(thw, cfg.tile_thw, text, cfg.pad_type)
    torch.manual_seed(0)
    q, k = (torch.randn(1, 16, lay.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    tm = torch.zeros(1, text, dtype=torch.bool, device="cuda")
    tm[:, :valid] = True
    mask = block_mask_from_tiled(lay.tile(q), lay.tile(k), lay, cfg, tm)
    plan = BlockSparsePlan.from_block_mask(mask, lay.block_size, lay.block_size,
                                           lay.key_valid(tm, "cuda", True, BACKENDS["fa4"].key_tile), lay.query_valid("cuda"))
    wide = dataclasses.replace(plan, window_lo=-10 ** 9, window_hi=10 ** 9)   # a window that excludes nothing
    for label, p in (("no window (per block)", plan), ("window (per sub-block)", wide)):
        ms = do_bench(lambda p=p: fa4_block_lists(dataclasses.replace(p), 1), warmup=20, rep=200, return_mode="median")
        print(f"fa4 block lists, {label:24s} {ms:6.2f} ms")


if __name__ == "__main__":
    main()

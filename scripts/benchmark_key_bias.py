"""Where the Triton forward's key-bias cost goes: the repeat-padded SSTA plan at HunyuanVideo-1.5
720p/121f with the copies kept or skipped, with and without a (zero or real) key bias, lazy or eager
rescaling. Plain Triton kernels (``gluon=False``: the Gluon forward takes no bias). One process,
`triton.testing.do_bench` medians, B=1, H=16, D=128, bf16 (benchmarks/SSTA_FA4.md, v5).

    PYTHONPATH=$PWD python scripts/benchmark_key_bias.py
"""

from __future__ import annotations

import argparse
import math

import torch


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    from triton.testing import do_bench

    from video_sparse_attn import BlockSparsePlan, SSTAConfig, TileLayout
    from video_sparse_attn.attention import _key_args
    from video_sparse_attn.kernels.registry import BACKENDS
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton
    from video_sparse_attn.masks.build import block_mask_from_tiled

    thw, text, valid = (31, 45, 80), 1985, 1200
    torch.manual_seed(0)
    H, D, dev = 16, 128, "cuda"
    cfg = SSTAConfig().for_thw(thw).replace(pad_type="repeat")
    S = math.prod(thw) + text
    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    tm = torch.zeros(1, text, dtype=torch.bool, device=dev)
    tm[:, :valid] = True
    layout = TileLayout(thw, cfg.tile_thw, text, cfg.pad_type)
    bs = layout.block_size
    q_t, k_t, v_t = (layout.tile(x) for x in (q, k, v))
    mask = block_mask_from_tiled(q_t, k_t, layout, cfg, tm)
    k_valid, key_bias = _key_args(layout, BACKENDS["triton"], q, tm, True, backward=True)   # copies skipped
    qv = layout.query_valid(dev)
    full = torch.full_like(k_valid, bs)

    def plan(kv, kb):
        return BlockSparsePlan.from_block_mask(mask, bs, bs, kv, qv, key_bias=kb)

    rows = [
        ("copies kept, no bias (the inference plan)", plan(full, None), {}),
        ("copies skipped (ragged key blocks), no bias", plan(k_valid, None), {}),
        ("copies kept, bias of zeros (the bias variant)", plan(full, torch.zeros_like(key_bias)), {}),
        ("copies skipped, real bias", plan(k_valid, key_bias), {}),
        ("copies skipped, real bias, eager rescaling", plan(k_valid, key_bias), {"fwd_lazy": False}),
        ("copies skipped, no bias, eager rescaling", plan(k_valid, None), {"fwd_lazy": False}),
    ]
    kept = int(mask.expand(1, H, -1, -1).sum())
    flop = 4.0 * kept * bs * bs * D
    print("| plan (repeat padding, padded query rows skipped) | fwd ms | eff. TF |\n|---|---|---|")
    with torch.no_grad():
        for name, p, opts in rows:
            opts = {"gluon": False, **opts}
            try:
                f = lambda p=p, o=opts: block_sparse_attention_triton(q_t, k_t, v_t, p, kernel_options=o)  # noqa: E731
                f()
                torch.cuda.synchronize()
                ms = do_bench(f, warmup=50, rep=300, return_mode="median")
                print(f"| {name} | {ms:.2f} | {flop / ms / 1e9:.0f} |", flush=True)
            except Exception as e:  # noqa: BLE001 - report the row and go on
                print(f"| {name} | failed: {type(e).__name__}: {str(e)[:150]} |", flush=True)


if __name__ == "__main__":
    main()

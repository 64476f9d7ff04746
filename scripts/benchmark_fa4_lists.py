import dataclasses, torch
from triton.testing import do_bench
from video_sparse_attn import SSTAConfig, TileLayout, BlockSparsePlan
from video_sparse_attn.masks.build import block_mask_from_tiled
from video_sparse_attn.kernels.fa4 import fa4_block_lists
thw = (31, 45, 80); cfg = SSTAConfig().for_thw(thw); lay = TileLayout(thw, cfg.tile_thw, 1985, cfg.pad_type)
torch.manual_seed(0)
q, k = (torch.randn(1, 16, lay.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
tm = torch.zeros(1, 1985, dtype=torch.bool, device="cuda"); tm[:, :1200] = True
m = block_mask_from_tiled(lay.tile(q), lay.tile(k), lay, cfg, tm)
plan = BlockSparsePlan.from_block_mask(m, lay.block_size, lay.block_size, lay.key_valid(tm, "cuda", True), lay.query_valid("cuda"))
wide = dataclasses.replace(plan, window_lo=-10**9, window_hi=10**9)
print("fa4 lists, no window (per-block fast path): %.2f ms" % do_bench(lambda: fa4_block_lists(dataclasses.replace(plan), 1), warmup=20, rep=200, return_mode="median"))
print("fa4 lists, per-sub-block classification:    %.2f ms" % do_bench(lambda: fa4_block_lists(dataclasses.replace(wide), 1), warmup=20, rep=200, return_mode="median"))

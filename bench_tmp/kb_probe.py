"""Where the key-bias forward's time goes: the repeat padding-free plan at 720p/121f, variants."""
import dataclasses, math, sys, torch
from triton.testing import do_bench
from video_sparse_attn import BlockSparsePlan, SSTAConfig, TileLayout, block_sparse_attention
from video_sparse_attn.attention import _key_args
from video_sparse_attn.masks.build import block_mask_from_tiled
from video_sparse_attn.kernels.registry import BACKENDS
from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton
THW, TEXT, VALID = (31, 45, 80), 1985, 1200
torch.manual_seed(0)
H, D, dev = 16, 128, "cuda"
cfg = SSTAConfig().for_thw(THW).replace(pad_type="repeat")
S = math.prod(THW) + TEXT
q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
tm = torch.zeros(1, TEXT, dtype=torch.bool, device=dev); tm[:, :VALID] = True
layout = TileLayout(THW, cfg.tile_thw, TEXT, cfg.pad_type)
bs = layout.block_size
q_t, k_t, v_t = (layout.tile(x) for x in (q, k, v))
mask = block_mask_from_tiled(q_t, k_t, layout, cfg, tm)
k_valid, key_bias = _key_args(layout, BACKENDS["triton"], q, tm, True, backward=True)
qv = layout.query_valid(dev)
def plan(kv, kb):
    return BlockSparsePlan.from_block_mask(mask, bs, bs, kv, qv, key_bias=kb)
full = torch.full_like(k_valid, bs)
rows = [
    ("copies kept, no bias (inference plan)", plan(full, None), {}),
    ("copies skipped (ragged), no bias", plan(k_valid, None), {}),
    ("copies kept, zero bias (bias variant)", plan(full, torch.zeros_like(key_bias)), {}),
    ("copies skipped, real bias, kb_dot", plan(k_valid, key_bias), {}),
    ("copies skipped, real bias, vector add", plan(k_valid, key_bias), {"kb_dot": False}),
    ("copies skipped, real bias, kb_dot, eager rescale", plan(k_valid, key_bias), {"fwd_lazy": False}),
    ("copies skipped, zero bias, kb_dot", plan(k_valid, torch.zeros_like(key_bias)), {}),
    ("copies skipped, no bias, eager rescale", plan(k_valid, None), {"fwd_lazy": False}),
]
kept = int(mask.expand(1, H, -1, -1).sum()); flop = 4.0 * kept * bs * bs * D
with torch.no_grad():
    for name, p, opts in rows:
        try:
            f = lambda: block_sparse_attention_triton(q_t, k_t, v_t, p, kernel_options=opts)
            f(); torch.cuda.synchronize()
            ms = do_bench(f, warmup=50, rep=300, return_mode="median")
            print(f"| {name} | {ms:.2f} | {flop / ms / 1e9:.0f} |", flush=True)
        except Exception as e:
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:150]} |", flush=True)

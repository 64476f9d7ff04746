"""Plain diffusers style: one `SSTAAttnProcessor` for every attention layer of a transformer.

The text-only token refiner keeps stock behaviour and the latent-grid hook is installed on the first
call. With a config that keeps every block the output equals the stock processors'; then a sparse
config runs on the same model. Runs on a CPU in seconds (tiny random HunyuanVideo-1.5).
"""

import torch

from video_sparse_attn import SSTAConfig
from video_sparse_attn.processors import SSTAAttnProcessor, disable_ssta, runtime_of
from video_sparse_attn.testing import tiny_inputs, tiny_model

model = tiny_model("hunyuan_video15")                                   # 2 heads x 16, 2 double-stream blocks
inputs = tiny_inputs(model, latent_thw=(4, 8, 8), batch=1, text_len=20)  # 20 prompt tokens, 20 valid

with torch.no_grad():
    stock = model(**inputs)[0]

    # every block kept, padding masked token by token: exact dense attention
    model.set_attn_processor(SSTAAttnProcessor(SSTAConfig(tile_thw=(1, 4, 4), sparse_type="dense",
                                                          pad_type="mask", caller_rules=False)))
    dense = model(**inputs)[0]
    print(f"grid captured lazily: {runtime_of(model).thw}")
    print(f"all blocks kept vs stock: max abs diff {(dense - stock).abs().max():.2e}")
    assert torch.allclose(dense, stock, atol=1e-5)

    # sparse: 3x3x3-tile window + top-2 selected tiles + text
    model.set_attn_processor(SSTAAttnProcessor(SSTAConfig(tile_thw=(1, 4, 4), topk=2, caller_rules=False)))
    sparse = model(**inputs)[0]
    print(f"sparse vs stock: relative L2 {((sparse - stock).norm() / stock.norm()):.3f}")

disable_ssta(model)                                                     # stock processors, hook removed
print({name.split(".")[0]: type(p).__name__ for name, p in model.attn_processors.items()})

"""Plain diffusers style: one `SSTAAttnProcessor` for every attention layer of a transformer.

The text-only token refiner keeps stock behaviour and the latent-grid hook is installed on the first
call. With a config that keeps every block the output equals the stock processors'; then a sparse
config runs on the same model. Runs on a CPU in seconds (tiny random HunyuanVideo-1.5).
"""

import torch
from diffusers import HunyuanVideo15Transformer3DModel

from video_sparse_attn import SSTAConfig
from video_sparse_attn.processors import SSTAAttnProcessor, disable_ssta, runtime_of

torch.manual_seed(0)
model = HunyuanVideo15Transformer3DModel(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
    num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
    rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v",
).eval()
text_mask = torch.ones(1, 20, dtype=torch.long)
text_mask[:, 12:] = 0                                                   # 12 valid prompt tokens
inputs = dict(hidden_states=torch.randn(1, 4, 4, 8, 8), timestep=torch.tensor([700.0]),
              encoder_hidden_states=torch.randn(1, 20, 16), encoder_attention_mask=text_mask,
              encoder_hidden_states_2=torch.randn(1, 6, 8), encoder_attention_mask_2=torch.ones(1, 6),
              image_embeds=torch.zeros(1, 4, 12), return_dict=False)

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

"""Calling `ssta_attention` directly on diffusers-layout tensors.

diffusers keeps q, k, v as ``[B, S, H, D]``; the op takes ``[B, H, S, D]`` with any strides, so
``x.transpose(1, 2)`` views go in without copies. Checks the exact mode (every block kept,
``pad_type="mask"``) against dense attention that excludes the padded text keys, then runs SSTA.
"""

import torch
import torch.nn.functional as F

from video_sparse_attn import SSTAConfig, ssta_attention

torch.manual_seed(0)
thw, text_len, heads, dim = (4, 12, 16), 40, 4, 64
S = thw[0] * thw[1] * thw[2] + text_len
# q and k with locality (nearby latent positions attend to each other), as in a video DiT
t, h, w = (torch.arange(n, dtype=torch.float32) for n in thw)
coords = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), -1).reshape(-1, 3)      # [t*h*w, 3]
freqs = torch.randn(3, dim // 2) * 0.4
pos = torch.cat([torch.sin(coords @ freqs), torch.cos(coords @ freqs)], -1)          # [t*h*w, D]
pos = torch.cat([pos, 0.3 * torch.randn(text_len, dim)])[None, :, None, :] * 2.5    # text: no locality
q = pos + 0.3 * torch.randn(2, S, heads, dim)                                        # diffusers layout
k = pos + 0.3 * torch.randn(2, S, heads, dim)                                        # [B, S, H, D]
v = torch.randn(2, S, heads, dim)
text_mask = torch.zeros(2, text_len, dtype=torch.bool)
text_mask[0, :30] = True                                              # valid tokens form a prefix
text_mask[1, :7] = True

# exact: every block kept, padding excluded token by token
exact = SSTAConfig(tile_thw=(2, 4, 4), sparse_type="dense", pad_type="mask", caller_rules=False)
out = ssta_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), thw, exact, text_len, text_mask)
key_ok = torch.cat([torch.ones(2, S - text_len, dtype=torch.bool), text_mask], dim=1)
ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     attn_mask=key_ok[:, None, None, :])
print(f"exact mode vs dense SDPA: max abs diff {(out - ref).abs().max():.2e}")
assert torch.allclose(out, ref, atol=1e-5)

# SSTA: 3x3x3-tile window ∪ top-4 tiles ∪ text, the released rules otherwise
config = SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 3, 3), topk=4, caller_rules=False)
out, info = ssta_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), thw, config, text_len,
                           text_mask, return_info=True)
print(f"SSTA: out {tuple(out.shape)}, block mask {tuple(info.block_mask.shape)}, "
      f"density {float(info.density):.3f}, "
      f"relative L2 vs dense {float((out - ref).norm() / ref.norm()):.3f}")

"""SSTA vs dense attention on a synthetic video problem with locality, offline, on any device.

Queries and keys are smooth functions of the token's (t, h, w) position plus noise, so attention
mass concentrates near each token as in video DiTs. Prints the block density, the relative error of
SSTA against dense attention, and both times; writes a PNG of the block mask of one head.

    python scripts/demo.py                       # CPU-sized default
    python scripts/demo.py --thw 16 30 40 --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from video_sparse_attn import SSTAConfig, ssta_attention


def locality_qkv(thw, text_len, heads, dim, device, dtype, seed=0):
    """``q, k, v [1, H, t*h*w + L, D]``: random Fourier features of the position (+ noise) for video
    tokens, plain noise for text tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t, h, w = thw
    pos = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in thw), indexing="ij"), -1)
    pos = pos.reshape(-1, 3) / torch.tensor([2.0, 3.0, 3.0])           # correlation lengths in tokens
    freqs = torch.randn(heads, 3, dim // 2, generator=g) * 0.6
    phase = torch.einsum("sc,hcf->hsf", pos, freqs)
    feat = torch.cat([phase.sin(), phase.cos()], -1) * math.sqrt(2.0)   # [H, S_video, D]
    def noisy(x):
        return x + 0.3 * torch.randn(x.shape, generator=g)
    text = lambda: torch.randn(heads, text_len, dim, generator=g)  # noqa: E731
    q = torch.cat([noisy(feat) * 2.0, text()], 1)
    k = torch.cat([noisy(feat) * 2.0, text()], 1)
    v = torch.randn(heads, t * h * w + text_len, dim, generator=g)
    return (x[None].to(device=device, dtype=dtype) for x in (q, k, v))


def _timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def plot_block_mask(mask: torch.Tensor, num_video_blocks: int, path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the block-mask picture (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6, 6.6))
    ax.imshow(mask.cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.axhline(num_video_blocks - 0.5, color="tab:red", lw=0.8)
    ax.axvline(num_video_blocks - 0.5, color="tab:red", lw=0.8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="black", edgecolor="grey", label="kept block (attended)"),
                       Patch(facecolor="white", edgecolor="grey", label="skipped block"),
                       Line2D([], [], color="tab:red", lw=0.8, label="video | text boundary")],
              loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    ax.set_xlabel("key block (video tiles, then text)")
    ax.set_ylabel("query block")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thw", type=int, nargs=3, default=(8, 24, 32), help="latent grid T H W")
    p.add_argument("--tile", type=int, nargs=3, default=(2, 4, 8), help="tile T H W in tokens")
    p.add_argument("--window", type=int, nargs=3, default=(3, 3, 3), help="STA window T H W in tiles")
    p.add_argument("--topk", type=int, default=8, help="key tiles selected per query tile")
    p.add_argument("--text-len", type=int, default=100, help="text tokens after the video")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--dim", type=int, default=64, help="head dim")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default="outputs/demo_block_mask.png", help="PNG of head 0's block mask")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    config = SSTAConfig(tile_thw=args.tile, kernel_thw=args.window, topk=args.topk, caller_rules=False)
    q, k, v = locality_qkv(tuple(args.thw), args.text_len, args.heads, args.dim, args.device, dtype)
    S = q.shape[2]
    print(f"grid {tuple(args.thw)} + {args.text_len} text tokens = {S} tokens, {args.heads} heads × {args.dim}, "
          f"{dtype}, {args.device}")

    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    sparse = lambda: ssta_attention(q, k, v, tuple(args.thw), config, args.text_len, return_info=True)  # noqa: E731
    dense(), sparse()  # warm-up (caches, kernels)
    ref, t_dense = _timed(dense, args.device)
    (out, info), t_sparse = _timed(sparse, args.device)
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    # the same sparsity with random (non-local) q/k, for contrast
    rq, rk = torch.randn_like(q), torch.randn_like(k)
    rnd_ref = torch.nn.functional.scaled_dot_product_attention(rq, rk, v)
    rnd_err = float((ssta_attention(rq, rk, v, tuple(args.thw), config, args.text_len).double() - rnd_ref.double()).norm()
                    / rnd_ref.double().norm())
    print(f"block density        {float(info.density):.3f}  ({info.layout.num_blocks} blocks of {info.layout.block_size} tokens)")
    print(f"relative L2 error    {err:.4f}  (vs dense; the same sparsity on random, non-local q/k: {rnd_err:.4f})")
    print(f"time dense / SSTA    {t_dense:.1f} ms / {t_sparse:.1f} ms  (SSTA includes mask + plan; CPU path is a reference, not fast)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    title = f"SSTA block mask, head 0: tile {tuple(args.tile)}, window {tuple(args.window)}, topk {args.topk}"
    if plot_block_mask(info.block_mask[0, 0], info.layout.num_video_blocks, args.out, title):
        print(f"block mask (head 0)  {args.out}")


if __name__ == "__main__":
    main()

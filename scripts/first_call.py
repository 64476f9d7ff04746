"""Seconds from a fresh process's start to the end of its first SSTA call (forward + backward) at the
HunyuanVideo-1.5 720p/121f shape: what a user waits for on the first denoising step.

Run it twice: the first run fills the disk caches (Triton's kernel cache and this package's tuning
cache; FlashAttention-4's compile cache), the second shows what every later process pays.

    python scripts/first_call.py --backend triton
"""

from __future__ import annotations

import argparse
import json
import time

START = time.perf_counter()

import torch  # noqa: E402

from video_sparse_attn import SSTAConfig, ssta_attention  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--label", default="")
    args = p.parse_args()
    imported = time.perf_counter() - START
    thw, L = (31, 45, 80), 1985
    S = thw[0] * thw[1] * thw[2] + L
    q, k, v = (torch.randn(1, 16, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    tm = torch.zeros(1, L, dtype=torch.bool, device="cuda")
    tm[:, :1200] = True
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = ssta_attention(q, k, v, thw, SSTAConfig().for_thw(thw), L, tm, backend=args.backend)
    torch.cuda.synchronize()
    fwd = time.perf_counter() - t0
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    print(json.dumps({"label": args.label, "backend": args.backend, "import_s": round(imported, 2),
                      "first_fwd_s": round(fwd, 2), "first_fwd_bwd_s": round(total, 2)}))


if __name__ == "__main__":
    main()

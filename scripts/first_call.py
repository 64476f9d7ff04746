"""Seconds from a fresh process's start to the end of its first SSTA call (forward + backward) at the
HunyuanVideo-1.5 720p/121f shape: what a user waits for on the first denoising step.

Run it twice: the first run fills the disk caches (Triton's kernel cache and this package's tuning
cache; FlashAttention-4's compile cache), the second shows what every later process pays.

    python scripts/first_call.py --backend triton
    python scripts/first_call.py --backend triton --no-backward     # inference: forward only

Prints one JSON line: ``import_s`` (torch + this package), ``setup_s`` (CUDA context, inputs),
``first_fwd_s`` / ``first_bwd_s`` (the first call's phases), ``first_call_s`` (their sum: the target),
and ``second_fwd_s`` / ``second_bwd_s`` (the same call again: kernel time, so that the first call's
excess over it is compilation, tuning and loading), and ``background_errors`` (background compiles
that failed, see `kernels.precompile`; then the backward compiled its kernels itself).
"""

from __future__ import annotations

import argparse
import json
import time

START = time.perf_counter()

import torch  # noqa: E402

from video_sparse_attn import SSTAConfig, ssta_attention  # noqa: E402
from video_sparse_attn.kernels.precompile import background_errors  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--label", default="")
    p.add_argument("--no-backward", action="store_true", help="forward only (what inference runs)")
    args = p.parse_args()
    imported = time.perf_counter() - START
    t_setup = time.perf_counter()
    thw, L = (31, 45, 80), 1985
    S = thw[0] * thw[1] * thw[2] + L
    q, k, v = (torch.randn(1, 16, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    tm = torch.zeros(1, L, dtype=torch.bool, device="cuda")
    tm[:, :1200] = True
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    setup = time.perf_counter() - t_setup
    config = SSTAConfig().for_thw(thw)

    def call():
        t0 = time.perf_counter()
        with torch.set_grad_enabled(not args.no_backward):
            out = ssta_attention(q, k, v, thw, config, L, tm, backend=args.backend)
        torch.cuda.synchronize()
        fwd = time.perf_counter() - t0
        bwd = 0.0
        if not args.no_backward:
            t1 = time.perf_counter()
            out.backward(dout)
            torch.cuda.synchronize()
            bwd = time.perf_counter() - t1
        return fwd, bwd

    first_fwd, first_bwd = call()
    second_fwd, second_bwd = call()
    print(json.dumps({"label": args.label, "backend": args.backend, "backward": not args.no_backward,
                      "import_s": round(imported, 2), "setup_s": round(setup, 2),
                      "first_fwd_s": round(first_fwd, 2), "first_bwd_s": round(first_bwd, 2),
                      "first_call_s": round(first_fwd + first_bwd, 2),
                      "second_fwd_s": round(second_fwd, 3), "second_bwd_s": round(second_bwd, 3),
                      "background_errors": background_errors()}))


if __name__ == "__main__":
    main()

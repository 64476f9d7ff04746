"""Probe: does the order of the query (and key) blocks change FA4's time on the 720p/121f SSTA plan?

FA4's sm90 kernels launch one CTA per (128-row Q sub-block, head) with the sub-block index fastest, in
block order; SSTA's text query blocks attend to every valid key (≈ 4-5× a video block's work) and sit
last in each head's range. This times the padding-free FA4 forward (and forward + backward) on the
same plan with its query blocks in three orders — as built, text first, heaviest first by the plan's
per-block work (summed over heads) — and, for the backward, the key blocks text first or heaviest
first too. Outputs
are put back in block order and compared with the unpermuted run.

    python scripts/probe_fa4_order.py [--rounds 4] [--heads 16]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def permuted(p, plan_args, q_order, k_order):
    """The plan of ``p``'s block mask with its query blocks in ``q_order`` and key blocks in ``k_order``
    (bool mask, k_valid, q_valid permuted alike) and the block-ordered q, k, v permuted to match."""
    from video_sparse_attn import BlockSparsePlan

    k_valid, q_valid = plan_args
    bs = p.layout.block_size
    mask = p.mask[:, :, q_order][:, :, :, k_order]
    plan = BlockSparsePlan.from_block_mask(mask, bs, bs, k_valid[:, k_order], q_valid[:, q_order])
    B, H, S, D = p.tiled[0].shape

    def blocks(x, order):
        return x.reshape(B, H, S // bs, bs, D)[:, :, order].reshape(B, H, S, D).contiguous()

    q, k, v = p.tiled
    return plan, blocks(q, q_order), blocks(k, k_order), blocks(v, k_order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()

    import triton.testing

    import ssta720p
    from video_sparse_attn.attention import _key_args
    from video_sparse_attn.kernels.fa4 import block_sparse_attention_fa4, fa4_block_lists
    from video_sparse_attn.kernels.registry import BACKENDS

    p = ssta720p.build(heads=args.heads)
    dev = p.q.device
    k_valid, _ = _key_args(p.layout, BACKENDS["fa4"], p.q, p.text_mask, True, backward=True)
    q_valid = p.layout.query_valid(dev)
    N = p.mask.shape[-1]
    ident = torch.arange(N, device=dev)
    base, *_ = permuted(p, (k_valid, q_valid), ident, ident)
    lists = fa4_block_lists(base, 1, cache=False)
    rq = p.layout.block_size // 128
    # forward work per query block: kept KV sub-blocks of its Q sub-blocks, summed over heads
    fwd_work = (lists.fwd[0] + lists.fwd[2]).sum((0, 1)).reshape(N, rq).sum(-1)
    bwd_work = (lists.bwd[0] + lists.bwd[2]).sum((0, 1)).reshape(N, rq).sum(-1)
    n_video = N - -(-p.layout.text_len // p.layout.block_size)
    text_first = torch.cat([ident[n_video:], ident[:n_video]])
    q_lpt = torch.argsort(fwd_work, descending=True, stable=True)
    k_lpt = torch.argsort(bwd_work, descending=True, stable=True)
    print(f"blocks {N} (video {n_video}); forward work per block: video median "
          f"{fwd_work[:n_video].median().item():.0f}, text {fwd_work[n_video:].tolist()}", flush=True)

    orders = {"block order": (ident, ident), "text first": (text_first, ident), "q heaviest first": (q_lpt, ident),
              "q, k text first": (text_first, text_first), "q, k heaviest first": (q_lpt, k_lpt)}
    cases = {name: permuted(p, (k_valid, q_valid), qo, ko) for name, (qo, ko) in orders.items()}
    scale = p.q.shape[-1] ** -0.5
    dout = torch.randn_like(p.tiled[0])

    def unperm(x, order):
        B, H, S, D = x.shape
        bs = p.layout.block_size
        inv = torch.argsort(order)
        return x.reshape(B, H, S // bs, bs, D)[:, :, inv].reshape(B, H, S, D)

    ref_out = None
    times = {name: {"fwd": [], "fwdbwd": []} for name in cases}
    for name, (plan, q, k, v) in cases.items():
        fa4_block_lists(plan, 1)                       # cached on the plan, as in a real call
        out, _ = block_sparse_attention_fa4(q, k, v, plan, scale)
        out = unperm(out, orders[name][0])
        if ref_out is None:
            ref_out = out
        print(f"{name:22s} out equal to block order: {torch.equal(out, ref_out)}", flush=True)

    def fwd(plan, q, k, v):
        return block_sparse_attention_fa4(q, k, v, plan, scale)

    def fwdbwd(plan, q, k, v):
        qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = block_sparse_attention_fa4(qi, ki, vi, plan, scale)
        torch.autograd.grad(out, (qi, ki, vi), dout)

    names = list(cases)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            c = cases[name]
            times[name]["fwd"].append(triton.testing.do_bench(lambda: fwd(*c), warmup=50, rep=400))
            if not args.no_backward:
                times[name]["fwdbwd"].append(triton.testing.do_bench(lambda: fwdbwd(*c), warmup=20, rep=400))
    print(f"\n{'order':22s} {'fwd ms (rounds)':>40s}   fwd+bwd ms (median)")
    for name in names:
        f = sorted(times[name]["fwd"])
        b = sorted(times[name]["fwdbwd"])
        med = (lambda xs: xs[len(xs) // 2] if xs else float("nan"))
        print(f"{name:22s} {med(f):7.2f} ({', '.join(f'{x:.2f}' for x in times[name]['fwd'])})   {med(b):8.2f}")


if __name__ == "__main__":
    main()

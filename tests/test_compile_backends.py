"""The GPU backends' custom ops under `torch.compile(fullgraph=True)`: the Triton backend through its
interpreter on the CPU (backend ``aot_eager``); the same values as eager, forward and backward (lse
gradient included), with a window and with a key bias (an optional custom-op argument)."""

import dataclasses

import pytest
import torch

from video_sparse_attn import BlockSparsePlan, block_sparse_attention


@pytest.mark.interpreter
@pytest.mark.parametrize("window_hi, key_bias", [(None, False), (16, False), (None, True)],
                         ids=["plain", "window", "key_bias"])
def test_triton_custom_ops_compile_fullgraph_and_match_eager(window_hi, key_bias):
    torch._dynamo.reset()
    torch.manual_seed(0)
    mask = torch.rand(1, 2, 3, 4) < 0.6
    mask[..., 0, :] = True
    plan = BlockSparsePlan.from_block_mask(mask, 16, 16, torch.tensor([[16, 16, 9, 16]]),
                                           torch.tensor([[16, 5, 16]]))
    plan = dataclasses.replace(plan, window_hi=window_hi, key_bias=torch.rand(1, 64) * 3 if key_bias else None)
    q, k, v = (torch.randn(1, 2, n, 16) for n in (48, 64, 64))

    def f(q, k, v, plan):
        out, lse = block_sparse_attention(q, k, v, plan, backend="triton")
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    results = []
    for fn in (f, compiled):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*x, plan)
        g = torch.autograd.grad((out * out).sum() + (lse * lse).sum(), x)
        results.append((out.detach(), lse.detach(), g))
    (o1, l1, g1), (o2, l2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()

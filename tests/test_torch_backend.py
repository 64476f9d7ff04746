"""The torch backend: exact against dense attention on random plans, and O(kept blocks) in memory."""

import pytest
import torch

from helpers import rel_l2
from video_sparse_attn import BlockSparsePlan
from video_sparse_attn.kernels.torch_ref import block_sparse_attention_torch, row_buckets


def _dense_reference(q, k, v, plan, scale):
    """float64 attention over the expanded token mask of ``plan`` (out 0 / lse -inf where nothing is seen)."""
    B, H, Sq, D = q.shape
    blocks = plan.to_dense().expand(B, H, -1, -1)
    allowed = blocks.repeat_interleave(plan.q_block, 2).repeat_interleave(plan.k_block, 3)
    allowed = allowed & plan.token_valid()[:, None, None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    out = p @ v.double()
    q_ok = plan.query_valid()[:, None, :]
    return out.masked_fill(~q_ok[..., None], 0), lse.masked_fill(~q_ok, float("-inf"))


@pytest.mark.parametrize("seed, Bp, Hp", [(0, 2, 2), (1, 1, 2), (2, 2, 1), (3, 1, 1)])
def test_matches_dense_reference_on_random_plans(seed, Bp, Hp):
    g = torch.Generator().manual_seed(seed)
    B, H, M, N, bs, D = 2, 2, 5, 6, 16, 8
    mask = torch.rand(Bp, Hp, M, N, generator=g) < 0.4
    mask[..., 0, :] = True                         # a dense row (as text rows are)
    mask[..., 1, :] = False                        # a row that sees nothing
    k_valid = torch.randint(0, bs + 1, (B, N), generator=g)
    q_valid = torch.randint(0, bs + 1, (B, M), generator=g)
    plan = BlockSparsePlan.from_block_mask(mask, bs, bs, k_valid, q_valid)
    q, k, v = (torch.randn(B, H, n * bs, D, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (M, N, N))
    out, lse = block_sparse_attention_torch(q, k, v, plan, 0.3)
    ref_out, ref_lse = _dense_reference(q, k, v, plan, 0.3)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_l2(out, ref_out) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-6, atol=1e-6)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * w).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads):
        assert rel_l2(a, r) < 1e-10


def test_row_buckets_cover_kept_rows_with_at_most_twice_the_slots():
    counts = torch.tensor([0, 64, 1, 1, 3, 4, 5, 64, 2, 0, 9] + [1] * 20)
    buckets = row_buckets(counts)
    rows = torch.cat([r for r, _ in buckets]).sort().values
    assert rows.tolist() == [i for i, c in enumerate(counts.tolist()) if c > 0]
    for r, width in buckets:
        assert width >= counts[r].max() and len(r) * width <= 2 * counts[r].sum()
    assert len(buckets) > 1                                   # the dense rows are apart
    assert len(row_buckets(torch.tensor([4, 3, 4, 4, 2]))) == 1  # close counts share one bucket


def test_memory_is_proportional_to_kept_blocks_not_to_the_widest_row():
    """One dense row (text) among 127 rows keeping one block: no allocation of dense size."""
    M, bs, D = 128, 16, 16
    mask = torch.eye(M, dtype=torch.bool)
    mask[-1, :] = True
    plan = BlockSparsePlan.from_block_mask(mask, bs)
    q, k, v = torch.randn(3, 1, 1, M * bs, D).unbind(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out, _ = block_sparse_attention_torch(q, k, v, plan)
    largest = max(e.cpu_memory_usage for e in prof.events())
    dense_scores = M * bs * M * bs * 4                               # what padding every row costs
    assert largest < dense_scores / 16, (largest, dense_scores)
    torch.testing.assert_close(out[0, 0, -bs:], torch.softmax(q[0, 0, -bs:] @ k[0, 0].T / 4, -1) @ v[0, 0])


@pytest.mark.parametrize("pad", ["zero", "repeat", "mask"])
def test_meta_tensors_give_shapes_without_data(pad):
    """Shape inference on the meta device (as with SDPA) used to fail inside the torch backend with
    "Cannot copy out of meta tensor" (it reads the kept-block counts on the host)."""
    from video_sparse_attn import SSTAConfig, block_sparse_attention, ssta_attention

    q = torch.empty(2, 2, 4 * 8 + 5, 16, device="meta", requires_grad=True)
    cfg = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(1, 1, 1), topk=1, pad_type=pad, caller_rules=False)
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    out, lse = ssta_attention(q, q, q, (2, 4, 4), cfg, 5, mask, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == q.shape[:3]
    out.sum().backward()
    assert q.grad.shape == q.shape
    out, lse = block_sparse_attention(q.detach().half(), q.detach().half(), q.detach().half(),
                                      torch.ones(3, 3, dtype=torch.bool, device="meta"), q_block=16)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, torch.float16, q.shape[:3], torch.float32)


def test_autocast_leaves_the_ops_in_the_inputs_dtype():
    """Under CPU autocast the torch backend ran its matmuls (and the SSTA selection) in bfloat16 while
    returning float32: results moved by ~3e-2 and differed from the Triton kernels, which ignore autocast."""
    from video_sparse_attn import SSTAConfig, block_sparse_attention, ssta_attention

    q, k, v = torch.randn(3, 1, 2, 4 * 8 + 5, 16).unbind(0)
    cfg = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(1, 1, 1), topk=1, caller_rules=False)
    mask = torch.rand(1, 2, 3, 3) > 0.3
    ref = ssta_attention(q, k, v, (2, 4, 4), cfg, 5, backend="torch", return_lse=True)
    ref_b = block_sparse_attention(q, k, v, mask, q_block=16, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssta_attention(q, k, v, (2, 4, 4), cfg, 5, backend="torch", return_lse=True)
        got_b = block_sparse_attention(q, k, v, mask, q_block=16, backend="torch")
        assert torch.is_autocast_enabled("cpu")          # the caller's autocast is left on
    for a, b in zip((*got, *got_b), (*ref, *ref_b)):
        assert a.dtype == b.dtype and torch.equal(a, b)

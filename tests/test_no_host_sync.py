"""The mask → plan path never synchronises with the host."""

import math

import pytest
import torch

from video_sparse_attn import BlockSparsePlan, SSTAConfig, TileLayout
from video_sparse_attn.masks import block_mask_from_tiled

CONFIGS = [
    SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 3, 3), topk=3, caller_rules=False),
    SSTAConfig(tile_thw=(2, 4, 4), topk=10, sparse_type="block_attn", sampling_type="similarity", threshold=0.5,
               caller_rules=False),
    SSTAConfig(tile_thw=(2, 4, 4), topk=2, mask_share_within_head=True, pad_type="mask", caller_rules=False),
    SSTAConfig(tile_thw=(2, 4, 4), sparse_type="dense", pad_type="repeat", caller_rules=False),
]


def _mask_and_plan(q, k, thw, config, L, text_mask):
    layout = TileLayout(thw, config.tile_thw, L, config.pad_type)
    layout.indices(q.device)  # index tensors are built once per shape (cached), outside the hot path
    q_t, k_t = layout.tile(q), layout.tile(k)
    mask = block_mask_from_tiled(q_t, k_t, layout, config, text_mask)
    plan = BlockSparsePlan.from_block_mask(mask, layout.block_size, layout.block_size,
                                           layout.key_valid(text_mask, q.device))
    return mask, plan


def _inputs(device):
    thw, L = (5, 10, 13), 40
    q, k = torch.randn(2, 2, 2, math.prod(thw) + L, 16, device=device).unbind(0)
    tm = torch.zeros(2, L, dtype=torch.bool, device=device)
    tm[0, :40] = True
    tm[1, :17] = True
    return q, k, thw, L, tm


@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_path_never_reads_values_on_the_host(config, monkeypatch):
    q, k, thw, L, tm = _inputs("cpu")
    _mask_and_plan(q, k, thw, config, L, tm)  # warm the per-shape caches

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value on the mask/plan path")

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    mask, plan = _mask_and_plan(q, k, thw, config, L, tm)
    monkeypatch.undo()
    assert torch.equal(plan.to_dense().expand_as(mask), mask)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_path_makes_no_sync(config):
    q, k, thw, L, tm = _inputs("cuda")
    _mask_and_plan(q, k, thw, config, L, tm)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _mask_and_plan(q, k, thw, config, L, tm)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _window_plan_and_lists(device):
    from video_sparse_attn.attention import _plan_for_mask
    from video_sparse_attn.kernels.fa4 import fa4_block_lists
    from video_sparse_attn.plan import window_offsets

    mask = torch.rand(2, 3, 5, 4, device=device) < 0.7
    plan = _plan_for_mask(mask, 600, 500, 128, 128, window_offsets(600, 500, True, (300, -1)))
    return plan, fa4_block_lists(plan, 2, cache=False)


def test_window_plan_and_fa4_lists_read_no_values_on_the_host(monkeypatch):
    """The window's block dropping and FA4's window lists are pure tensor ops (CPU proxy of the GPU check)."""
    _window_plan_and_lists("cpu")

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value on the window plan path")

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    plan, lists = _window_plan_and_lists("cpu")
    monkeypatch.undo()
    assert plan.window_hi == -100 and plan.window_lo == -400 and lists.row_bounds is not None


@pytest.mark.gpu
def test_window_plan_and_fa4_lists_make_no_sync():
    _window_plan_and_lists("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _window_plan_and_lists("cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "fa4"])
@pytest.mark.parametrize("padding_free", [True, False])
def test_ssta_attention_makes_no_sync(backend, padding_free):
    """A whole `ssta_attention` call (layout, mask, plan, kernels, untile), forward and backward, enqueues
    without waiting for the GPU once its shape was seen (a host wait each call leaves the GPU idle while
    the host enqueues the mask and plan kernels)."""
    from video_sparse_attn import ssta_attention
    from video_sparse_attn.attention import resolve_backend

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        resolve_backend(backend, torch.empty(1, 2, 1, 128, device="cuda", dtype=torch.bfloat16))
    except (ValueError, RuntimeError) as e:
        pytest.skip(f"{backend}: {e}")
    thw, L = (6, 16, 16), 100
    cfg = SSTAConfig(tile_thw=(6, 8, 8), kernel_thw=(1, 3, 3), topk=2, caller_rules=False)
    q, k, v = (torch.randn(1, 2, math.prod(thw) + L, 128, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    tm = torch.zeros(1, L, dtype=torch.bool, device="cuda")
    tm[:, :60] = True

    def step():
        out = ssta_attention(q, k, v, thw, cfg, L, tm, backend=backend, padding_free=padding_free)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)

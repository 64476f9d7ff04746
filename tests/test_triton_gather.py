"""The Triton row gather with fused tile means (interpreter on CPU, the real kernel on CUDA)."""

import pytest
import torch

from video_sparse_attn import TileLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("grid, tile, L, pad", [((3, 5, 6), (2, 4, 4), 7, "zero"), ((2, 4, 8), (1, 4, 4), 0, "mask"),
                                                ((3, 3, 5), (2, 2, 4), 20, "repeat")])
@pytest.mark.parametrize("D", [16, 24])
def test_gather_with_means_matches_torch(grid, tile, L, pad, D):
    from video_sparse_attn.kernels.triton_gather import gather_rows_with_means

    lay = TileLayout(grid, tile, L, pad)
    x = torch.randn(2, 3, lay.seq_len, 2, D, device=DEVICE)[..., 0, :]   # a strided view [B, H, S, D]
    x = x.transpose(1, 2).contiguous().transpose(1, 2)                      # and non-contiguous heads
    y, means = gather_rows_with_means(x, lay.indices(DEVICE)["kernel_src"], lay.block_size, lay.num_video_blocks)
    ref = lay.tile(x.cpu()).to(DEVICE)
    assert torch.equal(y, ref)
    ref_means = ref[:, :, : lay.num_video_blocks * lay.block_size].unflatten(2, (lay.num_video_blocks, -1)).mean(3)
    torch.testing.assert_close(means, ref_means, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_tile_with_means_on_cuda_matches_cpu():
    lay = TileLayout((5, 9, 13), (2, 4, 4), 30, "zero")
    x = torch.randn(1, 4, lay.seq_len, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    y, m = lay.tile_with_means(x)
    y_cpu, m_cpu = lay.tile_with_means(x.detach().cpu())
    assert torch.equal(y.cpu(), y_cpu)
    torch.testing.assert_close(m.cpu(), m_cpu, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), x)
    xc = x.detach().cpu().double().requires_grad_()
    (gref,) = torch.autograd.grad((lay.tile(xc) * g.cpu().double()).sum(), xc)
    torch.testing.assert_close(gx.cpu().double(), gref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("R", [1, 50, 130])
def test_gather_rows_any_count_without_means(R):
    """Without means the gather takes any number of rows (the last group ragged): equals index_select."""
    from video_sparse_attn.kernels.triton_gather import gather_rows_with_means

    x = torch.randn(2, 3, 40, 24, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    src = torch.randint(-1, 40, (R,), device=DEVICE)
    y, means = gather_rows_with_means(x, src, 64, 0)
    ref = x.index_select(2, src.clamp(min=0)) * (src >= 0)[:, None].to(x.dtype)
    assert means is None and torch.equal(y, ref)

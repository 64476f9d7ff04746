"""Gluon sm90 block-sparse forward: import guard, its algorithm (torch, any device), sm90 compilation
without a GPU (needs Gluon) and, on a Hopper GPU, the kernel itself against the torch backend and the
Triton forward."""

import pytest
import torch

from video_sparse_attn.kernels import gluon_fwd as gf


def _dense(q, k, v, scale):
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.float(), torch.logsumexp(s, -1)


def test_import_without_gluon_is_safe():
    assert isinstance(gf.HAS_GLUON, bool)
    if not gf.HAS_GLUON:
        from video_sparse_attn import BlockSparsePlan

        x = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError):
            gf.gluon_sparse_forward(x, x, x, BlockSparsePlan.dense(1, 1, 1, 1, 128), 0.125)
        assert gf.sparse_unsupported(x, x, x, BlockSparsePlan.dense(1, 1, 1, 1, 128)) == "Triton has no Gluon"


@pytest.mark.parametrize("block_n", [128, 64])
def test_gluon_tile_loop_reference_matches_dense(block_n):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64, dtype=torch.bfloat16) * 2 for _ in range(3))
    out, lse = gf.tile_loop_reference(q, k, v, block_n=block_n)
    ref_out, ref_lse = _dense(q, k, v, 64 ** -0.5)
    assert ((out.float() - ref_out).norm() / ref_out.norm()) < 1e-2
    assert (lse - ref_lse).abs().max() < 1e-4


@pytest.mark.skipif(not gf.HAS_GLUON, reason="needs Triton with Gluon")
def test_gluon_compiles_for_sm90():
    """The block-sparse kernel (D=128 and 64 in bf16, D=128 in fp16) compiles for sm90 without a GPU, with no
    stack (spills) and within 227 KiB of shared memory. In a child process: the CPU suite runs Triton's interpreter, Gluon has none."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(root / "scripts" / "gluon_compile_check.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    shared = [int(x) for x in re.findall(r"shared=(\d+) B", p.stdout)]
    stacks = re.findall(r"STACK:(\d+)", p.stdout)
    n = 3
    assert len(shared) == n and len(stacks) >= n, p.stdout
    assert all(x <= 232448 for x in shared) and all(st == "0" for st in stacks), p.stdout


# ------------------------------------------------------------------------------------------------------
# Block-sparse Gluon forward (the Triton backend's forward on Hopper)
# ------------------------------------------------------------------------------------------------------

def test_tma_rows_views():
    """The 2-D TMA view of the layouts the backend receives (pure stride arithmetic, any device)."""
    B, H, S, D = 2, 3, 256, 64
    x = torch.empty(B, H, S, D, dtype=torch.bfloat16)
    assert gf.tma_rows(x) == (B * H * S, D, H * S, S, 0)
    t = torch.empty(B, S, H, D, dtype=torch.bfloat16).transpose(1, 2)           # diffusers' [B, S, H, D]
    assert gf.tma_rows(t) == (B * S, H * D, S, 0, D)
    fused = torch.empty(B, S, 3, H, D, dtype=torch.bfloat16)                     # a fused QKV projection
    kv = fused[:, :, 1].transpose(1, 2)
    assert gf.tma_rows(kv) == (B * S, 3 * H * D, S, 0, D)
    shared = torch.empty(B, 1, S, D, dtype=torch.bfloat16).expand(B, H, S, D)    # grouped heads, expanded
    assert gf.tma_rows(shared) == (B * S, D, S, 0, 0)
    assert gf.tma_rows(torch.empty(B, H, D, S, dtype=torch.bfloat16).transpose(2, 3)) is None
    assert gf.tma_rows(torch.empty(B, H, S, 2 * D, dtype=torch.bfloat16)[..., 1:D + 1]) is None   # misaligned


def test_gluon_not_used_off_hopper():
    from video_sparse_attn import BlockSparsePlan
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options
    from video_sparse_attn.kernels.triton_fwd import gluon_usable

    q = torch.zeros(1, 2, 384, 128, dtype=torch.bfloat16)
    plan = BlockSparsePlan.dense(1, 1, 1, 1, 384)
    assert resolve_kernel_options(None)["gluon"] is True
    assert not gluon_usable(q, q, q, plan, resolve_kernel_options(None))
    assert not gluon_usable(q, q, q, plan, resolve_kernel_options({"gluon": False}))
    assert gf.sparse_unsupported(q, q, q, plan) is not None


HOPPER = torch.cuda.is_available() and gf.HAS_GLUON and torch.cuda.get_device_capability()[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU and Gluon")


def _sparse_case(B, H, Mq, Nk, qb, kb, D, dtype, density, plan_b, plan_h, bshd, seed=0):
    """A random plan with every edge the kernel handles: an empty row, a row with every block, ragged
    k_valid (0, 1, a multiple of 128, not a multiple, full), a wholly padded query block, partly padded
    ones (one ending inside the first 64-row half of a tile); q holds NaN in padded rows, k large
    finite values past k_valid."""
    from video_sparse_attn import BlockSparsePlan

    g = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(plan_b, plan_h, Mq, Nk, device="cuda", generator=g) < density
    mask[..., -1, :] = True
    if density < 1.0:
        mask[..., 0, :] = False
    Bv = plan_b
    k_valid = torch.randint(0, kb + 1, (Bv, Nk), device="cuda", generator=g, dtype=torch.int32)
    k_valid = torch.where(torch.rand(Bv, Nk, device="cuda", generator=g) < 0.6, kb, k_valid)
    special = [0, 1, 128, kb - 5, 100]
    for i, val in enumerate(special[:Nk]):
        k_valid[:, (i * 3 + 1) % Nk] = min(val, kb)
    q_valid = torch.full((Bv, Mq), qb, dtype=torch.int32, device="cuda")
    q_valid[:, -1] = qb // 3 + 5
    if Mq > 2:
        q_valid[:, Mq // 2] = 0
    if Mq > 3:
        q_valid[:, 1] = 40                     # ends inside consumer 0's half of the first tile
    if Mq > 4:
        q_valid[:, 2] = 130                    # ends inside the second tile (qb >= 256) or is full
    plan = BlockSparsePlan.from_block_mask(mask, qb, kb, k_valid, q_valid)

    def t(S):
        if bshd:
            return torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
        return torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g)

    q, k, v = t(Mq * qb), t(Nk * kb), t(Nk * kb)
    with torch.no_grad():
        qpad = ~plan.query_valid().expand(B, -1)[:, None, :, None]
        q.masked_fill_(qpad, float("nan"))
        kpad = ~plan.token_valid().expand(B, -1)[:, None, :, None]
        k.masked_fill_(kpad, 300.0)
        v.masked_fill_(kpad, -50.0)
    return plan, q, k, v


def _run(q, k, v, plan, gluon, grad=None):
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    qi, ki, vi = (x.detach().requires_grad_(grad is not None) for x in (q, k, v))
    out, lse = block_sparse_attention_triton(qi, ki, vi, plan, kernel_options={"gluon": gluon, "autotune": False})
    grads = None
    if grad is not None:
        grads = torch.autograd.grad(out, (qi, ki, vi), grad)
    return out.detach(), lse.detach(), grads


_SPARSE_CASES = [
    # B, H, Mq, Nk, qb, kb, D, dtype, density, plan_b, plan_h, bshd
    (2, 2, 8, 8, 384, 384, 128, torch.bfloat16, 0.3, 2, 1, False),
    (2, 2, 8, 8, 384, 384, 128, torch.bfloat16, 1.0, 1, 1, True),
    (2, 3, 12, 12, 128, 128, 128, torch.bfloat16, 0.4, 1, 1, True),
    (1, 16, 6, 18, 384, 128, 64, torch.float16, 0.5, 1, 16, False),
    (2, 4, 16, 6, 128, 384, 64, torch.bfloat16, 0.3, 2, 4, True),
    (2, 2, 8, 8, 384, 384, 128, torch.float16, 0.05, 2, 2, False),
]


@hopper
@pytest.mark.parametrize("case", _SPARSE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_gluon_sparse_forward_gpu(case):
    from helpers import rel_l2
    from video_sparse_attn.kernels.torch_ref import block_sparse_attention_torch
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options
    from video_sparse_attn.kernels.triton_fwd import gluon_usable

    plan, q, k, v = _sparse_case(*case)
    assert gluon_usable(q, k, v, plan, resolve_kernel_options(None))
    out, lse, _ = _run(q, k, v, plan, True)
    out_t, lse_t, _ = _run(q, k, v, plan, False)
    pad = ~plan.query_valid().expand(q.shape[0], -1)[:, None, :].expand(lse.shape)
    assert (out[pad] == 0).all() and torch.isneginf(lse[pad]).all()
    assert not out.isnan().any() and not lse.isnan().any()
    q0 = q.detach().masked_fill(pad[..., None], 0.0)
    ref, ref_lse = block_sparse_attention_torch(q0.double(), k.double(), v.double(), plan)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_t))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=1e-2, rtol=1e-3)
    assert torch.allclose(lse[fin], lse_t[fin], atol=1e-2, rtol=1e-3)
    assert rel_l2(out, ref) < 1e-2
    assert rel_l2(out, out_t) < 1e-2
    # three-slot K/V rings: the same operations in the same order, so the same bits
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton

    out3, lse3 = block_sparse_attention_triton(q, k, v, plan, kernel_options={"gluon_fwd_stages": 3})
    assert torch.equal(out3, out) and torch.equal(lse3, lse)


@hopper
@pytest.mark.parametrize("case", [_SPARSE_CASES[0], _SPARSE_CASES[4]], ids=["384", "128x384"])
def test_gluon_sparse_backward_matches_triton_forward(case):
    """The backward reuses out and lse: gradients after the Gluon forward equal those after the Triton
    forward to bf16 rounding."""
    from helpers import rel_l2

    plan, q, k, v = _sparse_case(*case)
    with torch.no_grad():      # finite padded rows for the gradient comparison (their dq is 0 anyway)
        q.nan_to_num_(0.0)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=torch.Generator(device="cuda").manual_seed(3))
    out, lse, grads = _run(q, k, v, plan, True, dout)
    out_t, lse_t, grads_t = _run(q, k, v, plan, False, dout)
    assert rel_l2(out, out_t) < 1e-2
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_t):
        assert not a.isnan().any(), name
        assert rel_l2(a, b) < 2e-2, name


@hopper
@pytest.mark.parametrize("bshd", [False, True], ids=["bhsd", "bshd"])
def test_gluon_through_ssta_attention(bshd, monkeypatch):
    """`ssta_attention(backend="triton")` (padding-free plan: ragged key and query blocks) with the Gluon
    forward against the Triton forward (option default switched off), forward and backward."""
    from helpers import rel_l2
    from video_sparse_attn import SSTAConfig, ssta_attention
    from video_sparse_attn.kernels import triton_common

    torch.manual_seed(0)
    thw, text_len, H, D = (7, 18, 20), 300, 4, 128
    S = thw[0] * thw[1] * thw[2] + text_len
    cfg = SSTAConfig().for_thw(thw)
    tm = torch.zeros(1, text_len, dtype=torch.bool, device="cuda")
    tm[:, :200] = True

    def make():
        if bshd:
            return torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16)

    q, k, v = make(), make(), make()
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    results = {}
    for gluon in (True, False):
        monkeypatch.setitem(triton_common._DEFAULTS, "gluon", gluon)
        qi, ki, vi = (x.detach().requires_grad_() for x in (q, k, v))
        out = ssta_attention(qi, ki, vi, thw, cfg, text_len, tm, backend="triton")
        results[gluon] = (out.detach(), *torch.autograd.grad(out, (qi, ki, vi), dout))
    ref = ssta_attention(q, k, v, thw, cfg, text_len, tm, backend="torch")
    assert rel_l2(results[True][0], ref) < 1e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[True], results[False]):
        assert not a.isnan().any(), name
        assert rel_l2(a, b) < 2e-2, name


def test_gluon_needs_a_recent_triton():
    """Gluon's API changed between releases: a Triton older than the one the kernels are written for counts
    as "no Gluon" (the Triton kernels run), instead of failing to compile at the first call."""
    from video_sparse_attn.kernels.gluon_common import version_supported

    assert version_supported("3.6.0") and version_supported("3.9.0+git1a2b3c") and version_supported("4.0.0")
    assert not version_supported("3.5.1") and not version_supported("3.4.0") and not version_supported("2.3.1")

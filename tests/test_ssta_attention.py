"""ssta_attention (torch backend): exactness vs dense attention, gradients, NaN, input errors."""

import math
import random

import pytest
import torch

from helpers import assert_grads_match, dense_masked_attention, rel_l2
from video_sparse_attn import SSTAConfig, TileLayout, ssta_attention

TILES = [(1, 4, 4), (2, 4, 4), (2, 2, 4), (1, 2, 8), (4, 4, 4), (1, 1, 16)]


def _random_case(rng: random.Random):
    thw = (rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 11))
    tile = rng.choice(TILES)
    B, H, D = rng.randint(1, 3), rng.randint(1, 2), rng.choice([8, 16])
    L = rng.choice([0, 0, rng.randint(1, 40), rng.randint(1, 1000)])
    layout = TileLayout(thw, tile, L, "mask")
    kind = rng.choice(["ssta", "sta", "block_attn", "dense"])
    kernel = (9, 9, 9) if kind in ("ssta", "sta") and rng.random() < 0.5 else (1, 1, 1)
    topk = layout.num_video_blocks + rng.randint(0, 3)
    if kind == "ssta" and kernel == (1, 1, 1) or kind == "block_attn":
        pass  # topk >= Nv keeps every block
    elif kind == "sta":
        kernel = (2 * max(layout.tiles_thw) + 1,) * 3  # a window covering the grid
    config = SSTAConfig(tile_thw=tile, kernel_thw=kernel, topk=topk, sparse_type=kind, pad_type="mask",
                        sampling_type=rng.choice(["importance", "similarity"]), caller_rules=False)
    text_mask = None
    if L and rng.random() < 0.7:
        text_mask = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            text_mask[b, : rng.choice([0, L, rng.randint(0, L)])] = True
    return thw, config, B, H, D, L, text_mask


def _key_valid(B, thw, L, text_mask):
    video = torch.ones(B, math.prod(thw), dtype=torch.bool)
    text = torch.ones(B, L, dtype=torch.bool) if text_mask is None else text_mask
    return torch.cat([video, text], dim=1)


@pytest.mark.parametrize("seed", range(52))
def test_keeping_every_block_equals_dense_attention_over_real_tokens(seed):
    rng = random.Random(seed)
    thw, config, B, H, D, L, text_mask = _random_case(rng)
    S = math.prod(thw) + L
    q, k, v = torch.randn(3, B, H, S, D).unbind(0)
    out, info = ssta_attention(q, k, v, thw, config, L, text_mask, backend="torch", return_info=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = dense_masked_attention(q, k, v, _key_valid(B, thw, L, text_mask))
    assert rel_l2(out, ref) < 1e-5, (thw, config, B, H, L)


def test_gradients_match_float64_dense_reference():
    thw, L = (3, 5, 7), 23
    config = SSTAConfig(tile_thw=(2, 2, 4), kernel_thw=(1, 1, 1), topk=100, pad_type="mask", caller_rules=False)
    B, H, D = 2, 2, 8
    S = math.prod(thw) + L
    tm = torch.zeros(B, L, dtype=torch.bool)
    tm[0, :23] = True
    tm[1, :5] = True
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, S, D, dtype=torch.float64)
    grads = torch.autograd.grad((ssta_attention(q, k, v, thw, config, L, tm, backend="torch") * g).sum(), (q, k, v))
    ref = torch.autograd.grad((dense_masked_attention(q, k, v, _key_valid(B, thw, L, tm)) * g).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        assert rel_l2(a, b) < 1e-10


def test_sparse_gradients_match_dense_over_the_expanded_mask():
    """A sparse mask: gradients equal those of dense attention masked by the expanded block mask."""
    thw, L = (4, 8, 8), 16
    config = SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 1, 1), topk=2, caller_rules=False)
    q, k, v = (torch.randn(1, 2, math.prod(thw) + L, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, info = ssta_attention(q, k, v, thw, config, L, backend="torch", return_info=True)
    lay = info.layout
    assert 0 < float(info.density) < 1
    tok = info.block_mask.repeat_interleave(lay.block_size, -1).repeat_interleave(lay.block_size, -2)
    qt, kt, vt = lay.tile(q), lay.tile(k), lay.tile(v)
    s = (qt @ kt.transpose(-1, -2)) / math.sqrt(8)
    ref = lay.untile(torch.softmax(s.masked_fill(~tok, float("-inf")), -1) @ vt)
    assert rel_l2(out, ref) < 1e-12
    assert_grads_match(out, (q, k, v), ref, 1e-10)


def test_nan_inputs_propagate_without_error():
    thw = (2, 4, 8)
    q, k, v = torch.randn(3, 1, 2, 64 + 5, 16).unbind(0)
    q[0, 0, 3, 0] = float("nan")
    out = ssta_attention(q, k, v, thw, SSTAConfig(tile_thw=(2, 4, 4), caller_rules=False), 5, backend="torch")
    assert torch.isnan(out).any()


def test_strided_inputs_and_dtypes():
    thw, L = (2, 4, 8), 9
    x = torch.randn(3, 2, math.prod(thw) + L, 2, 16)  # [B, S, H, D] like diffusers
    q, k, v = (t.transpose(1, 2) for t in x.unbind(0))
    cfg = SSTAConfig(tile_thw=(2, 4, 4), topk=1, caller_rules=False)
    a = ssta_attention(q, k, v, thw, cfg, L, backend="torch")
    b = ssta_attention(q.contiguous(), k.contiguous(), v.contiguous(), thw, cfg, L, backend="torch")
    torch.testing.assert_close(a, b)
    h = ssta_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), thw, cfg, L, backend="torch")
    assert h.dtype == torch.bfloat16 and rel_l2(h, a) < 2e-2


GOOD = dict(thw=(2, 4, 8), text_len=4)


def _qkv(S=68, B=1, H=2, D=16, dtype=torch.float32):
    return torch.randn(3, B, H, S, D, dtype=dtype).unbind(0)


@pytest.mark.parametrize("change, err, words", [
    (dict(thw=(2, 4, 9)), ValueError, r"S=68 does not match the grid: t\*h\*w \+ text_len = 2\*4\*9 \+ 4 = 76"),
    (dict(text_len=-1), ValueError, "text_len"),
    (dict(thw=(2, 4)), ValueError, "thw must be three positive ints"),
    (dict(text_mask=torch.ones(1, 5, dtype=torch.bool)), ValueError, r"text_mask must be \[B, text_len\]"),
    (dict(text_mask=torch.ones(1, 4)), TypeError, "text_mask must be a bool tensor"),
    (dict(config={"topk": 3}), TypeError, "config must be an SSTAConfig"),
    (dict(backend="cuda", config=SSTAConfig(tile_thw=(2, 4, 4))), ValueError, "backend must be one of"),
])
def test_bad_arguments(change, err, words):
    q, k, v = _qkv()
    kwargs = {**GOOD, **change}
    with pytest.raises(err, match=words):
        ssta_attention(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="4-D"):
        ssta_attention(q[0], k[0], v[0], **GOOD)
    with pytest.raises(ValueError, match="shapes differ"):
        ssta_attention(q, k[:, :1], v, **GOOD)
    with pytest.raises(TypeError, match="must be float16/bfloat16/float32/float64"):
        ssta_attention(q.long(), k.long(), v.long(), **GOOD)
    with pytest.raises(TypeError, match="dtypes differ"):
        ssta_attention(q, k.double(), v, **GOOD)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ssta_attention(q.numpy(), k, v, **GOOD)


def test_triton_backend_without_cuda_or_interpreter_is_refused_clearly(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    with pytest.raises((RuntimeError, ValueError), match="CUDA|TRITON_INTERPRET"):
        ssta_attention(q, k, v, **GOOD, config=SSTAConfig(tile_thw=(2, 4, 4)), backend="triton")

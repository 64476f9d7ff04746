"""Inputs that used to give silently wrong answers are refused with one clear error."""

import dataclasses
import math

import pytest
import torch

from video_sparse_attn import BlockSparsePlan, SSTAConfig, TileLayout, ssta_attention
from video_sparse_attn.attention import block_sparse_attention
from video_sparse_attn.validation import check_tiles

THW, L = (2, 4, 8), 6
CFG = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(1, 1, 1), topk=1, caller_rules=False)


def _qkv(thw=THW, text_len=L, B=2, H=2, D=16, dtype=torch.float32):
    return torch.randn(3, B, H, math.prod(thw) + text_len, D, dtype=dtype).unbind(0)


# ---------------------------------------------------------------- text masks
def test_non_prefix_text_mask_is_refused_on_cpu():
    q, k, v = _qkv()
    mask = torch.tensor([[True] * 6, [False, True, True, False, False, False]])
    with pytest.raises(ValueError, match=r"text_mask\[1\] is not a prefix mask"):
        ssta_attention(q, k, v, THW, CFG, L, mask, backend="torch")
    prefix = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    assert ssta_attention(q, k, v, THW, CFG, L, prefix, backend="torch").shape == q.shape
    # validate=False skips the value check (for callers that know their masks)
    ssta_attention(q, k, v, THW, CFG, L, mask, backend="torch", validate=False)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32])
def test_integer_text_masks_are_refused(dtype):
    q, k, v = _qkv()
    mask = torch.ones(2, L, dtype=dtype)
    mask[0, 0] = 255 if dtype == torch.uint8 else 3
    with pytest.raises(TypeError, match=f"text_mask must be a bool tensor.*{dtype}"):
        ssta_attention(q, k, v, THW, CFG, L, mask, backend="torch")


# ---------------------------------------------------------------- config parsing
@pytest.mark.parametrize("text, expected", [("false", False), ("False", False), ("0", False), (0, False),
                                            ("true", True), ("1", True), (True, True)])
def test_from_hunyuan_parses_booleans_strictly(text, expected):
    c = SSTAConfig.from_hunyuan({"attn_use_text_mask": text, "attn_mask_share_within_head": text})
    assert c.use_text_mask is expected and c.mask_share_within_head is expected


@pytest.mark.parametrize("text", ["maybe", "", 2, None])
def test_from_hunyuan_refuses_non_booleans(text):
    with pytest.raises(ValueError, match=f"attn_use_text_mask must be a boolean.*{text!r}"[:40]):
        SSTAConfig.from_hunyuan({"attn_use_text_mask": text})


@pytest.mark.parametrize("field", ["tile_thw", "kernel_thw"])
@pytest.mark.parametrize("value", ["144", "1,4,4", ("1", 4, 4)])
def test_strings_are_refused_where_triples_are_expected(field, value):
    with pytest.raises(TypeError, match=field):
        SSTAConfig(**{field: value})


# ---------------------------------------------------------------- strict tiles in the op
def test_op_refuses_a_tile_longer_than_the_grid_with_visible_padding():
    thw = (4, 8, 8)
    q, k, v = _qkv(thw, 0, B=1)
    for cfg in (SSTAConfig(), SSTAConfig(sparse_type="dense"), SSTAConfig(pad_type="repeat")):
        with pytest.raises(ValueError, match=r"longer than the latent grid thw=\(4, 8, 8\) along t \(6 > 4\)"):
            ssta_attention(q, k, v, thw, cfg, backend="torch")
    # the same message as the processors' check: one rule, one home
    with pytest.raises(ValueError) as op_error:
        ssta_attention(q, k, v, thw, SSTAConfig(), backend="torch")
    with pytest.raises(ValueError) as rule_error:
        check_tiles(SSTAConfig(), thw)
    assert str(op_error.value) == str(rule_error.value)
    # masked padding is exact; strict_tiles=False runs it anyway
    ssta_attention(q, k, v, thw, SSTAConfig(pad_type="mask"), backend="torch")
    ssta_attention(q, k, v, thw, SSTAConfig(), backend="torch", strict_tiles=False)


def test_processor_tile_check_calls_the_shared_rule(monkeypatch):
    from video_sparse_attn.processors import SSTAAttnProcessor
    from video_sparse_attn.processors import base

    seen = []
    monkeypatch.setattr(base, "check_tiles", lambda config, thw: seen.append((config, tuple(thw))))
    SSTAAttnProcessor(SSTAConfig())._check_tiles(SSTAConfig(), (4, 8, 8))
    assert seen == [(SSTAConfig(), (4, 8, 8))]
    SSTAAttnProcessor(SSTAConfig(), strict_tiles=False)._check_tiles(SSTAConfig(), (4, 8, 8))
    assert len(seen) == 1


# ---------------------------------------------------------------- block_sparse_attention, every backend
def _plan_inputs(B=1, H=2, M=3, bs=16, D=8, dtype=torch.float32):
    q, k, v = torch.randn(3, B, H, M * bs, D, dtype=dtype).unbind(0)
    return q, k, v, BlockSparsePlan.dense(B, H, M, M, bs)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_torch_backend_refuses_bad_scale(scale):
    q, k, v, plan = _plan_inputs()
    with pytest.raises(ValueError, match="scale must be a finite positive float"):
        block_sparse_attention(q, k, v, plan, scale, backend="torch")


def test_torch_backend_refuses_bad_dtypes_and_shapes():
    q, k, v, plan = _plan_inputs()
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64, got torch.int64"):
        block_sparse_attention(q.long(), k.long(), v.long(), plan, backend="torch")
    with pytest.raises(TypeError, match="dtypes differ"):
        block_sparse_attention(q, k.double(), v, plan, backend="torch")
    with pytest.raises(ValueError, match="plan covers Sq=3\\*16"):
        block_sparse_attention(q[:, :, :32], k, v, plan, backend="torch")
    with pytest.raises(ValueError, match="k and v must be"):
        block_sparse_attention(q, k[..., :4], v, plan, backend="torch")
    with pytest.raises(ValueError, match="batch/head dims"):
        block_sparse_attention(q, k, v, BlockSparsePlan.dense(1, 3, 3, 3, 16), backend="torch")
    out, _ = block_sparse_attention(q, k, v, plan, 0.5, backend="torch")
    assert out.shape == q.shape


# ---------------------------------------------------------------- TileLayout and plan
@pytest.mark.parametrize("kwargs, words", [
    (dict(pad_type="zeros"), "pad_type must be one of"),
    (dict(tile_thw=(4, 4)), "tile_thw must be three positive ints"),
    (dict(tile_thw="144"), "tile_thw must be three positive ints"),
    (dict(grid_thw=(2, 4, 0)), "grid_thw must be three positive ints"),
    (dict(grid_thw=(2.5, 4, 4)), "grid_thw must be three positive ints"),
    (dict(text_len=-1), "text_len must be an int >= 0"),
])
def test_tile_layout_refuses_bad_inputs(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TileLayout(**{"grid_thw": (2, 4, 4), "tile_thw": (1, 4, 4), **kwargs})


def test_k_valid_is_clamped_before_the_int32_cast():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    plan = BlockSparsePlan.from_block_mask(mask, 16, 16, torch.tensor([[2**40, -5]], dtype=torch.int64))
    assert plan.k_valid.tolist() == [[16, 0]] and plan.k_valid.dtype == torch.int32


# ---------------------------------------------------------------- block_sparse_attention's arguments as given
def _mask_inputs(S=40, Sk=None, H=2, Hk=None, D=16):
    Sk = S if Sk is None else Sk
    q = torch.randn(1, H, S, D)
    k, v = torch.randn(2, 1, Hk or H, Sk, D).unbind(0)
    return q, k, v, torch.ones(-(-S // 16), -(-Sk // 16), dtype=torch.bool)


def test_block_sparse_attention_refuses_k_and_v_of_different_lengths():
    """v one token short used to be zero-padded to k's blocks and run: a silently wrong answer."""
    q, k, v, mask = _mask_inputs()
    with pytest.raises(ValueError, match="k and v have different lengths: 40 and 39"):
        block_sparse_attention(q, k, v[:, :, :39], mask, q_block=16, backend="torch")
    with pytest.raises(ValueError, match="k and v shapes differ"):
        block_sparse_attention(q, k, v[..., :8], mask, q_block=16, backend="torch")
    with pytest.raises(ValueError, match=r"k has an empty dimension: \(1, 2, 0, 16\)"):
        block_sparse_attention(q, k[:, :, :0], v[:, :, :0], mask[:, :0], q_block=16, backend="torch")


@pytest.mark.parametrize("q_block, k_block, err, words", [
    (0, None, ValueError, "q_block=0: block sizes must be positive multiples of 16"),
    (-16, None, ValueError, "q_block=-16: block sizes"),
    (24, None, ValueError, "q_block=24: block sizes"),
    (16, 0, ValueError, "k_block=0: block sizes"),
    (16.0, None, TypeError, "q_block must be an int"),
    (True, None, TypeError, "q_block must be an int"),
    ("16", None, TypeError, "q_block must be an int"),
])
def test_block_sizes_are_checked_before_use(q_block, k_block, err, words):
    q, k, v, mask = _mask_inputs()
    with pytest.raises(err, match=words):
        block_sparse_attention(q, k, v, mask, q_block=q_block, k_block=k_block, backend="torch")
    with pytest.raises(err, match=words):
        BlockSparsePlan.from_block_mask(mask, q_block, k_block)


def test_plan_argument_errors_name_the_argument():
    q, k, v, mask = _mask_inputs(48)
    for bad in (None, mask.tolist(), mask.numpy()):
        with pytest.raises(TypeError, match="plan must be a BlockSparsePlan or a bool block mask tensor"):
            block_sparse_attention(q, k, v, bad, q_block=16, backend="torch")
    with pytest.raises(TypeError, match="block mask must be bool"):
        block_sparse_attention(q, k, v, mask.int(), q_block=16, backend="torch")
    with pytest.raises(ValueError, match=r"block mask \(3, 2, 3, 3\) must be \[B or 1, H or 1, Mq, Nk\]"):
        block_sparse_attention(q, k, v, mask.expand(3, 2, 3, 3), q_block=16, backend="torch")
    # block sizes come from a plan: a different q_block beside one used to be ignored
    plan = BlockSparsePlan.from_block_mask(mask, 16)
    with pytest.raises(ValueError, match="q_block=32 given with a plan of q_block=16"):
        block_sparse_attention(q, k, v, plan, q_block=32, backend="torch")
    block_sparse_attention(q, k, v, plan, q_block=16, backend="torch")


@pytest.mark.parametrize("causal", ["no", None, 2])
def test_causal_must_be_a_bool(causal):
    """causal="no" is truthy: it used to run causal attention."""
    q, k, v, mask = _mask_inputs()
    with pytest.raises(TypeError, match="causal must be a bool"):
        block_sparse_attention(q, k, v, mask, q_block=16, causal=causal, backend="torch")


def test_from_block_mask_checks_its_per_block_tensors():
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="block_mask must be a bool tensor, got list"):
        BlockSparsePlan.from_block_mask([[True]], 16)
    with pytest.raises(ValueError, match=r"window_shift must be \[B or 1, 3\].*got \(1, 5\)"):
        BlockSparsePlan.from_block_mask(mask, 16, window_lo=0, window_shift=torch.zeros(1, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k_valid must be \[B or 1, 3\].*got \(3, 3\)"):
        BlockSparsePlan.from_block_mask(mask, 16, 16, torch.full((3, 3), 16))
    with pytest.raises(ValueError, match="k_valid is on meta"):
        BlockSparsePlan.from_block_mask(mask, 16, 16, torch.full((1, 3), 16, device="meta"))


def test_key_bias_is_checked_where_a_plan_is_made_and_where_it_is_used():
    mask = torch.ones(2, 1, 3, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"key_bias must be a float tensor \[B or 1, 32\] \(natural log\), got torch.int64"):
        BlockSparsePlan.from_block_mask(mask, 16, key_bias=torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_bias must be \[B or 1, 32\].*got \(1, 48\)"):
        BlockSparsePlan.from_block_mask(mask, 16, key_bias=torch.zeros(1, 48))
    with pytest.raises(ValueError, match=r"key_bias must be \[B or 1, 32\].*got \(3, 32\)"):
        BlockSparsePlan.from_block_mask(mask, 16, key_bias=torch.zeros(3, 32))
    plan = BlockSparsePlan.from_block_mask(mask, 16, key_bias=torch.zeros(32, dtype=torch.float16))
    assert plan.key_bias.dtype == torch.float32 and plan.key_bias.shape == (1, 32)
    with pytest.raises(ValueError, match="key_bias must be float32 / float64 .* unit last stride"):
        dataclasses.replace(plan, key_bias=torch.zeros(1, 64)[:, ::2])
    q = torch.randn(3, 1, 48, 8)
    bad_batch = BlockSparsePlan.from_block_mask(torch.ones(1, 1, 3, 2, dtype=torch.bool), 16,
                                                key_bias=torch.zeros(2, 32))
    with pytest.raises(ValueError, match=r"plan.key_bias batch 2 must be 1 or match q's \(3\)"):
        block_sparse_attention(q, q[:, :, :32], q[:, :, :32], bad_batch, backend="torch")
    wide = BlockSparsePlan.from_block_mask(mask[:1], 16, key_bias=torch.zeros(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="plan.key_bias is float64 but q is torch.float32"):
        block_sparse_attention(q, q[:, :, :32], q[:, :, :32], wide, backend="torch")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_key_bias_nan_or_plus_inf_refused_on_the_cpu(value):
    """A NaN / +inf bias makes every row that sees the key NaN: refused where reading it is free (CPU);
    -inf (a key never seen) is allowed and masks the key."""
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    bias = torch.zeros(32)
    bias[17] = value
    with pytest.raises(ValueError, match=r"key_bias has 1 NaN / \+inf entries \(first at index \(17,\)\)"):
        BlockSparsePlan.from_block_mask(mask, 16, key_bias=bias)
    bias[17] = float("-inf")
    plan = BlockSparsePlan.from_block_mask(mask, 16, key_bias=bias)
    q = torch.randn(1, 1, 32, 8)
    out = block_sparse_attention(q, q, q, plan, backend="torch")[0]
    keep = torch.ones(32, dtype=torch.bool)
    keep[17] = False
    ref = torch.softmax(q[0, 0] @ q[0, 0, keep].T / 8 ** 0.5, -1) @ q[0, 0, keep]
    assert torch.allclose(out[0, 0], ref, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_minus_inf_key_bias_masks_keys_with_finite_gradients(backend):
    """A row whose only keys have bias -inf sees nothing: out 0, lse -inf, and gradients stay finite
    (the torch backend used to give NaN gradients: the -inf went through the scores, not a mask)."""
    mask = torch.tensor([[True, False], [True, True]])[None, None]
    bias = torch.zeros(32)
    bias[:16] = float("-inf")
    plan = BlockSparsePlan.from_block_mask(mask, 16, key_bias=bias)
    q = torch.randn(1, 1, 32, 16, requires_grad=True)
    out, lse = block_sparse_attention(q, q, q, plan, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), q)
    assert (out[0, 0, :16] == 0).all() and torch.isinf(lse[0, 0, :16]).all() and torch.isfinite(g).all()
    qs = q[0, 0, 16:]
    ref = torch.softmax(qs @ qs.T / 4, -1) @ qs
    assert torch.allclose(out[0, 0, 16:], ref, atol=1e-5)


@pytest.mark.parametrize("flag", ["strict_tiles", "validate", "padding_free", "return_lse", "return_info"])
def test_ssta_flags_must_be_bools(flag):
    """validate="no" and strict_tiles="no" are truthy strings: they used to switch the check on."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'no'"):
        ssta_attention(q, k, v, THW, CFG, L, backend="torch", **{flag: "no"})


def test_grid_and_text_len_accept_numpy_integers_and_refuse_the_rest():
    """numpy integers (a grid computed with numpy) give the same result as ints; floats, bools and
    tensors are refused with one line."""
    np = pytest.importorskip("numpy")
    q, k, v = _qkv()
    ref = ssta_attention(q, k, v, THW, CFG, L, backend="torch")
    got = ssta_attention(q, k, v, tuple(np.int64(x) for x in THW), CFG, np.int32(L), backend="torch")
    assert torch.equal(got, ref)
    for thw, text_len, words in (((2.0, 4, 8), L, "thw must be"), ((True, 4, 8), L, "thw must be"),
                                 (THW, float(L), "text_len must be"), (THW, torch.tensor(L), "text_len must be")):
        with pytest.raises(ValueError, match=words):
            ssta_attention(q, k, v, thw, CFG, text_len, backend="torch")


# ---------------------------------------------------------------- layouts, empty text, scales, devices
def test_diffusers_layout_is_named_in_the_length_error():
    """``[B, S, H, D]`` (diffusers' layout) passed as is: the error said only that S=H mismatched."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"S=2 does not match .* q looks like \[B, S, H, D\]: pass q.transpose\(1, 2\)"):
        ssta_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), THW, CFG, L, backend="torch")
    with pytest.raises(ValueError, match="does not match") as e:                   # a plain mismatch: no hint
        ssta_attention(q, k, v, (2, 4, 9), CFG, L, backend="torch")
    assert "transpose" not in str(e.value)


def test_an_empty_text_mask_goes_with_no_text():
    """text_len=0 with its ``[B, 0]`` mask (an empty prompt's) was refused as "mask given without text"."""
    q, k, v = _qkv(text_len=0)
    ref = ssta_attention(q, k, v, THW, CFG, 0, backend="torch")
    got = ssta_attention(q, k, v, THW, CFG, 0, torch.ones(2, 0, dtype=torch.bool), backend="torch")
    assert torch.equal(got, ref)
    for bad in (torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 0, dtype=torch.bool)):
        with pytest.raises(ValueError, match="text_len == 0"):
            ssta_attention(q, k, v, THW, CFG, 0, bad, backend="torch")


def test_scale_takes_any_real_number():
    """A numpy float32 scale was refused as "got float32"; tensors and bools still are."""
    np = pytest.importorskip("numpy")
    q, k, v = _qkv()
    ref = ssta_attention(q, k, v, THW, CFG, L, scale=0.25, backend="torch")
    assert torch.equal(ssta_attention(q, k, v, THW, CFG, L, scale=np.float32(0.25), backend="torch"), ref)
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert torch.equal(block_sparse_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], mask, np.float16(0.25),
                                              q_block=16)[0],
                       block_sparse_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], mask, 0.25, q_block=16)[0])
    for bad in (torch.tensor(0.25), True, "0.25"):
        with pytest.raises(TypeError, match="scale must be a float or None"):
            ssta_attention(q, k, v, THW, CFG, L, scale=bad, backend="torch")


def test_a_plan_on_another_device_names_the_fix():
    """A plan built on one device and used with tensors on another (meta stands in for a GPU here)."""
    q, k, v = (x.to("meta") for x in _qkv(thw=(1, 4, 8), text_len=0))
    plan = BlockSparsePlan.from_block_mask(torch.ones(2, 2, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match=r"the plan is on cpu but q is on meta: move it with plan.to\(q.device\)"):
        block_sparse_attention(q, k, v, plan, backend="torch")
    out, _ = block_sparse_attention(q, k, v, plan.to(q.device), backend="torch")
    assert out.shape == q.shape

"""SSTA processors on tiny diffusers transformers (CPU, float32): equivalence with the stock
processors when every block is kept, sparse runs with backward, enable / disable, isolation, errors."""

from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("diffusers")

from video_sparse_attn import SSTAConfig  # noqa: E402
from video_sparse_attn.processors import (SSTAAttnProcessor, SSTAStats, check_backend_support,  # noqa: E402
                                          disable_ssta, enable_ssta, runtime_of)
from video_sparse_attn.processors.grid_hook import HOOK_NAME  # noqa: E402
from video_sparse_attn.testing import tiny_inputs, tiny_model  # noqa: E402

TILE = (1, 4, 4)
DENSE = SSTAConfig(tile_thw=TILE, sparse_type="dense", pad_type="mask", caller_rules=False)
ALL_BLOCKS = SSTAConfig(tile_thw=TILE, kernel_thw=(1, 1, 1), topk=64, pad_type="mask", caller_rules=False)
SPARSE = SSTAConfig(tile_thw=TILE, kernel_thw=(1, 1, 1), topk=1, caller_rules=False)


# ---------------------------------------------------------------------------- tiny models + inputs
FAMILIES = ["hunyuan_video15", "hunyuan_video", "wan"]
GRIDS = {"hunyuan_video15": (3, 6, 8), "hunyuan_video": (2, 6, 8), "wan": (3, 12, 16)}


def tiny(family, seed=0, **overrides):
    """(model, inputs): the family's tiny transformer and a batch of 2 with different text masks."""
    model = tiny_model(family, seed, **overrides)
    return model, tiny_inputs(model, GRIDS[family], seed=seed + 1)


SPARSE_NAMES = {
    "hunyuan_video15": ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"],
    "hunyuan_video": ["transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"],
    "wan": ["blocks.0.attn1.processor", "blocks.1.attn1.processor"],
}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def assert_close(out, ref, tol=1e-5):
    err = (out - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max abs error {err:.3e} > {tol}"


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [DENSE, ALL_BLOCKS], ids=["dense", "topk_all"])
def test_all_blocks_equals_stock(family, config):
    model, inputs = tiny(family)
    ref = run(model, inputs)
    stats = SSTAStats(time=False)
    enable_ssta(model, config, stats=stats)
    out = run(model, inputs)
    assert out.shape == ref.shape
    assert_close(out, ref)
    assert len(stats.records) == len(SPARSE_NAMES[family])  # every video attention went through SSTA


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_set_attn_processor(family):
    """One instance everywhere: refiner / cross-attention stay stock, the grid hook installs lazily."""
    model, inputs = tiny(family)
    ref = run(model, inputs)
    model.set_attn_processor(SSTAAttnProcessor(DENSE))
    assert runtime_of(model) is None
    assert_close(run(model, inputs), ref)
    assert runtime_of(model) is not None and model._diffusers_hook.get_hook(HOOK_NAME) is not None
    assert_close(run(model, inputs), ref)  # second call: the hook captured the grid
    disable_ssta(model)
    assert not any(isinstance(p, SSTAAttnProcessor) for p in model.attn_processors.values())
    assert model._diffusers_hook.get_hook(HOOK_NAME) is None
    assert torch.equal(run(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_runs_and_backward(family):
    model, inputs = tiny(family)
    ref = run(model, inputs)
    stats = SSTAStats(time=False)
    enable_ssta(model, SPARSE, stats=stats)
    model.train()
    out = model(**inputs)[0]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.detach() - ref).abs().max() > 1e-4  # sparse attention changed the result
    assert all(float(r.density) < 1.0 for r in stats.records)
    out.square().mean().backward()
    attn = model.get_submodule(SPARSE_NAMES[family][0][: -len(".processor")])
    grad = attn.to_q.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_checkpointing_matches():
    model, inputs = tiny("hunyuan_video15", num_layers=1)
    enable_ssta(model, ALL_BLOCKS)
    model.train()
    model(**inputs)[0].square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    model(**inputs)[0].square().mean().backward()
    grads_ckpt = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(grads_ckpt)
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- enable / disable
@pytest.mark.parametrize("family", FAMILIES)
def test_enable_disable_processors_and_hooks(family):
    model, inputs = tiny(family)
    before = dict(model.attn_processors)
    runtime = enable_ssta(model, DENSE)
    after = model.attn_processors
    assert list(after) == list(before)
    for name, proc in after.items():
        if name in SPARSE_NAMES[family]:
            assert isinstance(proc, SSTAAttnProcessor)
        else:
            assert proc is before[name]
    assert model._diffusers_hook.get_hook(HOOK_NAME) is not None and runtime_of(model) is runtime
    run(model, inputs)
    assert runtime.thw == tuple(s // p for s, p in zip(inputs["hidden_states"].shape[2:], runtime.patch_thw))

    enable_ssta(model, SPARSE)  # re-enable replaces, keeps the true originals
    disable_ssta(model)
    restored = model.attn_processors
    assert all(restored[n] is before[n] for n in before)
    assert model._diffusers_hook.get_hook(HOOK_NAME) is None
    leftover = [m for m in model.modules() if {"_ssta_runtime", "_ssta_layer_index"} & set(m.__dict__)]
    assert not leftover
    disable_ssta(model)  # no-op


def test_two_transformers_do_not_interfere():
    a, inputs_a = tiny("hunyuan_video15")
    b = copy.deepcopy(a)
    inputs_b = tiny_inputs(b, (2, 8, 8), seed=5)
    ref_a = run(a, inputs_a)
    enable_ssta(b, SPARSE)
    ref_b = run(b, inputs_b)
    enable_ssta(a, DENSE)
    out_a = run(a, inputs_a)
    out_b = run(b, inputs_b)
    out_a2 = run(a, inputs_a)
    assert_close(out_a, ref_a)
    assert torch.equal(out_a, out_a2)
    assert torch.equal(out_b, ref_b)
    assert runtime_of(a).thw == (3, 6, 8) and runtime_of(b).thw == (2, 8, 8)


# ---------------------------------------------------------------------------- errors
def test_unsupported_model_class():
    with pytest.raises(TypeError, match="does not support Linear"):
        enable_ssta(torch.nn.Linear(4, 4), DENSE)
    with pytest.raises(TypeError, match="transformer or a pipeline"):
        enable_ssta(object(), DENSE)


def test_grid_not_captured():
    model, inputs = tiny("hunyuan_video15")
    attn = model.transformer_blocks[0].attn
    hs, ehs = torch.randn(2, 144, 16), torch.randn(2, 20, 16)
    with pytest.raises(RuntimeError, match="enable_ssta") as e:
        SSTAAttnProcessor(DENSE)(attn, hs, ehs, torch.ones(2, 20, dtype=torch.bool), None)
    # a processor installed by hand in a model of another family says so, naming the supported ones
    assert "another family is not supported" in str(e.value) and "HunyuanVideo15Transformer3DModel" in str(e.value)


def test_backend_dtype_and_head_dim_errors():
    model, inputs = tiny("hunyuan_video15")
    model = model.double()
    inputs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
    enable_ssta(model, DENSE, backend="triton")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU tensors can run the kernels (interpreted)
        with pytest.raises(ValueError, match="float64"):
            run(model, inputs)
        with pytest.raises(ValueError, match="head dim"):
            check_backend_support(torch.randn(1, 1, 16, 272, dtype=torch.float16), "triton")
    else:  # CPU tensors on a machine where Triton compiles for the GPU: refused, naming the fix
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            run(model, inputs)
    assert check_backend_support(torch.randn(1, 1, 16, 272, dtype=torch.float64), "torch") == "torch"


def test_tile_larger_than_grid():
    model, inputs = tiny("hunyuan_video15")
    enable_ssta(model, SSTAConfig(tile_thw=(4, 4, 4), kernel_thw=(1, 1, 1), topk=1, caller_rules=False))
    with pytest.raises(ValueError, match=r"longer than the latent grid .* along t"):
        run(model, inputs)
    # exact padding is accepted, and so is an explicit opt-out
    enable_ssta(model, SSTAConfig(tile_thw=(4, 4, 4), pad_type="mask", topk=1, caller_rules=False))
    run(model, inputs)
    enable_ssta(model, SSTAConfig(tile_thw=(4, 4, 4), topk=1, caller_rules=False), strict_tiles=False)
    run(model, inputs)


@pytest.mark.interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_equals_stock(family):
    """The processors on the Triton kernels (interpreter on CPU, CUDA when present) match stock."""
    model, inputs = tiny(family, num_layers=1)   # HunyuanVideo: one double- and one single-stream block
    if torch.cuda.is_available():
        model = model.cuda()
        inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    ref = run(model, inputs)
    enable_ssta(model, DENSE, backend="triton")
    assert_close(run(model, inputs), ref, tol=1e-2 if torch.cuda.is_available() else 1e-5)


def test_processor_checks_text_mask_prefix_once_per_shape(monkeypatch):
    """On a GPU the op does not read the mask (no host sync per call): the processor reads it once per
    mask shape instead, so a non-prefix mask is refused there too."""
    from video_sparse_attn.processors import base

    calls = []
    real = base.check_text_mask_prefix
    monkeypatch.setattr(base, "check_text_mask_prefix", lambda m: (calls.append(m.shape), real(m)))
    proc = SSTAAttnProcessor(SSTAConfig())
    good = torch.tensor([[True, True, False], [True, False, False]])
    proc._check_text_mask_once(good)
    proc._check_text_mask_once(good.clone())
    assert calls == [torch.Size([2, 3])]                      # once for this shape
    with pytest.raises(ValueError, match="not a prefix"):
        proc._check_text_mask_once(torch.tensor([[True, False, True, False]]))


def test_enable_warmup_warms_the_transformers_shapes(monkeypatch):
    """``enable_ssta(..., warmup=True)`` warms (heads, head dim, dtype, tile) of the transformer on CUDA;
    on a CPU transformer it does nothing."""
    import importlib
    import types

    from video_sparse_attn.processors import enable as enable_module

    warmup_module = importlib.import_module("video_sparse_attn.warmup")   # the module, not the function

    seen = []
    monkeypatch.setattr(warmup_module, "warmup", lambda *shapes, **kw: seen.append((shapes, kw)))
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(num_attention_heads=16, attention_head_dim=128),
        parameters=lambda: iter([types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)]))
    enable_module._warm_kernels(fake, SSTAConfig(), "auto")
    assert seen == [(((1, 16, 8 * 384, 128, torch.bfloat16, 384),), {"backend": "auto", "device": torch.device("cuda", 0),
                                                                "config": SSTAConfig()})]
    model, _ = tiny("hunyuan_video15")
    enable_ssta(model, SSTAConfig(tile_thw=(1, 4, 4)), warmup=True)        # CPU model: nothing to warm
    assert len(seen) == 1


def test_enable_ssta_checks_stats_and_flags_before_the_first_forward():
    """stats="yes" used to be stored and fail inside the first forward; strict_tiles="no" is truthy."""
    model, _ = tiny("wan")
    with pytest.raises(TypeError, match="stats must be True, False, None or an SSTAStats, got 'yes'"):
        enable_ssta(model, SPARSE, stats="yes")
    with pytest.raises(TypeError, match="strict_tiles must be a bool, got 'no'"):
        enable_ssta(model, SPARSE, strict_tiles="no")
    with pytest.raises(TypeError, match="stats must be an SSTAStats or None"):
        SSTAAttnProcessor(SPARSE, stats=True)
    assert runtime_of(model) is None       # nothing was installed


def test_a_refused_re_enable_keeps_the_running_setup():
    """``enable_ssta`` again with a bad backend or flag used to restore the stock processors and drop
    the grid hook before refusing: the model silently ran dense afterwards."""
    model, inputs = tiny("wan")
    runtime = enable_ssta(model, SPARSE)
    sparse = run(model, inputs)
    processors = dict(model.attn_processors)
    for bad in (dict(backend="bogus"), dict(strict_tiles="no"), dict(warmup="yes")):
        with pytest.raises((TypeError, ValueError)):
            enable_ssta(model, DENSE, **bad)
        assert runtime_of(model) is runtime and model.attn_processors == processors
    assert torch.equal(run(model, inputs), sparse)
    # a pipeline whose second transformer is not supported: the first one is left as it was too
    pipe = types.SimpleNamespace(transformer=model, transformer_2=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="does not support Linear"):
        enable_ssta(pipe, DENSE)
    assert runtime_of(model) is runtime and model.attn_processors == processors


def test_enable_on_a_compiled_transformer():
    """``enable_ssta(torch.compile(transformer))`` (or a pipeline holding one) used to refuse the wrapper
    as an unsupported model: SSTA goes on the module it wraps and the compiled model runs it."""
    torch._dynamo.reset()
    model = tiny_model("wan", num_layers=1)
    inputs = tiny_inputs(model, (2, 8, 8))
    ref = run(model, inputs)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    runtime = enable_ssta(compiled, SPARSE, backend="torch")
    assert runtime_of(model) is runtime
    out = run(compiled, inputs)
    assert runtime.thw == (2, 4, 4) and (out - ref).abs().max() > 1e-4   # the sparse attention ran
    disable_ssta(compiled)
    assert runtime_of(model) is None and torch.equal(run(model, inputs), ref)
    pipe = types.SimpleNamespace(transformer=compiled)
    runtime = enable_ssta(pipe, DENSE)
    assert runtime_of(model) is runtime is not None
    disable_ssta(pipe)
    assert runtime_of(model) is None
    torch._dynamo.reset()

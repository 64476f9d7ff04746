"""SSTA processors on tiny diffusers transformers (CPU, float32): equivalence with the stock
processors when every block is kept, sparse runs with backward, enable / disable, isolation, errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from video_sparse_attn import SSTAConfig  # noqa: E402
from video_sparse_attn.processors import (SSTAAttnProcessor, SSTAStats, check_backend_support,  # noqa: E402
                                          disable_ssta, enable_ssta, runtime_of)
from video_sparse_attn.processors.grid_hook import HOOK_NAME  # noqa: E402

TILE = (1, 4, 4)
DENSE = SSTAConfig(tile_thw=TILE, sparse_type="dense", pad_type="mask", caller_rules=False)
ALL_BLOCKS = SSTAConfig(tile_thw=TILE, kernel_thw=(1, 1, 1), topk=64, pad_type="mask", caller_rules=False)
SPARSE = SSTAConfig(tile_thw=TILE, kernel_thw=(1, 1, 1), topk=1, caller_rules=False)


# ---------------------------------------------------------------------------- tiny models + inputs
def hunyuan_video15(seed=0, **overrides):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
               num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
               rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    model = HunyuanVideo15Transformer3DModel(**{**cfg, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    B = 2
    mask = torch.ones(B, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, 3:] = 0
    mask_2 = torch.ones(B, 5, dtype=torch.long)
    mask_2[1, 2:] = 0
    inputs = dict(
        hidden_states=torch.randn(B, 4, 3, 6, 8, generator=g), timestep=torch.tensor([500.0, 500.0]),
        encoder_hidden_states=torch.randn(B, 12, 16, generator=g), encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.randn(B, 5, 8, generator=g), encoder_attention_mask_2=mask_2,
        image_embeds=torch.zeros(B, 3, 12), return_dict=False,
    )
    return model, inputs


def hunyuan_video(seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    B = 2
    mask = torch.ones(B, 12, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = dict(
        hidden_states=torch.randn(B, 4, 2, 6, 8, generator=g), timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(B, 12, 16, generator=g), encoder_attention_mask=mask,
        pooled_projections=torch.randn(B, 8, generator=g), guidance=torch.tensor([3000.0, 3000.0]),
        return_dict=False,
    )
    return model, inputs


def wan(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 12, 16, generator=g), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, 12, 16, generator=g), return_dict=False)
    return model, inputs


MODELS = {"hunyuan_video15": hunyuan_video15, "hunyuan_video": hunyuan_video, "wan": wan}
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
@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("config", [DENSE, ALL_BLOCKS], ids=["dense", "topk_all"])
def test_all_blocks_equals_stock(family, config):
    model, inputs = MODELS[family]()
    ref = run(model, inputs)
    stats = SSTAStats(time=False)
    enable_ssta(model, config, stats=stats)
    out = run(model, inputs)
    assert out.shape == ref.shape
    assert_close(out, ref)
    assert len(stats.records) == len(SPARSE_NAMES[family])  # every video attention went through SSTA


@pytest.mark.parametrize("family", list(MODELS))
def test_bare_set_attn_processor(family):
    """One instance everywhere: refiner / cross-attention stay stock, the grid hook installs lazily."""
    model, inputs = MODELS[family]()
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


@pytest.mark.parametrize("family", list(MODELS))
def test_sparse_runs_and_backward(family):
    model, inputs = MODELS[family]()
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
    model, inputs = hunyuan_video15()
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
@pytest.mark.parametrize("family", list(MODELS))
def test_enable_disable_processors_and_hooks(family):
    model, inputs = MODELS[family]()
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
    a, inputs_a = hunyuan_video15(seed=0)
    b = copy.deepcopy(a)
    inputs_b = dict(inputs_a, hidden_states=torch.randn(2, 4, 2, 8, 8))
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
    model, inputs = hunyuan_video15()
    attn = model.transformer_blocks[0].attn
    hs, ehs = torch.randn(2, 144, 16), torch.randn(2, 20, 16)
    with pytest.raises(RuntimeError, match="enable_ssta"):
        SSTAAttnProcessor(DENSE)(attn, hs, ehs, torch.ones(2, 20, dtype=torch.bool), None)


def test_backend_dtype_and_head_dim_errors():
    model, inputs = hunyuan_video15()
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
    model, inputs = hunyuan_video15()
    enable_ssta(model, SSTAConfig(tile_thw=(4, 4, 4), kernel_thw=(1, 1, 1), topk=1, caller_rules=False))
    with pytest.raises(ValueError, match=r"longer than the latent grid .* along t"):
        run(model, inputs)
    # exact padding is accepted, and so is an explicit opt-out
    enable_ssta(model, SSTAConfig(tile_thw=(4, 4, 4), pad_type="mask", topk=1, caller_rules=False))
    run(model, inputs)
    enable_ssta(model, SSTAConfig(tile_thw=(4, 4, 4), topk=1, caller_rules=False), strict_tiles=False)
    run(model, inputs)


@pytest.mark.interpreter
@pytest.mark.parametrize("family", list(MODELS))
def test_triton_backend_equals_stock(family):
    """The processors on the Triton kernels (interpreter on CPU, CUDA when present) match stock."""
    model, inputs = MODELS[family]()
    if torch.cuda.is_available():
        model = model.cuda()
        inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    ref = run(model, inputs)
    enable_ssta(model, DENSE, backend="triton")
    assert_close(run(model, inputs), ref, tol=1e-2 if torch.cuda.is_available() else 1e-5)

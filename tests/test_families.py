"""The model-family registry: lookup, errors, replaced layers, stock processors, grid and text rules."""

import pytest
import torch

pytest.importorskip("diffusers")

from video_sparse_attn.families import (FAMILIES, UnsupportedModelError, family_named,  # noqa: E402
                                        family_of, family_of_pipeline)
from video_sparse_attn.testing import tiny_model  # noqa: E402

EXPECTED = {  # family → (transformer class, pipeline class, replaced layers in execution order)
    "hunyuan_video15": ("HunyuanVideo15Transformer3DModel", "HunyuanVideo15Pipeline",
                        ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", "HunyuanVideoPipeline",
                      ["transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"]),
    "wan": ("WanTransformer3DModel", "WanPipeline", ["blocks.0.attn1.processor", "blocks.1.attn1.processor"]),
}


@pytest.fixture(scope="module")
def models():
    return {name: tiny_model(name) for name in EXPECTED}


def test_registry_lists_the_three_families():
    assert sorted(FAMILIES) == sorted(EXPECTED)
    for name, (cls, pipe, _) in EXPECTED.items():
        fam = FAMILIES[name]
        assert (fam.name, fam.transformer_class, fam.pipeline_class) == (name, cls, pipe)
        assert family_named(name) is fam and family_named(cls) is fam and family_of_pipeline(pipe) is fam


@pytest.mark.parametrize("name", list(EXPECTED))
def test_family_of_and_replaced_layers(models, name):
    model = models[name]
    fam = family_of(model)
    assert fam is FAMILIES[name] and type(model).__name__ == EXPECTED[name][0]
    assert fam.sparse_layer_names(model) == EXPECTED[name][2]
    subclass = type("Custom", (type(model),), {})   # a user subclass is still the family
    assert family_of(subclass.__new__(subclass)) is fam


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stock_processors_are_what_the_model_installs(models, name):
    fam = FAMILIES[name]
    for layer, proc in models[name].attn_processors.items():
        assert type(fam.stock_processor(layer)) is type(proc), layer


@pytest.mark.parametrize("name", list(EXPECTED))
def test_attention_function_is_the_family_processor(name):
    fn = FAMILIES[name].attention_fn()
    assert callable(fn) and fn.__module__ == f"video_sparse_attn.processors.{name}"
    assert FAMILIES[name].attention_fn() is fn


def test_grid_and_text_rules(models):
    hv15, hv, wan = models["hunyuan_video15"], models["hunyuan_video"], models["wan"]
    assert FAMILIES["wan"].patch_thw(wan) == (1, 2, 2)
    assert FAMILIES["wan"].latent_grid(wan, (3, 12, 16)) == (3, 6, 8)
    assert FAMILIES["hunyuan_video15"].latent_grid(hv15, (3, 6, 8)) == (3, 6, 8)
    assert FAMILIES["hunyuan_video15"].latent_thw(121, 480, 848) == (31, 30, 53)
    assert FAMILIES["wan"].latent_thw(81, 480, 832) == (21, 60, 104)
    assert FAMILIES["hunyuan_video15"].latent_thw(9, 64, 64, compression_thw=(2, 4, 4)) == (5, 16, 16)
    assert family_of(hv15).text_dims(hv15) == {"text_dim": 16, "text_dim_2": 8, "pooled_dim": None}
    assert family_of(hv).text_dims(hv) == {"text_dim": 16, "text_dim_2": None, "pooled_dim": 8}
    assert family_of(wan).text_dims(wan) == {"text_dim": 16, "text_dim_2": None, "pooled_dim": None}


def test_tiny_config_is_read_only_and_overridable():
    fam = FAMILIES["wan"]
    with pytest.raises(TypeError):
        fam.tiny_config["num_layers"] = 3
    model = fam.tiny_transformer(num_layers=1)
    assert model.config.num_layers == 1 and model.config.attention_head_dim == fam.tiny_config["attention_head_dim"]


def test_unsupported_models_raise_one_error_naming_the_families():
    for call in (lambda: family_of(torch.nn.Linear(2, 2)), lambda: family_named("flux"),
                 lambda: family_of_pipeline("FluxPipeline")):
        with pytest.raises(UnsupportedModelError, match="supported: hunyuan_video15") as info:
            call()
        assert isinstance(info.value, TypeError) and "WanPipeline" in str(info.value)
    fake = type("WanTransformer3DModel", (torch.nn.Module,), {})()   # same name outside diffusers
    with pytest.raises(UnsupportedModelError):
        family_of(fake)


def test_a_fourth_family_is_one_entry(monkeypatch):
    """A family that reuses an existing processor function needs nothing but its entry: Wan-VACE's
    video self-attention (``attn1`` of the main and the control blocks) is Wan's."""
    from dataclasses import replace

    from diffusers import WanVACETransformer3DModel

    import video_sparse_attn.families as families
    from video_sparse_attn import SSTAConfig, enable_ssta
    from video_sparse_attn.processors import SSTAStats

    wan = FAMILIES["wan"]
    vace = replace(wan, name="wan_vace", transformer_class="WanVACETransformer3DModel",
                   pipeline_class="WanVACEPipeline", sparse_prefixes=("vace_blocks.", "blocks."),
                   tiny_config={**wan.tiny_config, "vace_layers": [0], "vace_in_channels": 4})
    monkeypatch.setattr(families, "FAMILIES", {**FAMILIES, "wan_vace": vace})
    model = family_named("wan_vace").tiny_transformer().eval()
    assert isinstance(model, WanVACETransformer3DModel) and family_of(model) is vace
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
                  control_hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), return_dict=False)
    with torch.no_grad():
        ref = model(**inputs)[0]
        stats = SSTAStats(time=False)
        enable_ssta(model, SSTAConfig(tile_thw=(1, 4, 4), sparse_type="dense", pad_type="mask", caller_rules=False),
                    stats=stats)
        out = model(**inputs)[0]
    assert len(stats.records) == 3                        # vace_blocks.0 and blocks.0-1 ran SSTA
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

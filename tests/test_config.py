"""SSTAConfig: defaults, validation, HunyuanVideo-1.5 mapping, caller rules, round trips."""

import pytest
import torch
from safetensors.torch import save_file

from video_sparse_attn import SSTAConfig


def test_defaults_are_the_released_720p_values():
    c = SSTAConfig()
    assert (c.tile_thw, c.kernel_thw, c.topk, c.sparse_type, c.sampling_type) == ((6, 8, 8), (3, 3, 3), 64, "ssta", "importance")
    assert (c.lambda_, c.threshold, c.adaptive_pool, c.pad_type) == (0.7, 0.0, None, "zero")
    assert c.use_text_mask and not c.mask_share_within_head and c.block_size == 384


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(tile_thw=(2, 2)), ValueError, "three positive ints"),
    (dict(tile_thw=(0, 4, 4)), ValueError, "three positive ints"),
    (dict(kernel_thw=(1, -1, 1)), ValueError, "kernel_thw"),
    (dict(topk=0), ValueError, "topk must be >= 1"),
    (dict(topk=2.5), TypeError, "topk must be an int"),
    (dict(sparse_type="flash"), ValueError, "sparse_type"),
    (dict(sampling_type="random"), ValueError, "sampling_type"),
    (dict(pad_type="reflect"), ValueError, "pad_type"),
    (dict(lambda_=1.5), ValueError, "lambda_"),
    (dict(threshold=0.5), ValueError, "needs sampling_type='similarity'"),
    (dict(adaptive_pool=(2, 2, 2)), ValueError, "adaptive_pool only applies"),
    (dict(sampling_type="similarity", adaptive_pool=(8, 2, 2)), ValueError, "finer than tile"),
    (dict(use_text_mask=1), TypeError, "use_text_mask"),
])
def test_bad_configs_raise_clear_errors(kwargs, err, words):
    with pytest.raises(err, match=words):
        SSTAConfig(**kwargs)


def test_pool_defaults_to_2x2x2_with_threshold():
    assert SSTAConfig(sampling_type="similarity", threshold=0.5).pool_thw == (2, 2, 2)
    assert SSTAConfig(sampling_type="similarity").pool_thw is None
    assert SSTAConfig().pool_thw is None


def test_from_hunyuan_maps_every_key_and_rejects_unknown():
    c = SSTAConfig.from_hunyuan({
        "attn_sparse_type": "ssta", "ssta_topk": 64, "tile_size": [6, 8, 8], "win_size": [[3, 3, 3]],
        "ssta_lambda": 0.7, "ssta_sampling_type": "importance", "ssta_threshold": 0.0,
        "ssta_adaptive_pool": None, "attn_pad_type": "zero", "attn_use_text_mask": True,
        "attn_mask_share_within_head": False,
    })
    assert c == SSTAConfig()
    with pytest.raises(ValueError, match="unknown HunyuanVideo-1.5 attn_param keys"):
        SSTAConfig.from_hunyuan({"ssta_topk": 3, "ssta_tpok": 4})


def test_caller_rules():
    c = SSTAConfig()
    assert c.for_thw((31, 45, 80)).topk == 32
    assert c.for_thw((61, 45, 80)).topk == 64
    img = c.for_thw((1, 45, 80))
    assert img.tile_thw == (1, 16, 24) and img.kernel_thw == (1, 1, 1) and img.topk == 32
    assert SSTAConfig(topk=10, caller_rules=False).for_thw((5, 8, 8)).topk == 10
    # resolving twice does not halve twice
    assert c.for_thw((31, 45, 80)).for_thw((31, 45, 80)).topk == 32


def test_json_and_metadata_round_trip(tmp_path):
    c = SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 3, 3), topk=7, sparse_type="block_attn",
                   sampling_type="similarity", threshold=0.3, adaptive_pool=(1, 2, 2), pad_type="mask",
                   mask_share_within_head=True)
    assert SSTAConfig.from_json(c.to_json()) == c
    path = tmp_path / "c.json"
    c.save(str(path))
    assert SSTAConfig.load(str(path)) == c
    st = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(st), metadata=c.to_metadata())
    assert SSTAConfig.load(str(st)) == c
    with pytest.raises(ValueError, match="unknown SSTAConfig fields"):
        SSTAConfig.from_dict({"topk": 3, "bogus": 1})


def test_as_dense_is_exact_dense():
    d = SSTAConfig(topk=3, pad_type="zero").as_dense()
    assert d.sparse_type == "dense" and d.pad_type == "mask" and d.topk == 3


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(lambda_=None), TypeError, "lambda_ must be a number in \\[0, 1\\], got None"),
    (dict(lambda_="high"), TypeError, "lambda_ must be a number in \\[0, 1\\], got 'high'"),
    (dict(lambda_=True), TypeError, "lambda_ must be a number"),
    (dict(threshold=[0.1]), TypeError, "threshold must be a number in \\[0, 1\\]"),
    (dict(lambda_=float("nan")), ValueError, "lambda_ must lie in \\[0, 1\\]"),
])
def test_numeric_fields_name_themselves(kwargs, err, words):
    """float(None) / float("high") used to surface as Python's own message, naming no field."""
    with pytest.raises(err, match=words):
        SSTAConfig(**kwargs)
    assert SSTAConfig(lambda_="0.5").lambda_ == 0.5


def test_loaders_refuse_what_is_not_a_mapping():
    """A list used to be read as field names ("unknown SSTAConfig fields [1, 2]")."""
    with pytest.raises(TypeError, match="an SSTAConfig dict must be a mapping of names to values, got list"):
        SSTAConfig.from_json("[1, 2]")
    with pytest.raises(TypeError, match="attn_param must be a mapping"):
        SSTAConfig.from_hunyuan([("ssta_topk", 32)])
    with pytest.raises(ValueError, match="an SSTAConfig must be a JSON object, and this is not JSON"):
        SSTAConfig.from_metadata({"ssta_config": "topk=32"})

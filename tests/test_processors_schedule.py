"""Schedules: resolution rules, JSON / safetensors round trips, and the dense-step switch observed
through a tiny HunyuanVideo-1.5 pipeline call (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from video_sparse_attn import SSTAConfig
from video_sparse_attn.processors import SSTASchedule

BASE = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(1, 1, 1), topk=2, caller_rules=False)


# ---------------------------------------------------------------------------- resolution
def test_dense_steps_and_layers():
    s = SSTASchedule(dense_steps=3, dense_layers=(1,))
    assert s.uses_step
    assert s.config_for(BASE, 2, 0).sparse_type == "dense"
    assert s.config_for(BASE, 2, 0).pad_type == "mask"
    assert s.config_for(BASE, 3, 0) == BASE
    assert s.config_for(BASE, 7, 1).sparse_type == "dense"
    assert not SSTASchedule(dense_layers=(0,)).uses_step


def test_mask_strategy_precedence_and_head_groups():
    s = SSTASchedule(mask_strategy={
        "*_*_*": {"topk": 3},
        "*_2_*": [1, 3, 3],
        "5_2_1": {"sparse_type": "dense"},
        "*_2_3": {"topk": 9},
    })
    assert s.config_for(BASE, 0, 0).topk == 3
    assert s.config_for(BASE, 0, 2).kernel_thw == (1, 3, 3) and s.config_for(BASE, 0, 2).topk == 3
    groups = s.head_groups(BASE, 5, 2, 4)
    assert [(a, b) for a, b, _ in groups] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert groups[1][2].sparse_type == "dense" and groups[3][2].topk == 9
    assert groups[0][2] == groups[2][2] != groups[3][2]
    merged = s.head_groups(BASE, 4, 2, 4)  # step 4: heads 0-2 share a config
    assert [(a, b) for a, b, _ in merged] == [(0, 3), (3, 4)]
    assert s.head_groups(BASE, 0, 0, 4) == [(0, 4, BASE.replace(topk=3))]


def test_bad_strategy_errors():
    with pytest.raises(ValueError, match="step_layer_head"):
        SSTASchedule(mask_strategy={"1_2": [1, 1, 1]})
    with pytest.raises(ValueError, match="window"):
        SSTASchedule(mask_strategy={"1_2_3": [1, 1]})
    with pytest.raises(ValueError, match="no_such_field"):
        SSTASchedule(mask_strategy={"*_*_*": {"no_such_field": 1}})
    with pytest.raises(ValueError, match="dense_steps"):
        SSTASchedule(dense_steps=-1)


def test_round_trips(tmp_path):
    from safetensors.torch import save_file

    s = SSTASchedule(dense_steps=4, dense_layers=(0, 5),
                     mask_strategy={"3_*_1": [1, 2, 2], "*_4_*": {"topk": 8}})
    assert SSTASchedule.from_json(s.to_json()) == s
    path = tmp_path / "schedule.json"
    s.save(str(path))
    assert SSTASchedule.load(str(path)) == s
    st = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(1)}, str(st), metadata={**s.to_metadata(), **BASE.to_metadata()})
    assert SSTASchedule.load(str(st)) == s
    assert SSTAConfig.load(str(st)) == BASE
    fastvideo = tmp_path / "mask_strategy.json"
    fastvideo.write_text(json.dumps({"0_0_0": [1, 2, 3], "0_0_1": [3, 3, 3]}))
    loaded = SSTASchedule.load(str(fastvideo))
    assert loaded.config_for(BASE, 0, 0, 1).kernel_thw == (3, 3, 3)
    assert loaded.config_for(BASE, 1, 0, 1) == BASE


# ---------------------------------------------------------------------------- through a pipeline
@pytest.fixture(scope="module")
def tiny_pipe():
    pytest.importorskip("diffusers")
    from video_sparse_attn.testing import random_prompt_embeds, tiny_hunyuan_video15_pipeline

    pipe = tiny_hunyuan_video15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, random_prompt_embeds(pipe)


def _modes_per_step(stats):
    return {step: v["sparse_types"] for step, v in stats.summary()["per_step"].items()}


@pytest.mark.parametrize("step_source", ["scheduler", "timestep"])
def test_dense_steps_switch_exactly(tiny_pipe, step_source):
    from video_sparse_attn.processors import disable_ssta, enable_ssta

    pipe, embeds = tiny_pipe
    target = pipe if step_source == "scheduler" else pipe.transformer
    runtime = enable_ssta(target, BASE, SSTASchedule(dense_steps=2), stats=True)
    assert (runtime.scheduler is not None) == (step_source == "scheduler")
    try:
        pipe(**embeds, height=32, width=32, num_frames=5, num_inference_steps=5, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        modes = _modes_per_step(runtime.stats)
        assert modes == {0: ["dense"], 1: ["dense"], 2: ["ssta"], 3: ["ssta"], 4: ["ssta"]}
        per_step = runtime.stats.summary()["per_step"]
        assert all(v["calls"] == 2 for v in per_step.values())          # two layers, one call each per step
        assert per_step[1]["density"] > per_step[2]["density"]
        # a second run starts again from step 0
        runtime.stats.reset()
        pipe(**embeds, height=32, width=32, num_frames=5, num_inference_steps=3, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        assert _modes_per_step(runtime.stats) == {0: ["dense"], 1: ["dense"], 2: ["ssta"]}
    finally:
        disable_ssta(pipe)


def test_manual_step_overrides(tiny_pipe):
    from video_sparse_attn.processors import disable_ssta, enable_ssta

    pipe, embeds = tiny_pipe
    runtime = enable_ssta(pipe, BASE, SSTASchedule(dense_steps=2), stats=True)
    runtime.set_step(7)
    try:
        pipe(**embeds, height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent")
        assert _modes_per_step(runtime.stats) == {7: ["ssta"]}
    finally:
        disable_ssta(pipe)


def test_timestep_step_follows_per_token_timesteps():
    """Wan 2.2 TI2V passes timesteps ``[B, S]`` whose first-frame tokens stay at 0: the step follows the
    noise level of the other tokens, so a dense-steps schedule turns sparse on time."""
    pytest.importorskip("diffusers")
    from video_sparse_attn.processors import disable_ssta, enable_ssta
    from video_sparse_attn.testing import tiny_inputs, tiny_model

    model = tiny_model("wan", num_layers=1)
    inputs = tiny_inputs(model, (2, 8, 8), batch=1)   # token grid (2, 4, 4)
    runtime = enable_ssta(model, BASE, SSTASchedule(dense_steps=1), stats=True)
    try:
        for t in (999.0, 700.0, 400.0):
            timestep = torch.full((1, 2 * 4 * 4), t)
            timestep[:, :16] = 0.0                   # the clean conditioning frame
            with torch.no_grad():
                model(**dict(inputs, timestep=timestep))
        assert _modes_per_step(runtime.stats) == {0: ["dense"], 1: ["ssta"], 2: ["ssta"]}
    finally:
        disable_ssta(model)

"""Fine-tuning under SSTA on a tiny HunyuanVideo-1.5 (CPU): steps, saved weights, resume, gradients."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from video_sparse_attn import SSTAConfig  # noqa: E402
from video_sparse_attn.processors import SSTAAttnProcessor  # noqa: E402
from video_sparse_attn.training import (LatentVideoDataset, SparsityRamp, collate_samples,  # noqa: E402
                                        make_synthetic_dataset, set_sparse_attention)
from video_sparse_attn.training.args import parse_args  # noqa: E402
from video_sparse_attn.training.flow_matching import add_noise, flow_matching_loss  # noqa: E402
from video_sparse_attn.training.models import (latent_channels, text_dims, tiny_transformer,  # noqa: E402
                                               transformer_inputs)
from video_sparse_attn.training.trainer import SSTA_CONFIG_NAME, train  # noqa: E402

# A real sparse config at the tiny grid (2, 8, 8): 8 tiles of (1, 4, 4), 2 kept by top-k.
SPARSE_FLAGS = ["--tile", "1,4,4", "--topk", "4", "--window", "1,1,1", "--no-progress-bar",
                "--learning-rate", "1e-3", "--checkpointing-steps", "2"]


def _run(out_dir, *extra):
    return train(parse_args(["--output-dir", str(out_dir), *SPARSE_FLAGS, *extra]))


def _log(out_dir):
    with open(os.path.join(out_dir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _ssta_layers(model):
    return sum(isinstance(p, SSTAAttnProcessor) for p in model.attn_processors.values())


def _fixed_inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    dims = text_dims(model)
    batch = {"prompt_embeds": torch.randn(1, 12, dims["text_dim"], generator=g),
             "prompt_mask": (torch.arange(12) < 7).long()[None],
             "prompt_embeds_2": torch.randn(1, 6, dims["text_dim_2"], generator=g),
             "prompt_mask_2": (torch.arange(6) < 4).long()[None]}
    batch = {k: v.to(model.device) for k, v in batch.items()}
    noisy = torch.randn(1, latent_channels(model), 2, 8, 8, generator=g).to(model.device)
    return transformer_inputs(model, batch, noisy, torch.tensor([700.0], device=model.device), image_tokens=8)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """3 optimizer steps with SSTA on, checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("full")
    return out, _run(out, "--max-train-steps", "3")


def test_three_steps_with_ssta_give_finite_loss(full_run):
    out, result = full_run
    assert result["global_step"] == 3 and len(result["losses"]) == 3
    assert all(math.isfinite(x) for x in result["losses"])
    model = result["transformer"]
    assert _ssta_layers(model) == model.config.num_layers  # the double-stream blocks run SSTA
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and {r["sparse_type"] for r in log} == {"ssta"}
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]


def test_saved_safetensors_reload_identically(full_run):
    from diffusers import HunyuanVideo15Transformer3DModel

    out, result = full_run
    final = result["final_dir"]
    assert os.path.isfile(os.path.join(final, "diffusion_pytorch_model.safetensors"))
    config = SSTAConfig.load(os.path.join(final, SSTA_CONFIG_NAME))
    assert config == result["ssta_config"] and config.topk == 4

    trained = result["transformer"].eval()
    fresh = HunyuanVideo15Transformer3DModel.from_pretrained(final).to(trained.device).eval()
    set_sparse_attention(fresh, config)
    initial = tiny_transformer(seed=0).to(trained.device).eval()
    set_sparse_attention(initial, config)
    with torch.no_grad():
        inputs = _fixed_inputs(trained)
        y_trained = trained(**inputs)[0]
        y_fresh = fresh(**inputs)[0]
        y_initial = initial(**inputs)[0]
    assert torch.equal(y_trained, y_fresh)
    assert not torch.allclose(y_initial, y_fresh, atol=1e-4)  # training changed the weights


def test_resume_continues_from_saved_step(full_run, tmp_path):
    from safetensors.torch import load_file

    out_a, result_a = full_run
    first = _run(tmp_path, "--max-train-steps", "2")
    assert first["global_step"] == 2
    resumed = _run(tmp_path, "--max-train-steps", "3", "--resume-from-checkpoint", "latest")
    assert resumed["global_step"] == 3 and len(resumed["losses"]) == 1  # only step 3 ran
    log = [r["step"] for r in _log(tmp_path)]
    assert log == [1, 2, 3]
    assert resumed["losses"][0] == pytest.approx(result_a["losses"][2], rel=1e-6, abs=1e-7)
    a = load_file(os.path.join(result_a["final_dir"], "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(resumed["final_dir"], "diffusion_pytorch_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _loss_and_grads(model, batch, seed=3):
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.tensor([0.3, 0.8])
    noisy, target = add_noise(batch["latents"], sigmas, g)
    model.zero_grad(set_to_none=True)
    pred = model(**transformer_inputs(model, batch, noisy, sigmas * 1000, image_tokens=8))[0]
    loss = flow_matching_loss(pred, target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", [
    SSTAConfig(tile_thw=(1, 4, 4), sparse_type="dense", pad_type="mask"),
    SSTAConfig(tile_thw=(1, 4, 4), topk=64, kernel_thw=(1, 1, 1), pad_type="mask"),  # topk >= 8 tiles
], ids=["dense", "topk_all"])
def test_gradients_match_stock_when_every_block_kept(config, tmp_path):
    model = tiny_transformer(seed=0).float()
    model.enable_gradient_checkpointing()  # SSTA recomputes inside checkpointed blocks
    dims = text_dims(model)
    root = make_synthetic_dataset(str(tmp_path / "d"), 2, (latent_channels(model), 2, 8, 8), dims["text_dim"],
                                  text_dim_2=dims["text_dim_2"])
    batch = collate_samples([LatentVideoDataset(root)[i] for i in range(2)])
    assert not batch["prompt_mask"].all()  # padded text exercises the mask path

    stock_loss, stock = _loss_and_grads(model, batch)
    set_sparse_attention(model, config)
    assert _ssta_layers(model) == 2
    ssta_loss, ssta = _loss_and_grads(model, batch)
    assert stock.keys() == ssta.keys() and len(stock) > 20
    torch.testing.assert_close(ssta_loss, stock_loss, rtol=1e-5, atol=1e-5)
    for name in stock:
        torch.testing.assert_close(ssta[name], stock[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # a config that drops blocks changes the gradients: the comparison can fail
    set_sparse_attention(model, SSTAConfig(tile_thw=(1, 4, 4), topk=1, kernel_thw=(1, 1, 1), pad_type="mask"))
    _, sparse = _loss_and_grads(model, batch)
    assert not torch.allclose(sparse["proj_out.weight"], stock["proj_out.weight"], atol=1e-5)


def test_sparsity_ramp_goes_from_dense_to_target():
    target = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(1, 1, 1), topk=2, caller_rules=False)
    ramp = SparsityRamp(target, (4, 16, 16), warmup_steps=2, ramp_steps=4)  # 4×4×4 = 64 tiles
    configs = [ramp.config_at(s) for s in range(8)]
    assert [c.sparse_type for c in configs[:2]] == ["dense", "dense"]
    topks = [c.topk for c in configs[2:]]
    windows = [c.kernel_thw[1] for c in configs[2:]]
    assert topks == sorted(topks, reverse=True) and topks[0] < 64 and topks[0] > topks[3] > 2
    assert windows == sorted(windows, reverse=True) and windows[0] > 1
    assert configs[6] == configs[7] == target


def test_ramp_reinstalls_processors_during_training(tmp_path):
    result = _run(tmp_path, "--max-train-steps", "4", "--dense-warmup-steps", "1",
                  "--sparsity-ramp-steps", "2", "--gradient-checkpointing",
                  "--gradient-accumulation-steps", "2")
    log = _log(tmp_path)
    assert [r["sparse_type"] for r in log] == ["dense", "ssta", "ssta", "ssta"]
    assert log[1]["topk"] > log[2]["topk"] > log[3]["topk"] == 4
    assert 0 < log[3]["density"] < log[0]["density"] <= 1  # measured block density fell
    installed = {type(p).__name__: p for p in result["transformer"].attn_processors.values()}
    assert installed["SSTAAttnProcessor"].config == result["ssta_config"]
    assert all(math.isfinite(r["loss"]) for r in log)


def test_lora_run_saves_adapter_that_reloads(tmp_path):
    result = _run(tmp_path, "--max-train-steps", "2", "--lora-rank", "4")
    final = result["final_dir"]
    assert sorted(os.listdir(final)) == ["pytorch_lora_weights.safetensors", SSTA_CONFIG_NAME]
    trainable = [n for n, p in result["transformer"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # only the adapter trains
    fresh = tiny_transformer(seed=0).to(result["transformer"].device)
    fresh.load_lora_adapter(final, prefix=None, weight_name="pytorch_lora_weights.safetensors")
    set_sparse_attention(fresh, SSTAConfig.load(os.path.join(final, SSTA_CONFIG_NAME)))
    with torch.no_grad():
        inputs = _fixed_inputs(fresh)
        torch.testing.assert_close(fresh(**inputs)[0], result["transformer"].eval()(**inputs)[0],
                                   rtol=1e-5, atol=1e-6)


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        LatentVideoDataset(str(tmp_path))
    a = {"latents": torch.zeros(4, 2, 8, 8), "prompt_embeds": torch.zeros(3, 16),
         "prompt_mask": torch.ones(3)}
    b = dict(a, latents=torch.zeros(4, 2, 8, 4))
    with pytest.raises(ValueError, match="share the latent shape"):
        collate_samples([a, b])
    from video_sparse_attn.training.data import write_sample
    with pytest.raises(ValueError, match="missing keys"):
        write_sample(str(tmp_path), 0, {"latents": torch.zeros(4, 2, 8, 8)})


def test_bf16_autocast_full_finetune_with_ssta(tmp_path):
    """fp32 master weights + bf16 autocast: RMSNorm'd q/k stay fp32 while v is bf16 until SSTA casts."""
    result = _run(tmp_path, "--max-train-steps", "2", "--mixed-precision", "bf16", "--gradient-checkpointing")
    assert result["global_step"] == 2 and all(math.isfinite(x) for x in result["losses"])
    assert next(result["transformer"].parameters()).dtype == torch.float32


def test_encoded_frames_make_a_trainable_dataset(tmp_path):
    """make_latent_dataset's pieces: frame folder → tiny VAE latents (scaled) → sample files → 1 step."""
    import numpy as np
    from diffusers import AutoencoderKLHunyuanVideo15
    from PIL import Image

    from video_sparse_attn.testing import TINY_VAE

    from video_sparse_attn.training.data import write_metadata, write_sample
    from video_sparse_attn.training.encode import encode_latents, load_frames, preprocess_frames

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(**TINY_VAE).eval()
    clip = tmp_path / "clip0"
    clip.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(clip / f"{i:03d}.png")
    pixels = preprocess_frames(load_frames(str(clip)), 3, 32, 32)
    assert pixels.shape == (1, 3, 3, 32, 32) and -1 <= pixels.min() and pixels.max() <= 1
    latents = encode_latents(vae, pixels, "hunyuan_video15")
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()[0]
    torch.testing.assert_close(latents, raw * vae.config.scaling_factor)
    assert latents.shape == (4, 2, 8, 8)
    root = tmp_path / "data"
    for i in range(2):
        write_sample(str(root), i, {"latents": latents, "prompt_embeds": torch.randn(10, 16),
                                    "prompt_mask": (torch.arange(10) < 6),
                                    "prompt_embeds_2": torch.randn(5, 8), "prompt_mask_2": torch.ones(5)},
                    {"caption": "noise", "source": "clip0"})
    write_metadata(str(root), "hunyuan_video15", 2, latents.shape, ["prompt_embeds", "prompt_embeds_2"])
    assert LatentVideoDataset(str(root))[0]["prompt_mask"].dtype == torch.int64
    result = _run(tmp_path / "out", "--data", str(root), "--max-train-steps", "1")
    assert result["global_step"] == 1 and math.isfinite(result["losses"][0])


@pytest.mark.parametrize("family,thw", [("hunyuan_video", "2,8,8"), ("wan", "2,16,16")])
def test_other_families_train_through_the_same_code(family, thw, tmp_path):
    result = _run(tmp_path, "--tiny-family", family, "--synthetic-latent-thw", thw, "--max-train-steps", "1",
                  "--topk", "2")
    assert result["global_step"] == 1 and math.isfinite(result["losses"][0])
    model = result["transformer"]
    assert type(model).__name__ == {"hunyuan_video": "HunyuanVideoTransformer3DModel",
                                    "wan": "WanTransformer3DModel"}[family]
    assert _ssta_layers(model) == 2   # HunyuanVideo: one double- and one single-stream block; Wan: two attn1


@pytest.mark.gpu
def test_cuda_bf16_steps_through_triton_kernels(tmp_path):
    result = _run(tmp_path, "--max-train-steps", "2", "--mixed-precision", "bf16", "--ssta-backend", "triton",
                  "--gradient-checkpointing")
    assert result["transformer"].device.type == "cuda"
    log = _log(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in log) and 0 < log[-1]["density"] < 1

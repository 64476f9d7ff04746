"""Fine-tuning never loses a good checkpoint, never silently overwrites a run, and names broken files."""

import importlib.util
import json
import os

import pytest

from video_sparse_attn.cli import UsageError
from video_sparse_attn.training.checkpoints import (MANIFEST, latest_checkpoint, prune_checkpoints, publish_folder,
                                                    save_checkpoint, verify_checkpoint)
from video_sparse_attn.training.data import LatentVideoDataset, make_synthetic_dataset


class _FakeAccelerator:
    """The two calls `save_checkpoint` makes; ``fail`` makes save_state die half-way (disk full)."""

    is_main_process = True

    def __init__(self, fail=False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"x" * 100)
        if self.fail:
            raise OSError(28, "No space left on device")
        with open(os.path.join(folder, "optimizer.bin"), "wb") as f:
            f.write(b"y" * 50)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    out = str(tmp_path)
    save_checkpoint(_FakeAccelerator(), out, 2, keep=1)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_FakeAccelerator(fail=True), out, 4, keep=1)
    assert latest_checkpoint(out) == os.path.join(out, "checkpoint-2")
    verify_checkpoint(latest_checkpoint(out))
    assert not os.path.exists(os.path.join(out, "checkpoint-4"))
    # the next successful save replaces it, and only then prunes
    save_checkpoint(_FakeAccelerator(), out, 6, keep=1)
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["checkpoint-6"]


def test_final_weights_are_published_whole_or_not_at_all(tmp_path):
    """The final weights folder: a write that dies half-way leaves the previous folder as it was; the
    next write removes the leftover and replaces the folder whole."""
    final = tmp_path / "transformer"

    def write(tag, fail=False):
        def fill(folder):
            with open(os.path.join(folder, "weights.safetensors"), "w") as f:
                f.write(tag)
            if fail:
                raise OSError(28, "No space left on device")
            with open(os.path.join(folder, "config.json"), "w") as f:
                f.write(tag)
        return fill

    publish_folder(str(final), write("run 1"))
    with pytest.raises(OSError):
        publish_folder(str(final), write("run 2", fail=True))
    assert sorted(os.listdir(final)) == ["config.json", "weights.safetensors"]
    assert (final / "weights.safetensors").read_text() == "run 1"        # not the half-written run 2
    publish_folder(str(final), write("run 3"))
    assert (final / "weights.safetensors").read_text() == (final / "config.json").read_text() == "run 3"
    assert sorted(os.listdir(tmp_path)) == ["transformer"]                 # no partial or old folder left


def test_latest_skips_incomplete_and_stray_folders_and_pruning_survives_them(tmp_path):
    out = str(tmp_path)
    for step in (1, 3):
        save_checkpoint(_FakeAccelerator(), out, step, keep=None)
    os.makedirs(os.path.join(out, "checkpoint-9"))        # a save that died before its manifest
    os.makedirs(os.path.join(out, "checkpoint-best"))     # a folder someone made by hand
    assert latest_checkpoint(out) == os.path.join(out, "checkpoint-3")
    assert prune_checkpoints(out, keep=1) == [os.path.join(out, "checkpoint-1")]
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-9", "checkpoint-best"]
    with pytest.raises(ValueError, match="checkpoint-9 is incomplete"):
        verify_checkpoint(os.path.join(out, "checkpoint-9"))


def test_truncated_checkpoint_file_is_named(tmp_path):
    path = save_checkpoint(_FakeAccelerator(), str(tmp_path), 5, keep=None)
    victim = os.path.join(path, "optimizer.bin")
    with open(victim, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=f"checkpoint file {victim} is truncated"):
        verify_checkpoint(path)


# ------------------------------------------------------------------------------------ datasets
def _dataset(root, n=2):
    return make_synthetic_dataset(str(root), n, (4, 2, 8, 8), text_dim=16, text_dim_2=8)


def _rewrite_metadata(root, **changes):
    path = os.path.join(root, "metadata.json")
    with open(path) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("changes, words", [
    (dict(version=2), "format version 2 is newer than this package reads"),
    (dict(version="1"), "version must be an int"),
    (dict(num_samples=5), "num_samples is 5 but .* holds 2"),
    (dict(latent_shape=[4, 2, 8]), "latent_shape must be four positive ints"),
    (dict(latent_shape=[16, 2, 8, 8]), r"latents shape \[4, 2, 8, 8\], expected \[16, T, H, W\]"),
    (dict(format="something.else"), "format 'something.else'"),
])
def test_dataset_metadata_is_checked_up_front(tmp_path, changes, words):
    root = _dataset(tmp_path / "d")
    LatentVideoDataset(root)
    _rewrite_metadata(root, **changes)
    with pytest.raises(ValueError, match=words):
        LatentVideoDataset(root)


def test_truncated_sample_is_named_when_the_dataset_opens(tmp_path):
    root = _dataset(tmp_path / "d")
    victim = os.path.join(root, "samples", "000001.safetensors")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(ValueError, match=f"sample file {victim} cannot be read"):
        LatentVideoDataset(root)


# ------------------------------------------------------------------------------------ whole runs
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from video_sparse_attn.training.args import parse_args  # noqa: E402
from video_sparse_attn.training.trainer import train  # noqa: E402

FLAGS = ["--tile", "1,4,4", "--topk", "2", "--window", "1,1,1", "--no-progress-bar", "--synthetic-samples", "2"]


def _train(out, *extra):
    return train(parse_args(["--output-dir", str(out), *FLAGS, *extra]))


def test_a_run_keeps_its_outputs_safe(tmp_path):
    out = tmp_path / "run"
    result = _train(out, "--max-train-steps", "3", "--checkpointing-steps", "1", "--checkpoints-total-limit", "2")
    assert result["global_step"] == 3
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert os.path.isfile(out / "checkpoint-3" / MANIFEST)
    used = json.loads((out / "run_args.json").read_text())
    assert used["ssta_config"]["tile_thw"] == [1, 4, 4] and used["latent_grid"] == [2, 8, 8]
    if importlib.util.find_spec("matplotlib"):
        assert (out / "train_log.png").stat().st_size > 0
    # a second run into the same folder is refused before any model is built
    with pytest.raises(UsageError, match="already holds a run .*--resume-from-checkpoint latest.*--overwrite"):
        _train(out, "--max-train-steps", "1")
    # an explicit truncated checkpoint is named
    victim = next(p for p in (out / "checkpoint-3").iterdir() if p.name != MANIFEST and p.is_file())
    with open(victim, "r+b") as f:
        f.truncate(1)
    with pytest.raises(UsageError, match=f"checkpoint file {victim} is truncated"):
        _train(out, "--max-train-steps", "4", "--resume-from-checkpoint", str(out / "checkpoint-3"))
    # --overwrite replaces the run: old checkpoints and log lines are gone
    again = _train(out, "--max-train-steps", "1", "--overwrite", "--checkpointing-steps", "1")
    assert again["global_step"] == 1
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1"]
    with open(out / "train_log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]


def test_an_output_dir_that_is_a_file_is_one_usage_error(tmp_path):
    """It used to surface as a FileExistsError traceback from os.makedirs."""
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(UsageError, match=f"--output-dir {str(path)!r} is a file"):
        _train(path, "--max-train-steps", "1")
    assert path.read_text() == "keep me"


def test_bad_dataset_is_one_usage_error_before_the_model_loads(tmp_path):
    root = _dataset(tmp_path / "d")
    _rewrite_metadata(root, version=7)
    with pytest.raises(UsageError, match="--data .*format version 7 is newer"):
        _train(tmp_path / "run", "--data", root, "--max-train-steps", "1")
    assert not (tmp_path / "run").exists()


def test_a_failed_final_save_keeps_the_previous_weights(tmp_path, monkeypatch):
    """The run's final ``transformer/`` is replaced only by a complete one: a save that dies half-way
    (disk full) leaves the previous run's weights loadable."""
    from diffusers import ModelMixin

    out = tmp_path / "run"
    _train(out, "--max-train-steps", "1", "--checkpointing-steps", "1")
    before = {p.name: p.read_bytes() for p in (out / "transformer").iterdir()}
    real = ModelMixin.save_pretrained

    def dies_half_way(self, folder, **kw):
        real(self, folder, **kw)
        os.remove(os.path.join(folder, "config.json"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelMixin, "save_pretrained", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        _train(out, "--max-train-steps", "2", "--checkpointing-steps", "1", "--resume-from-checkpoint", "latest")
    assert {p.name: p.read_bytes() for p in (out / "transformer").iterdir()} == before

"""Fine-tuning stops cleanly instead of losing work or training on wrong data (tiny model, CPU, 1-3 steps).

Divergence and signals stop the run with one line and a non-zero status, never with NaN weights in a
checkpoint; a resume continues the run exactly or is refused; a dataset the model cannot use is named
before the first step.
"""

import json
import os
import shutil
import signal

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

import video_sparse_attn.training.trainer as trainer_mod  # noqa: E402
from video_sparse_attn.cli import UsageError, run_main  # noqa: E402
from video_sparse_attn.commands.finetune import main as finetune_main  # noqa: E402
from video_sparse_attn.training.args import parse_args  # noqa: E402
from video_sparse_attn.training.checkpoints import MANIFEST, latest_checkpoint, verify_checkpoint  # noqa: E402
from video_sparse_attn.training.data import make_synthetic_dataset, write_metadata, write_sample  # noqa: E402
from video_sparse_attn.training.trainer import train  # noqa: E402

FLAGS = ["--tile", "1,4,4", "--topk", "2", "--window", "1,1,1", "--no-progress-bar",
         "--synthetic-samples", "3", "--learning-rate", "1e-3"]


def _args(out, *extra):
    return ["--output-dir", str(out), *FLAGS, *extra]


def _train(out, *extra):
    return train(parse_args(_args(out, *extra)))


def _log(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))


def _finite_weights(checkpoint):
    from safetensors.torch import load_file

    return all(t.isfinite().all() for t in load_file(os.path.join(checkpoint, "model.safetensors")).values())


class _Poison(torch.autograd.Function):
    """Identity forward; the gradient flowing back is NaN (a finite loss whose backward overflows)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _loss_hook(monkeypatch, on_call):
    """Wrap the trainer's loss: ``on_call(n, loss)`` (n = 1, 2, ... per micro-batch) returns the loss used."""
    real = trainer_mod.flow_matching_loss
    calls = []

    def wrapped(pred, target):
        loss = real(pred, target)
        calls.append(loss.item())
        return on_call(len(calls), loss)

    monkeypatch.setattr(trainer_mod, "flow_matching_loss", wrapped)
    return calls


# ------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_step_stops_with_one_line_and_no_nan_checkpoint(where, tmp_path, monkeypatch, capsys):
    def poison(n, loss):
        if n != 2:
            return loss
        return loss * float("nan") if where == "loss" else _Poison.apply(loss)

    _loss_hook(monkeypatch, poison)
    out = tmp_path / "run"
    rc = run_main(finetune_main, _args(out, "--max-train-steps", "3", "--checkpointing-steps", "1"),
                  prog="ft")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "Traceback" not in err
    assert f"non-finite {where}" in err and "step 2" in err and "checkpoint-1" in err
    assert _checkpoints(out) == ["checkpoint-1"]          # step 2 never reached the weights or a checkpoint
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-1") and _finite_weights(out / "checkpoint-1")


# ------------------------------------------------------------------------------------ signals
def test_sigterm_saves_a_checkpoint_then_exits_non_zero(tmp_path, monkeypatch, capsys):
    def kill_during_step_2(n, loss):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives mid-step: the step finishes, then the run stops
        return loss

    _loss_hook(monkeypatch, kill_during_step_2)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    rc = run_main(finetune_main, _args(out, "--max-train-steps", "3", "--checkpointing-steps", "10"),
                  prog="ft")
    err = capsys.readouterr().err.strip()
    assert rc == 128 + signal.SIGTERM and "SIGTERM" in err and "checkpoint-2" in err and "latest" in err
    assert _checkpoints(out) == ["checkpoint-2"] and [r["step"] for r in _log(out)] == [1, 2]
    verify_checkpoint(str(out / "checkpoint-2"))
    assert signal.getsignal(signal.SIGTERM) is before    # the handler is the run's only
    monkeypatch.undo()
    result = _train(out, "--max-train-steps", "3", "--checkpointing-steps", "10", "--resume-from-checkpoint",
                    "latest")
    assert result["global_step"] == 3 and [r["step"] for r in _log(out)] == [1, 2, 3]


# ------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """3 samples, 2 micro-batches per step: steps of 2, 1 (end of the epoch) and 2 micro-batches;
    checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("acc") / "run"
    mp = pytest.MonkeyPatch()
    calls = _loss_hook(mp, lambda n, loss: loss)
    try:
        result = _train(out, "--max-train-steps", "3", "--gradient-accumulation-steps", "2",
                        "--checkpointing-steps", "2")
    finally:
        mp.undo()
    return out, result, calls


def test_resume_with_uneven_accumulation_continues_exactly(three_steps, tmp_path):
    out, full, calls = three_steps
    assert len(calls) == 5
    log = _log(out)
    assert log[1]["loss"] == pytest.approx(calls[2], rel=1e-6)   # a one-micro-batch step is not halved
    assert log[2]["loss"] == pytest.approx((calls[3] + calls[4]) / 2, rel=1e-6)
    # continue checkpoint-2 in a fresh folder: step 3 draws the same batches and noise
    fork = tmp_path / "fork"
    resumed = _train(fork, "--max-train-steps", "3", "--gradient-accumulation-steps", "2",
                     "--checkpointing-steps", "2", "--resume-from-checkpoint", str(out / "checkpoint-2"))
    assert resumed["global_step"] == 3 and len(resumed["losses"]) == 1
    assert resumed["losses"][0] == pytest.approx(full["losses"][2], rel=1e-5, abs=1e-6)


def test_resume_refuses_other_settings_and_other_runs(three_steps, tmp_path):
    out, _, _ = three_steps
    same = ["--max-train-steps", "3", "--gradient-accumulation-steps", "2", "--checkpointing-steps", "2"]
    # the optimizer state would silently keep the old learning rate; another seed another data order
    with pytest.raises(UsageError, match=r"learning_rate 0\.001 -> 0\.01.*seed 0 -> 1"):
        _train(out, *same, "--resume-from-checkpoint", "latest", "--learning-rate", "1e-2", "--seed", "1")
    with pytest.raises(UsageError, match="ssta_config"):
        _train(out, *same, "--resume-from-checkpoint", "latest", "--topk", "3")
    # an earlier checkpoint while later ones exist: the later ones belong to the run being rewound
    with pytest.raises(UsageError, match="checkpoint-3 .*after step 2.*--overwrite"):
        _train(out, *same, "--resume-from-checkpoint", str(out / "checkpoint-2"))
    # another run's checkpoint into a folder holding a run: refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(UsageError, match="holds another run"):
        _train(other, *same, "--resume-from-checkpoint", str(out / "checkpoint-2"))
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-3"]   # nothing was touched


def test_rewinding_with_overwrite_drops_later_checkpoints_and_a_torn_log_line(three_steps, tmp_path):
    src, _, _ = three_steps
    out = tmp_path / "run"
    shutil.copytree(src, out)
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')                       # the process died while writing a line
    result = _train(out, "--max-train-steps", "3", "--gradient-accumulation-steps", "2",
                    "--checkpointing-steps", "2", "--resume-from-checkpoint", str(out / "checkpoint-2"),
                    "--overwrite")
    assert result["global_step"] == 3 and [r["step"] for r in _log(out)] == [1, 2, 3]
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / MANIFEST).read_text())["step"] == 3


def test_rewinding_to_a_checkpoint_that_fails_to_load_discards_nothing(three_steps, tmp_path):
    """With --overwrite, the checkpoints after the resumed one used to be deleted before it loaded: a
    checkpoint that passed the size check but could not be read left neither."""
    src, _, _ = three_steps
    out = tmp_path / "run"
    shutil.copytree(src, out)
    weights = out / "checkpoint-2" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 16)                         # same size, unreadable header
    log = (out / "train_log.jsonl").read_text()
    run_args = (out / "run_args.json").read_text()
    with pytest.raises(UsageError, match="checkpoint-2 cannot be loaded"):
        _train(out, "--max-train-steps", "3", "--gradient-accumulation-steps", "2", "--checkpointing-steps", "2",
               "--resume-from-checkpoint", str(out / "checkpoint-2"), "--overwrite")
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    verify_checkpoint(str(out / "checkpoint-3"))
    assert (out / "train_log.jsonl").read_text() == log and (out / "run_args.json").read_text() == run_args


# ------------------------------------------------------------------------------------ data
def test_synthetic_data_of_other_settings_is_rewritten(tmp_path):
    out = tmp_path / "run"
    make_synthetic_dataset(str(out / "synthetic_data"), 3, (4, 2, 8, 8), 16, text_dim_2=8)  # an older run's
    _train(out, "--max-train-steps", "1", "--synthetic-latent-thw", "2,4,4")
    used = json.loads((out / "run_args.json").read_text())
    meta = json.loads((out / "synthetic_data" / "metadata.json").read_text())
    assert used["latent_grid"] == [2, 4, 4] and meta["latent_shape"] == [4, 2, 4, 4]


def test_a_dataset_someone_put_where_synthetic_data_goes_is_never_deleted(tmp_path):
    out = tmp_path / "run"
    root = out / "synthetic_data"
    make_synthetic_dataset(str(root), 3, (4, 2, 8, 8), 16, text_dim_2=8)
    meta = json.loads((root / "metadata.json").read_text())
    meta["synthetic"] = False                         # as a dataset made from real videos says
    (root / "metadata.json").write_text(json.dumps(meta))
    before = sorted(os.listdir(root))
    with pytest.raises(UsageError, match="did not generate.*--data"):
        _train(out, "--max-train-steps", "1", "--synthetic-latent-thw", "2,4,4")
    assert sorted(os.listdir(root)) == before


def _hv15_dataset(root, **override):
    sample = {"latents": torch.randn(4, 2, 8, 8), "prompt_embeds": torch.randn(5, 16),
              "prompt_mask": (torch.arange(5) < 3).long(), "prompt_embeds_2": torch.zeros(3, 8),
              "prompt_mask_2": torch.zeros(3, dtype=torch.long)}   # no glyph text: an empty ByT5 mask is fine
    sample.update(override)
    sample = {k: v for k, v in sample.items() if v is not None}
    for i in range(2):
        write_sample(str(root), i, sample)
    write_metadata(str(root), "hunyuan_video15", 2, (4, 2, 8, 8),
                   [k for k in ("prompt_embeds", "prompt_embeds_2") if k in sample])
    return str(root)


@pytest.mark.parametrize("override, words", [
    (dict(prompt_embeds_2=None, prompt_mask_2=None), r"000000\.safetensors lacks \['prompt_embeds_2'"),
    (dict(prompt_mask=torch.zeros(5, dtype=torch.long)),
     r"000000\.safetensors: prompt_mask has no valid token"),
    (dict(prompt_embeds=torch.randn(5, 7)), r"prompt_embeds is 7 wide, the model takes 16"),
    (dict(latents=torch.full((4, 2, 8, 8), float("nan"))), r"000000\.safetensors: latents holds NaN or inf"),
], ids=["no_byt5", "empty_mask", "text_width", "nan_latents"])
def test_a_dataset_the_model_cannot_use_is_one_line_before_the_first_step(override, words, tmp_path):
    root = _hv15_dataset(tmp_path / "d", **override)
    with pytest.raises(UsageError, match=words):
        _train(tmp_path / "run", "--data", root, "--max-train-steps", "1")
    run = tmp_path / "run"   # header problems are found before the folder is made, the others before step 1
    assert not run.exists() or not any(n.startswith("checkpoint") for n in os.listdir(run))


def test_latent_grid_not_divisible_by_the_patch_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"latent \(T, H, W\) \(2, 15, 15\) .*patch \(1, 2, 2\)"):
        _train(tmp_path / "run", "--tiny-family", "wan", "--synthetic-latent-thw", "2,15,15",
               "--max-train-steps", "1")

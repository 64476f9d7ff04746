"""Commands: every mistake is one line before any model loads, one SSTA vocabulary, entry points,
the README's op snippet, the stock video of --compare-stock and the mask picture's legend."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from video_sparse_attn.cli import OneLineParser, UsageError, add_ssta_arguments, run_main, triple
from video_sparse_attn.commands import COMMANDS, load_command

from helpers import load_script

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _script(name):
    return load_script(name, name.replace(".py", "_script"))


def _run(main, argv, capsys):
    """(exit status, stderr) of a command called the way its console entry point calls it."""
    try:
        rc = run_main(main, argv, prog="cmd")
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command gets as far as building or loading a model."""
    from video_sparse_attn.commands import generate
    from video_sparse_attn.testing import tiny

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(generate, "_load_pipeline", refuse)
    monkeypatch.setattr(tiny, "tiny_hunyuan_video15_pipeline", refuse)
    from video_sparse_attn.training import trainer

    monkeypatch.setattr(trainer, "tiny_transformer", refuse)
    monkeypatch.setattr(trainer, "load_transformer", refuse)


@pytest.mark.parametrize("argv, words", [
    (["--frames", "0"], "argument --frames: expected an int >= 1, got '0'"),
    (["--frames", "-4"], "argument --frames: expected an int >= 1"),
    (["--steps", "0"], "argument --steps: expected an int >= 1"),
    (["--frames", "10"], r"--frames 10: must be 1 \+ 2k"),
    (["--height", "17"], "--height 17: must be a multiple of 4"),
    (["--output", "x.gif"], "--output 'x.gif'"),
    (["--tile", "1,4"], "argument --tile: expected three positive ints"),
    (["--ssta-config", "missing.json"], "argument --ssta-config: no such file: 'missing.json'"),
    (["--no-ssta", "--compare-stock"], "--compare-stock .* cannot go with --no-ssta"),
    (["--dense-steps", "9", "--steps", "3"], "--dense-steps 9: more than --steps 3"),
    (["--model", "no/such/folder"], "--model 'no/such/folder': no such folder"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--sparse-type", "sparse"], "argument --sparse-type: invalid choice"),
])
def test_generate_mistakes_are_one_line_before_loading(argv, words, capsys, no_model_loads):
    rc, err = _run(load_command("generate").main, argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(words, err) and "Traceback" not in err, err


def test_bad_config_files_are_named(tmp_path, capsys, no_model_loads):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    wrong_field = tmp_path / "wrong.json"
    wrong_field.write_text(json.dumps({"topk": "32"}))
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps({"dense_stepz": 3}))
    for argv, words in ((["--ssta-config", str(bad_json)], f"--ssta-config '{bad_json}'"),
                        (["--ssta-config", str(wrong_field)], "topk must be an int"),
                        (["--schedule", str(schedule)], f"--schedule '{schedule}'")):
        rc, err = _run(load_command("generate").main, argv, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("argv, words", [
    (["--topk", "0"], "argument --topk: expected an int >= 1"),
    (["--max-train-steps", "0"], "argument --max-train-steps"),
    (["--learning-rate", "-1"], "argument --learning-rate: expected a number > 0"),
    (["--lr-scheduler", "cosinus"], "argument --lr-scheduler: invalid choice"),
    (["--data", "no/such/data"], "argument --data: no such folder"),
    (["--window", "0,1,1"], "argument --window"),
    (["--pad-type", "zeros"], "argument --pad-type: invalid choice"),
])
def test_finetune_mistakes_are_one_line_before_loading(argv, words, capsys, no_model_loads, tmp_path):
    rc, err = _run(load_command("finetune").main, ["--output-dir", str(tmp_path / "o"), *argv], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(words, err), err


def test_bugs_keep_their_traceback():
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(buggy, [])
    assert run_main(lambda argv: None, []) == 0

    def mistake(argv):
        raise UsageError("bad value")

    assert run_main(mistake, [], prog="x") == 2


def _option_strings(parser, group_title):
    group = next(g for g in parser._action_groups if g.title == group_title)
    return {(s, a.dest) for a in group._group_actions for s in a.option_strings}


def test_one_ssta_vocabulary_and_help_for_every_option():
    parsers = {}
    for name in COMMANDS:
        p = argparse.ArgumentParser()
        load_command(name).add_arguments(p)
        parsers[name] = p
        for action in p._actions:
            assert action.help, f"{name}: {action.option_strings} has no help"
    # every command that takes an SSTA config shares one option group; warmup takes only kernel facts
    ssta = [_option_strings(p, "SSTA (sparse attention)") for n, p in parsers.items() if n != "warmup"]
    warm = {a.dest: a for a in parsers["warmup"]._actions}
    assert warm["tile"].type is triple and set(warm["backend"].choices) >= {"auto", "torch", "triton", "fa4"}
    shared = {("--ssta-config", "ssta_config"), ("--tile", "tile"), ("--window", "window"), ("--topk", "topk"),
              ("--sparse-type", "sparse_type"), ("--pad-type", "pad_type"), ("--backend", "backend")}
    for options in ssta:
        assert shared <= options
    # the older spellings still parse, hidden from --help
    p = OneLineParser()
    add_ssta_arguments(p)
    args = p.parse_args(["--kernel", "3", "3", "3", "--tile", "1", "4", "4", "--ssta-backend", "torch"])
    assert args.window == (3, 3, 3) and args.tile == (1, 4, 4) and args.backend == "torch"
    assert "--kernel" not in p.format_help() and "--window T,H,W" in p.format_help()


def test_entry_points_and_subcommands():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == {"vsa-generate", "vsa-finetune", "vsa-benchmark", "vsa-warmup"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    from video_sparse_attn.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS) == ["generate", "finetune", "benchmark", "warmup"]


def test_python_dash_m_reports_a_mistake_in_one_line():
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    proc = subprocess.run([sys.executable, "-m", "video_sparse_attn", "generate", "--frames", "10"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "python -m video_sparse_attn: error: --frames 10: must be 1 + 2k (e.g. 1, 3, 5, 7, ...) for this model's VAE")


def test_benchmark_command_runs_on_cpu(tmp_path):
    out = tmp_path / "b.json"
    result = load_command("benchmark").main(["--thw", "2", "4", "8", "--text-len", "5", "--tile", "1,4,4",
                                             "--topk", "1", "--window", "1,1,1", "--device", "cpu",
                                             "--repeats", "1", "--json", str(out)])
    assert 0 < result["density"] < 1 and json.loads(out.read_text())["config"]["tile_thw"] == [1, 4, 4]


def test_make_latent_dataset_refuses_to_overwrite(tmp_path, capsys):
    module = _script("make_latent_dataset.py")
    module.main(["--output", str(tmp_path / "d"), "--synthetic", "1"])
    rc, err = _run(module.main, ["--output", str(tmp_path / "d"), "--synthetic", "1"], capsys)
    assert rc == 2 and "already holds a dataset; pass --overwrite" in err
    rc, err = _run(module.main, ["--output", str(tmp_path / "e"), "--model", str(tmp_path), "--videos",
                                 str(tmp_path), "--num-frames", "10"], capsys)
    assert rc == 2 and "--num-frames 10: must be 4k+1" in err


def test_readme_op_snippet_runs_on_a_cpu_only_machine(monkeypatch, capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Using the op"):]
    snippet = section[section.index("```python\n") + 10: section.index("```\n", section.index("```python\n") + 10)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exec(compile(snippet, "README.md", "exec"), {})
    assert "torch.Size([1, 2, 1408, 64])" in capsys.readouterr().out


def test_demo_mask_picture_has_a_legend(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    seen = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (seen.append(fig), original(fig, *a, **k)))
    demo = _script("demo.py")
    mask = torch.eye(6, dtype=torch.bool)
    assert demo.plot_block_mask(mask, 4, str(tmp_path / "m.png"), "t")
    legend = seen[0].axes[0].get_legend()
    assert legend is not None
    assert {t.get_text() for t in legend.get_texts()} >= {"kept block (attended)", "skipped block"}


def test_compare_stock_writes_both_videos_and_records_values_used(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "v.mp4"
    report = _script("generate.py").main(["--output", str(out), "--steps", "1", "--frames", "3", "--height", "16",
                                          "--width", "24", "--device", "cpu", "--compare-stock",
                                          "--window", "1,1,1", "--topk", "1"])
    stock = tmp_path / "v_stock.mp4"
    assert out.stat().st_size > 0 and stock.stat().st_size > 0 and report["stock_output"] == str(stock)
    saved = json.loads((tmp_path / "v.json").read_text())
    assert (saved["frames"], saved["height"], saved["width"]) == (3, 16, 24)
    assert saved["ssta"]["config"]["kernel_thw"] == [1, 1, 1] and "psnr_vs_stock_db" in saved

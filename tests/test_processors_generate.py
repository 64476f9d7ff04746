"""scripts/generate.py: the offline default (tiny random HunyuanVideo-1.5) writes an mp4 and a report."""

from __future__ import annotations

import json

import pytest

from helpers import load_script

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")



def _load():
    return load_script("generate.py", "generate_script")


def test_offline_default_writes_video_and_report(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    report = _load().main(["--output", str(out), "--steps", "3", "--dense-steps", "1", "--device", "cpu",
                           "--frames", "5", "--height", "32", "--width", "32"])
    assert out.is_file() and out.stat().st_size > 0
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["steps"] == 3 and saved["latent_thw"] == [3, 8, 8]
    per_step = saved["attention"]["per_step"]
    assert per_step["0"]["sparse_types"] == ["dense"] and per_step["2"]["sparse_types"] == ["ssta"]
    assert 0 < per_step["2"]["density"] < per_step["0"]["density"] <= 1
    assert report["ssta"]["schedule"]["dense_steps"] == 1
    assert "random weights" in capsys.readouterr().out

"""Checkpoint folders of a fine-tuning run: written atomically, found, checked and pruned safely.

A checkpoint is written into ``.checkpoint-<step>.partial/``, completed with a manifest
(``checkpoint_manifest.json``: step and the size of every file), then renamed to ``checkpoint-<step>/``;
older checkpoints are pruned only after that rename. A ``checkpoint-<step>`` folder without a
manifest (a crash inside an older version's save, a copy in progress) is never picked by ``latest``
nor pruned; folders with other names (``checkpoint-best``) are left alone. Each checkpoint also holds
``run_settings.json`` (the settings a resume must keep, see `trainer`), written before the manifest.
The final weights folder of a run is published the same way (`publish_folder`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["MANIFEST", "complete_checkpoints", "latest_checkpoint", "step_of", "save_checkpoint",
           "prune_checkpoints", "verify_checkpoint", "check_output_dir", "RUN_OUTPUTS", "SETTINGS",
           "read_settings", "publish_folder"]

MANIFEST = "checkpoint_manifest.json"
SETTINGS = "run_settings.json"
PREFIX = "checkpoint-"
RUN_OUTPUTS = ("transformer", "transformer_lora", "train_log.jsonl", "train_log.png", "run_args.json")


def step_of(checkpoint: str) -> int:
    """The step of a ``checkpoint-<step>`` folder (ValueError for other names)."""
    name = os.path.basename(os.path.normpath(checkpoint))
    tail = name[len(PREFIX):]
    if not (name.startswith(PREFIX) and tail.isdigit()):
        raise ValueError(f"checkpoint folder must be named checkpoint-<step>, got {checkpoint!r}")
    return int(tail)


def _numbered(output_dir: str) -> List[Tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and os.path.isdir(path):
            out.append((int(name[len(PREFIX):]), path))
    return sorted(out)


def complete_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``[(step, path)]`` of the complete checkpoints (manifest present), oldest first."""
    return [(s, p) for s, p in _numbered(output_dir) if os.path.isfile(os.path.join(p, MANIFEST))]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest complete ``checkpoint-<step>`` folder, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1][1] if done else None


def _manifest(folder: str, step: int) -> dict:
    files = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            full = os.path.join(dirpath, n)
            files[os.path.relpath(full, folder)] = os.path.getsize(full)
    return {"step": step, "files": files}


def verify_checkpoint(path: str) -> None:
    """ValueError naming the checkpoint (and the file) when it is incomplete or a file is truncated."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(manifest_path):
        raise ValueError(f"checkpoint {path} is incomplete (no {MANIFEST}: its save did not finish)")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from None
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise ValueError(f"checkpoint file {full} is missing")
        if os.path.getsize(full) != size:
            raise ValueError(f"checkpoint file {full} is truncated or changed: {os.path.getsize(full)} bytes, "
                             f"{size} when saved")


def prune_checkpoints(output_dir: str, keep: Optional[int]) -> List[str]:
    """Delete the oldest complete checkpoints so that ``keep`` remain; returns the deleted paths."""
    if keep is None:
        return []
    done = complete_checkpoints(output_dir)
    gone = [p for _, p in done[: max(0, len(done) - keep)]]
    for p in gone:
        shutil.rmtree(p)
    return gone


def read_settings(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The ``run_settings.json`` of a checkpoint, or None (written by an older version)."""
    path = os.path.join(checkpoint, SETTINGS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_checkpoint(accelerator, output_dir: str, step: int, keep: Optional[int],
                    settings: Optional[Dict[str, Any]] = None) -> str:
    """``accelerator.save_state`` into a temporary folder (plus ``settings`` as ``run_settings.json``),
    manifest, rename to ``checkpoint-<step>``, then prune to ``keep``. A failure before the rename
    leaves every earlier checkpoint in place; partial folders of earlier failed saves are removed."""
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    partial = os.path.join(output_dir, f".{PREFIX}{step}.partial")
    if accelerator.is_main_process:
        for name in os.listdir(output_dir):
            if name.startswith(f".{PREFIX}") and name.endswith(".partial"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if settings is not None:
            with open(os.path.join(partial, SETTINGS), "w") as f:
                json.dump(settings, f, indent=1)
        manifest = _manifest(partial, step)
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _swap_in(partial, final)           # same step written again (--overwrite): swap, then delete
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _swap_in(partial: str, final: str) -> None:
    """Rename the complete folder ``partial`` to ``final``; an existing ``final`` is moved aside first
    and deleted only after the rename (at every moment one complete version exists on disk)."""
    if not os.path.exists(final):
        os.replace(partial, final)
        return
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old)


def publish_folder(final: str, write) -> str:
    """Write a folder atomically: ``write(path)`` fills ``.<name>.partial`` beside ``final`` (left
    over from a failed write: removed first), which then replaces ``final``. A failure inside
    ``write`` leaves ``final`` as it was. Returns ``final``."""
    final = os.path.normpath(final)
    partial = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    write(partial)
    _swap_in(partial, final)
    return final


def check_output_dir(output_dir: str, resume: Optional[str], overwrite: bool) -> List[str]:
    """Refuse to start a new run over a previous one's outputs (ValueError, one line), unless resuming
    or overwriting; returns the previous outputs found (to delete when overwriting)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output-dir {output_dir!r} is a file, not a folder; pass a folder (new or a run's)")
    if not os.path.isdir(output_dir):
        return []
    found = [p for _, p in _numbered(output_dir)] + [
        os.path.join(output_dir, n) for n in RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, n))]
    if found and not resume and not overwrite:
        names = ", ".join(sorted(os.path.basename(p) for p in found)[:4])
        raise ValueError(f"--output-dir {output_dir!r} already holds a run ({names}); pass "
                         "--resume-from-checkpoint latest to continue it, --overwrite to replace it, "
                         "or another --output-dir")
    return found

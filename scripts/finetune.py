#!/usr/bin/env python
"""Fine-tune a diffusers video transformer with SSTA: a thin wrapper over ``vsa-finetune``
(`video_sparse_attn.commands.finetune`), kept so that ``python scripts/finetune.py`` and
``accelerate launch scripts/finetune.py`` work from a source checkout. See ``--help``.
"""

from video_sparse_attn.commands.finetune import cli, main  # noqa: F401

if __name__ == "__main__":
    cli(prog="finetune.py")

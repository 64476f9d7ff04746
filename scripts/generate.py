#!/usr/bin/env python
"""Text-to-video with SSTA and a timing / density report: a thin wrapper over ``vsa-generate``
(`video_sparse_attn.commands.generate`), kept so that ``python scripts/generate.py`` works from a
source checkout. See ``--help``.
"""

from video_sparse_attn.commands.generate import cli, main  # noqa: F401

if __name__ == "__main__":
    cli(prog="generate.py")

#!/usr/bin/env python
"""Text-to-video with SSTA and a timing / density report: a thin wrapper over ``vsa-generate``
(`video_sparse_attn.commands.generate`), kept so that ``python scripts/generate.py`` works from a
source checkout. See ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from video_sparse_attn.commands.generate import cli, main  # noqa: E402,F401

if __name__ == "__main__":
    cli(prog="generate.py")

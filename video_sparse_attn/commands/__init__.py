"""The package's commands, each a module with ``add_arguments(parser)``, ``run(args)``, ``main(argv)``
and ``cli()`` (console entry point). `COMMANDS` maps a subcommand name to its module and summary;
``python -m video_sparse_attn NAME`` and the ``vsa-NAME`` entry points are built from it, so a new
command is one module plus one line here (and one in pyproject's ``[project.scripts]``).
"""

from __future__ import annotations

import importlib

__all__ = ["COMMANDS", "load_command"]

COMMANDS = {
    "generate": ("video_sparse_attn.commands.generate", "text-to-video with a diffusers pipeline under SSTA"),
    "finetune": ("video_sparse_attn.commands.finetune", "flow-matching fine-tuning under SSTA"),
    "benchmark": ("video_sparse_attn.commands.benchmark", "time ssta_attention against dense attention"),
    "warmup": ("video_sparse_attn.commands.warmup", "compile and tune the attention kernels ahead of time"),
}


def load_command(name: str):
    """The module of command ``name``."""
    return importlib.import_module(COMMANDS[name][0])

"""``python -m video_sparse_attn {generate,finetune,benchmark} ...`` (see `commands.COMMANDS`)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .cli import OneLineParser, run_main
from .commands import COMMANDS, load_command


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m video_sparse_attn",
                           description="SSTA sparse attention for video diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        module = load_command(name)
        module.add_arguments(sub.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0],
                                            formatter_class=module.FORMATTER))
    return parser


def main(argv: Optional[Sequence[str]] = None):
    args = build_parser().parse_args(argv)
    return load_command(args.command).run(args)


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m video_sparse_attn"))

"""Command-line plumbing shared by the scripts and ``python -m video_sparse_attn``.

User mistakes (a bad argument, path, config file or dataset) raise `UsageError`; `run_main` prints
them as one line and exits with status 2. A run that stops for a stated reason (training diverged, a
signal) raises `CommandError`: one line, its own exit status. Bugs keep their traceback. The SSTA
options have one spelling everywhere (`add_ssta_arguments`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence, Tuple

__all__ = ["UsageError", "CommandError", "OneLineParser", "run_main", "read_json", "triple", "positive_int",
           "non_negative_int", "positive_float",
           "existing_file", "existing_dir", "add_ssta_arguments", "ssta_overrides", "load_ssta_config",
           "SPARSE_TYPES", "PAD_TYPES", "BACKENDS", "SAMPLING_TYPES"]

SPARSE_TYPES = ("ssta", "sta", "block_attn", "dense")
PAD_TYPES = ("zero", "repeat", "mask")
BACKENDS = ("auto", "torch", "triton")
SAMPLING_TYPES = ("importance", "similarity")


class UsageError(ValueError):
    """A mistake of the person running the command: reported as one line, no traceback."""


class CommandError(RuntimeError):
    """A run that stopped for a reason stated in the message (not a bug): one line on stderr, exit
    status ``exit_code`` (1 unless given)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _TripleAction(argparse.Action):
    """``--tile 1,4,4`` (documented) or ``--tile 1 4 4`` (older spelling) → (1, 4, 4)."""

    def __call__(self, parser, namespace, values, option_string=None):
        text = ",".join(values) if isinstance(values, list) else values
        try:
            setattr(namespace, self.dest, triple(text))
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None) -> int:
    """Call ``main(argv)``; a `UsageError` (or a missing / unreadable file) becomes
    ``"<prog>: error: <message>"`` on stderr and exit status 2; a `CommandError` ``"<prog>: <message>"``
    and its exit status."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except CommandError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------------------- argument types
def triple(text: str) -> Tuple[int, int, int]:
    """``"t,h,w"`` (or ``t x h x w``) → three positive ints."""
    try:
        parts = tuple(int(x) for x in str(text).lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints 't,h,w', got {text!r}")
    return parts  # type: ignore[return-value]


def _number(kind, low, inclusive, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and value != value or (value < low if inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, 0, False, "an int >= 1")
non_negative_int = _number(int, 0, True, "an int >= 0")
positive_float = _number(float, 0.0, False, "a number > 0")


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text


# ---------------------------------------------------------------------------- SSTA options
def add_ssta_arguments(parser: argparse.ArgumentParser, backend_default: str = "auto") -> argparse._ArgumentGroup:
    """The SSTA knobs, spelled the same in every command (old spellings kept as hidden aliases)."""
    g = parser.add_argument_group("SSTA (sparse attention)")
    g.add_argument("--ssta-config", dest="ssta_config", type=existing_file, default=None,
                   metavar="FILE", help="SSTAConfig JSON (or .safetensors with SSTA metadata); the flags "
                   "below override its fields")
    g.add_argument("--sparse-type", choices=SPARSE_TYPES, default=None,
                   help="ssta = window + top-k + text; sta = window + text; block_attn = top-k + text; dense")
    g.add_argument("--tile", action=_TripleAction, nargs="+", default=None, metavar="T,H,W",
                   help="tile (= attention block) in latent tokens t,h,w (any size; multiples of 16 tokens waste no slots)")
    g.add_argument("--window", dest="window", action=_TripleAction, nargs="+", default=None,
                   metavar="T,H,W", help="STA window (kernel_thw) in tiles")
    g.add_argument("--topk", type=positive_int, default=None, help="key tiles selected per query tile")
    g.add_argument("--pad-type", choices=PAD_TYPES, default=None,
                   help="padded video tokens: zero / repeat stay visible as keys; mask excludes them (exact)")
    g.add_argument("--sampling-type", choices=SAMPLING_TYPES, default=None,
                   help="how top-k tiles are scored")
    g.add_argument("--no-caller-rules", action="store_true",
                   help="use topk / tiles exactly as given (no HunyuanVideo-1.5 halving for short videos)")
    g.add_argument("--backend", dest="backend", choices=BACKENDS, default=backend_default,
                   help="auto: Triton kernels on CUDA, PyTorch on CPU")
    # older spellings, accepted but not advertised
    g.add_argument("--config", dest="ssta_config", type=existing_file, default=None, help=argparse.SUPPRESS)
    g.add_argument("--kernel", dest="window", action=_TripleAction, nargs="+", default=None, help=argparse.SUPPRESS)
    g.add_argument("--ssta-backend", dest="backend", choices=BACKENDS, default=backend_default,
                   help=argparse.SUPPRESS)
    return g


def ssta_overrides(args: argparse.Namespace) -> dict:
    """`SSTAConfig` fields the SSTA flags set (those given on the command line only)."""
    given = {"sparse_type": args.sparse_type, "topk": args.topk, "pad_type": args.pad_type,
             "sampling_type": args.sampling_type, "tile_thw": args.tile, "kernel_thw": args.window}
    changes = {k: v for k, v in given.items() if v is not None}
    if args.no_caller_rules:
        changes["caller_rules"] = False
    return changes


def load_ssta_config(path: str, base=None, changes: Optional[dict] = None):
    """``SSTAConfig`` from ``path`` (or ``base``) with ``changes``; any problem → `UsageError`
    naming the file or the flags."""
    from .config import SSTAConfig

    config = base if base is not None else SSTAConfig()
    if path:
        try:
            config = SSTAConfig.load(path)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"--ssta-config {path!r}: {e}") from None
    if changes:
        try:
            config = config.replace(**changes)
        except (ValueError, TypeError) as e:
            raise UsageError(f"SSTA options {_flags(changes)}: {e}") from None
    return config


def _flags(changes: dict) -> str:
    names = {"tile_thw": "--tile", "kernel_thw": "--window", "caller_rules": "--no-caller-rules"}
    return " ".join(f"{names.get(k, '--' + k.replace('_', '-'))}={v}" for k, v in changes.items())


def read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; unreadable or malformed → `UsageError` naming ``what`` and the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path!r}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path!r}: expected a JSON object, got {type(data).__name__}")
    return data

"""The `bidm` command line: one sub-command per module in `bidm.commands`.

Each command module exposes `add_parser(subparsers)`, which registers its parser and sets `func` to a callable
taking the parsed `argparse.Namespace`. Heavy imports happen inside `func`, so `bidm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bidm.errors import BidmError

COMMANDS = ["train", "binarize", "sample", "summary", "export", "evaluate", "compare", "analyze", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bidm",
        description="Fully binarized (W1A1) diffusion models: train, binarize, sample, evaluate, summarize, export.",
        epilog="Run `bidm COMMAND --help` for a command's options. Start with `bidm demo`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bidm.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bidm.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (BidmError, FileNotFoundError) as err:  # errors the user can fix: one clear line, no traceback
        print(f"bidm {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

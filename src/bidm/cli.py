"""The `bidm` command line: one sub-command per module in `bidm.commands`.

Each command module exposes `add_parser(subparsers)`, which registers its parser and sets `func` to a callable
taking the parsed `argparse.Namespace`. Heavy imports happen inside `func`, so `bidm --help` stays fast.

Every failure is one line on stderr and a non-zero exit: bad arguments (argparse, exit 2), errors the user can fix
(`BidmError`, `OSError` such as a full disk, exit 1), an interrupt (exit 130), and anything unexpected (exit 1,
named as such). ``bidm --debug COMMAND`` (or ``BIDM_DEBUG=1``) shows the traceback instead. ``--no-verify`` skips
the content-hash check of bidm files (`bidm.integrity`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from bidm.errors import BidmError

COMMANDS = ["train", "binarize", "sample", "summary", "export", "evaluate", "compare", "analyze", "demo"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where to look), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="bidm",
        description="Fully binarized (W1A1) diffusion models: train, binarize, sample, evaluate, summarize, export.",
        epilog="Run `bidm COMMAND --help` for a command's options. Start with `bidm demo`.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--no-verify", action="store_true", help="load bidm files without checking their content hash")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bidm.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bidm.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (some library messages span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line too (``bidm: warning: ...``), without the source line."""
    print(f"bidm: warning: {one_line(message) if isinstance(message, Warning) else message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("BIDM_DEBUG", "") not in ("", "0")
    where = f"bidm {args.command}"
    from bidm.integrity import skip_verification

    verify = skip_verification() if args.no_verify else contextlib.nullcontext()
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning  # restored by catch_warnings
        try:
            with verify:
                return int(args.func(args) or 0)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{where}: interrupted", file=sys.stderr)
            return 130
        except (BidmError, OSError) as err:  # errors the user can fix: one clear line, no traceback
            if debug:
                raise
            print(f"{where}: error: {one_line(err)}", file=sys.stderr)
            return 1
        except Exception as err:  # a bug, or a library failure we do not know yet: still one line
            if debug:
                raise
            print(
                f"{where}: error: unexpected {type(err).__name__}: {one_line(err)} "
                f"(rerun as `bidm --debug {args.command} ...` for the traceback and please report it)",
                file=sys.stderr,
            )
            return 1


if __name__ == "__main__":
    sys.exit(main())

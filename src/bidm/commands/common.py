"""Arguments and checks shared by the commands.

`check_outputs` is the one rule every command follows before it writes: no output may be one of the command's
inputs (or lie inside an input directory), and an existing output is replaced only with ``--force``. The number
types (`count`, `nonnegative`) make a bad flag an argparse error instead of a silent fallback to a default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

from bidm.config import Config, load_config
from bidm.errors import BidmError


class OutputConflict(BidmError):
    """A command would write over one of its inputs, or over an existing output without --force."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of overrides (defaults live in bidm/config.py)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.steps=500 --set data.size=16 (repeatable)",
    )
    parser.add_argument("--out", help="output directory (config key out_dir)")
    parser.add_argument("--data-path", help="dataset path (config key data.path)")


def add_force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def config_from_args(args: argparse.Namespace, extra: list[str] = (), base: dict | None = None) -> Config:
    """``base`` <- --config <- --set <- ``extra`` (a command's own flags) <- --out / --data-path."""
    overrides = list(args.overrides) + list(extra)
    if getattr(args, "out", None):
        overrides.append(f"out_dir={args.out}")
    if getattr(args, "data_path", None):
        overrides.append(f"data.path={args.data_path}")
    return load_config(args.config, overrides, base=base)


def _number(kind: type, minimum: float, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value < minimum:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


count = _number(int, 1, "an integer >= 1")
nonnegative_int = _number(int, 0, "an integer >= 0")
nonnegative = _number(float, 0.0, "a number >= 0")


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(
    outputs: Iterable[str | Path], inputs: Iterable[str | Path | None] = (), *, force: bool = False
) -> None:
    """Refuse (`OutputConflict`) to write any of ``outputs`` (files) when it

    - is one of ``inputs`` (same resolved path, or the same file through a link): never allowed, not even with
      ``force``; an input directory counts for every file under it;
    - is an existing directory, or lies under an existing file;
    - exists and ``force`` is False.
    ``None`` inputs (optional flags not given) are skipped.
    """
    sources = [Path(p).resolve() for p in inputs if p is not None and str(p) != ""]
    for out in outputs:
        out = Path(out)
        target = out.resolve()
        for src in sources:
            if _same_file(target, src):
                raise OutputConflict(f"refusing to write {out}: it is an input of this command")
            if src.is_dir() and target.is_relative_to(src):
                raise OutputConflict(f"refusing to write {out}: it lies inside the input directory {src}")
        if target.is_dir():
            raise OutputConflict(f"refusing to write {out}: it is a directory (give a file path)")
        parent = next((p for p in target.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputConflict(f"cannot write {out}: {parent} is a file, not a directory")
        if target.exists() and not force:
            raise OutputConflict(f"{out} exists: pass --force to overwrite it")


def run_outputs(out_dir: str | Path) -> list[Path]:
    """The files a training run writes in its directory (`bidm.train.run`)."""
    out_dir = Path(out_dir)
    return [out_dir / "checkpoint.safetensors", out_dir / "config.yaml", out_dir / "log.jsonl"]

"""Arguments shared by the commands that read a config."""

from __future__ import annotations

import argparse

from bidm.config import Config, load_config


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


def config_from_args(args: argparse.Namespace, extra: list[str] = (), base: dict | None = None) -> Config:
    """``base`` <- --config <- --set <- ``extra`` (a command's own flags) <- --out / --data-path."""
    overrides = list(args.overrides) + list(extra)
    if getattr(args, "out", None):
        overrides.append(f"out_dir={args.out}")
    if getattr(args, "data_path", None):
        overrides.append(f"data.path={args.data_path}")
    return load_config(args.config, overrides, base=base)

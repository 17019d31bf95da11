"""`bidm summary`: per-layer precision / params / MACs and size and OPs savings of a binarized UNet (larq-style)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "summary",
        help="efficiency summary: size (MiB), BOPs, FLOPs, OPs and their savings",
        description="Count a model built from a preset (--model) or a config (--config) on the meta device (no "
        "weights, no memory): per-layer table and totals, OPs = BOPs/64 + FLOPs. --paper-accounting follows the "
        "BiDM paper's Table 4 rules (skip convs counted as 1-bit in the size; ldm-bedrooms uses the paper's "
        "0.38 G FLOPs).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        "--preset",
        dest="preset",
        default=None,
        help="model preset: tiny | ddim-cifar10 | ldm-bedrooms | ldm-churches | ldm-ffhq (default ddim-cifar10 "
        "when no --config)",
    )
    src.add_argument("--config", default=None, help="YAML config (model and binarize sections are used)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (with --config), repeatable",
    )
    p.add_argument(
        "--method",
        default=None,
        help="binarization method (a key of bidm.binarize.METHODS) or 'none' (default: bidm for a "
        "preset, the config's binarize.method for --config)",
    )
    p.add_argument("--input-shape", default=None, help="B,C,H,W (default: the preset's / the config's)")
    p.add_argument("--paper-accounting", action="store_true", help="count as the paper's Table 4 (reference §7)")
    p.add_argument(
        "--paper-flops",
        default=None,
        metavar="G|none",
        help="with --paper-accounting: FLOPs (in G) to use instead of the measured FP-kept layers; 'none' drops "
        "the preset's paper value (ldm-bedrooms / ldm-ffhq: 0.38) and keeps the measured one",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--no-layers", action="store_true", help="totals only")
    p.add_argument("--out", default=None, help="also write the JSON to this file (e.g. RUN_DIR/summary.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(func=run)
    return p


def _parse_shape(text: str) -> tuple[int, ...]:
    from bidm.errors import BidmError

    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise BidmError(f"--input-shape must be B,C,H,W with positive integers, got {text!r}")
    return shape


def _parse_giga(text: str) -> float:
    from bidm.errors import BidmError

    try:
        return float(text) * 1e9
    except ValueError:
        raise BidmError(f"--paper-flops must be a number of G or 'none', got {text!r}") from None


def _from_config(args: argparse.Namespace):
    import torch

    from bidm.config import load_config
    from bidm.models import build_model

    cfg = load_config(args.config, args.overrides)
    if args.method is not None:
        cfg.binarize.method = args.method
    with torch.device("meta"):
        model = build_model(cfg)
    m = cfg.model
    res, chans = m.resolution, m.in_channels
    if m.arch == "diffusers":
        res = m.diffusers_config.get("sample_size", res)
        res = res if isinstance(res, int) else res[0]
        chans = m.diffusers_config.get("in_channels", chans)
    return model, (1, chans, res, res), None, cfg.binarize.method, args.config


def run(args: argparse.Namespace) -> int:
    from bidm.commands.common import check_outputs
    from bidm.profile import build_preset, summarize

    if args.out:
        check_outputs([args.out], [args.config], force=args.force)

    if args.config:
        model, shape, paper_flops, method, source = _from_config(args)
    else:
        source = args.preset or "ddim-cifar10"
        method = args.method or "bidm"
        model, preset = build_preset(source, method)
        shape, paper_flops = preset.input_shape, preset.paper_flops
    if args.input_shape:
        shape = _parse_shape(args.input_shape)
    if args.paper_flops is not None:
        paper_flops = None if args.paper_flops.lower() == "none" else _parse_giga(args.paper_flops)
    accounting = "paper" if args.paper_accounting else "measured"
    s = summarize(model, shape, accounting=accounting, paper_flops=paper_flops if args.paper_accounting else None)
    data = {"model": source, "method": method, "input_shape": list(shape), **s.to_dict(layers=not args.no_layers)}
    if args.out:
        from bidm.fileio import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(data, indent=2) + "\n")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"model: {source}   method: {method}   input: {'x'.join(map(str, shape))}")
        print(s.table(layers=not args.no_layers))
    return 0

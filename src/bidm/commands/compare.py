"""`bidm compare`: Table-1-style comparison of several evaluated runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from bidm.commands.common import add_force_arg, check_outputs, count
from bidm.errors import ConfigError

OUTPUTS = ("comparison.md", "comparison.csv", "comparison.json", "comparison.png", "samples.png")
RUN_INPUTS = ("metrics.json", "summary.json", "samples.npz")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="tables, figure and side-by-side samples for several runs",
        description="Read RUN_DIR/metrics.json (+ summary.json, + samples.npz) of each run and write "
        "comparison.{md,csv,json}, comparison.png (FID vs OPs/size) and samples.png. Instead of run directories, "
        "one YAML file may list them: `runs: [dir, {path: dir, label: name}, ...]` (optional `out: dir`).",
    )
    p.add_argument("runs", nargs="+", help="run directories, or one .yaml listing them")
    p.add_argument("--out", default=None, help="output directory (required unless the YAML gives `out`)")
    p.add_argument("--n-images", type=count, default=8, help="samples per run in samples.png")
    add_force_arg(p)
    p.set_defaults(func=run)
    return p


def read_runs_yaml(path: str | Path) -> tuple[list[str], list[str | None], str | None]:
    """(run dirs, labels, out) from a YAML file; relative paths are taken from the YAML's folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"runs file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    entries = spec.get("runs") if isinstance(spec, dict) else None
    if not entries:
        raise ConfigError(f"{path}: expected a `runs:` list of run directories or {{path, label}} entries")
    dirs, labels = [], []
    for entry in entries:
        entry = entry if isinstance(entry, dict) else {"path": entry}
        if "path" not in entry:
            raise ConfigError(f"{path}: run entry {entry} has no `path`")
        dirs.append(str(path.parent / entry["path"]))
        labels.append(entry.get("label"))
    out = spec.get("out")
    return dirs, labels, str(path.parent / out) if out else None


def run(args: argparse.Namespace) -> int:
    from bidm.evaluate import compare_runs

    dirs, labels, out, inputs = list(args.runs), None, None, []
    if len(dirs) == 1 and dirs[0].endswith((".yaml", ".yml")):
        inputs.append(dirs[0])
        dirs, labels, out = read_runs_yaml(dirs[0])
    out = args.out or out
    if not out:
        raise ConfigError("compare needs --out DIR (or `out:` in the YAML)")
    inputs += [Path(d) / name for d in dirs for name in RUN_INPUTS]
    check_outputs([Path(out) / name for name in OUTPUTS], inputs, force=args.force)
    result = compare_runs(dirs, out, labels=labels, n_images=args.n_images)
    print(Path(result["files"]["md"]).read_text())
    for kind, path in result["files"].items():
        print(f"wrote {kind}: {path}")
    return 0

"""Append the scored runs of a side study (an lr sweep, a validation seed) to a committed results file.

Each run directory must hold ``config.yaml``, ``checkpoint.safetensors`` and a ``metrics.json`` written by
``bidm evaluate``; its row takes the protocol row fields (commit of the checked-out code, config hash, machine,
sample counts) plus ``lr``, ``steps`` and ``train.seed`` from the run's config, so a sweep outlives the machine
like the protocol's own tables do:

    for lr in 5e-4 2e-3; do bidm binarize --teacher bench/teachers/cifar16 --method bidm \\
        --config configs/recipes/cpu_cifar16.yaml --set train.seed=100 --set train.steps=1000 \\
        --set train.lr=$lr --out runs/lrval/bidm_lr$lr
      bidm sample runs/lrval/bidm_lr$lr --n 2000 --steps 100 --eta 1 --seed 100
      bidm evaluate --samples runs/lrval/bidm_lr$lr/samples.npz --dataset cifar10 \\
        --data-path ../shared/data/cifar10 --features inception --n-ref 10000; done
    python bench/collect_runs.py runs/lrval/bidm_lr* --out bench/results/lr_validation_fid_cifar16.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

from bidm.config import load_config  # noqa: E402


def row_for(run_dir: Path, version: dict) -> dict:
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.json; score it with `bidm evaluate --samples {run_dir}/samples.npz`")
    m = json.loads(metrics_path.read_text())
    cfg = load_config(run_dir / "config.yaml")
    return {
        "run": run_dir.name,
        "method": cfg.binarize.method,
        "seed": cfg.train.seed,
        "lr": cfg.train.lr,
        "steps": cfg.train.steps,
        "n_samples": m["n_samples"],
        "n_ref": m["n_reference"],
        "feature_space": m["feature_space"],
        **{k: m[k] for k in ("fid", "sfid", "precision", "recall")},
        **version,
        "config_hash": P.config_hash(cfg),
        "machine": P.machine(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="", help="what the study is, stored in the file's protocol field")
    args = ap.parse_args(argv)
    version = P.code_version()
    rows = [row_for(d, version) for d in args.runs]
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"protocol": {"note": args.note}, "rows": []}
    keep = [r for r in data["rows"] if r["run"] not in {row["run"] for row in rows}]
    data["rows"] = keep + rows
    if args.note:
        data["protocol"]["note"] = args.note
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for r in rows:
        print(f"{r['run']}: lr {r['lr']:g}, {r['steps']} steps: FID {r['fid']:.1f}, recall {r['recall']:.2%}")
    print(f"wrote {args.out} ({len(data['rows'])} rows)")


if __name__ == "__main__":
    main()

"""Table 1 at CPU scale: every method of bidm.METHODS (plus the FP teacher) on CIFAR-10 at 16x16.

One fixed FP teacher (trained once with configs/cifar16_teacher.yaml, cached and reused), the same student budget,
batch, data order and x_T for every method, FID / sFID / Precision / Recall with the standard Inception features
(or the domain feature space with --quick). Every stage is cached in --out/<method>/, so the bench runs in parts
(``--methods xnor,bidm``), resumes after an interruption and merges everything present into one table.

    python bench/quality.py --quick                 # ~30 min: domain features, short budgets
    python bench/quality.py                         # hours: Inception features, 1000 samples per method
    python bench/quality.py --methods xnor,bidm     # a part; a later run without --methods merges all
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bidm import METHODS
from bidm.config import load_config
from bidm.evaluate import compare_runs
from bidm.pipeline import (
    ensure_metrics,
    ensure_samples,
    ensure_student,
    ensure_summary,
    ensure_teacher,
    student_config,
)

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=str(ROOT.parent / "shared/data/cifar10"), help="CIFAR-10 .npz dir/file")
    p.add_argument("--teacher", default="runs/cifar16_teacher", help="teacher run dir (trained here if missing)")
    p.add_argument("--teacher-config", default=str(ROOT / "configs/cifar16_teacher.yaml"))
    p.add_argument("--methods", default=None, help="comma-separated subset (default: fp32 + every method)")
    p.add_argument("--steps", type=int, default=None, help="student steps (default 1000; quick 150)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n-samples", type=int, default=None, help="samples per method (default 1000; quick 500)")
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (paper CIFAR: 0; the CPU-scale teacher needs 1)")
    p.add_argument("--features", default=None, help="inception | domain | inception,domain (quick: domain)")
    p.add_argument("--n-ref", type=int, default=None, help="reference images: a fixed random subset of the train "
                   "split (default all 50000; Inception features cost ~0.13 s/image here, cached once)")  # fmt: skip
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="default bench/out/quality[_quick]")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra student overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quick = args.quick
    steps = args.steps or (150 if quick else 1000)
    n = args.n_samples or (500 if quick else 1000)
    spaces = (args.features or ("domain" if quick else "inception,domain")).split(",")
    out = Path(args.out or ROOT / ("bench/out/quality_quick" if quick else "bench/out/quality"))
    methods = args.methods.split(",") if args.methods else ["fp32", *sorted(METHODS)]
    torch.set_num_threads(2)
    start = time.perf_counter()

    teacher_cfg = load_config(args.teacher_config, [f"out_dir={args.teacher}", f"data.path={args.data_path}"])
    teacher_dir = ensure_teacher(teacher_cfg)
    overrides = [
        f"train.steps={steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "train.log_every=25",
        "train.ckpt_every=50", f"data.path={args.data_path}", *args.overrides,
    ]  # fmt: skip
    for method in methods:
        t0 = time.perf_counter()
        run_dir = teacher_dir if method == "fp32" else out / method
        if method != "fp32":
            ensure_student(student_config(teacher_dir, method, run_dir, overrides))
        ensure_samples(run_dir, n=n, steps=args.sample_steps, eta=args.eta, clip_x0=True, batch_size=250)
        ensure_summary(run_dir)
        ensure_metrics(run_dir, teacher_cfg, feature_spaces={s: n for s in spaces}, n_ref=args.n_ref)
        print(f"{method}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    # merge every method present under --out (earlier partial runs included) with the teacher
    present = [p for p in sorted(out.iterdir()) if (p / "metrics.json").is_file()] if out.is_dir() else []
    runs = {"fp32": teacher_dir, **{p.name: p for p in present}}
    report = compare_runs(list(runs.values()), out, labels=list(runs))
    header = (
        f"CIFAR-10 16x16 (JPEG-origin copy, see shared/docs/data.md), teacher {teacher_cfg.train.steps} steps; "
        f"every student {steps} steps, batch {args.batch_size}, lr {args.lr}, same data order and x_T; "
        f"{n} samples, DDIM {args.sample_steps} steps (eta {args.eta}, x0 clipped); features: {', '.join(spaces)}\n\n"
    )
    table = header + (out / "comparison.md").read_text()
    (out / "table.md").write_text(table)
    meta = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads", "seconds": round(time.perf_counter() - start)}  # fmt: skip
    (out / "bench.json").write_text(json.dumps({**meta, "rows": report["rows"]}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

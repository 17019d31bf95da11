"""Table 1 at CPU scale, protocol v3 (bench/protocol.py): fp32 + every method of bidm.METHODS, Inception metrics.

The FP teacher (configs/cifar16_teacher.yaml) is trained once and reused; every student uses
configs/recipes/cpu_cifar16.yaml with the same budget, data order and x_T for a given seed; 2000 samples per model are
scored against 10,000 reference images. Each finished model appends its rows to the protocol's committed file (v3:
bench/results/quality_v3_cifar16.json; v2, the lr-5e-4 table: quality_cifar16.json) and the table is re-rendered into
bench/RESULTS.md. Stages are cached per run directory, so the bench runs in parts, resumes after an interruption and
merges with the rows that are already committed.

    python bench/quality.py                                  # everything the protocol asks (hours on 2 cores)
    python bench/quality.py --methods xnor,bidm --seeds 0    # a part
    python bench/quality.py --protocol v2 --methods bidm     # protocol v2 (lr 5e-4) into its own file
    python bench/quality.py --render                         # re-render bench/RESULTS.md from the JSON only
    python bench/quality.py --data-path other.npz --dataset-name other --results bench/results/quality_other.json

Seeds: xnor, bidm and the best baseline (``--best-baseline``, bbcu as measured) get 3 (0, 1, 2), the others 1 (0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402
import render_results  # noqa: E402

from bidm import METHODS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=str(P.ROOT.parent / "shared/data/cifar10"),
                   help="a .npz of uint8 images or a dir with train.npz (default: shared CIFAR-10)")  # fmt: skip
    p.add_argument("--dataset-name", default=None, help="label of a non-CIFAR dataset (uses data.name=npz)")
    p.add_argument("--teacher", default="bench/teachers/cifar16", help="teacher run (committed; else trained)")
    p.add_argument("--methods", default=None, help="comma-separated subset of fp32 + METHODS (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the protocol's per method)")
    p.add_argument("--protocol", default="v3", help="v3 (default: the recipe's validated lr 2e-3) or v2 (lr 5e-4)")
    p.add_argument("--best-baseline", default="bbcu", help="the baseline that gets 3 seeds (bbcu: the measured best)")
    p.add_argument("--out", default=None, help="run directories (default: the protocol's, bench/out/quality_v3)")
    p.add_argument("--results", default=None, help="committed results file (default: the protocol's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra student overrides")
    p.add_argument("--render", action="store_true", help="only re-render bench/RESULTS.md")
    p.add_argument("--train-only", action="store_true", help="train the students, score nothing (run it again)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the CPU)")
    return p.parse_args(argv)


def seeds_for(method: str, args) -> list[int]:
    if args.seeds:
        return [int(s) for s in args.seeds.split(",")]
    return [0, 1, 2] if method in ("xnor", "bidm", args.best_baseline) else [0]


def main(argv=None) -> int:
    args = parse_args(argv)
    proto = P.get_protocol(args.protocol)
    results = Path(args.results or P.RESULTS / f"{proto['results']}.json")
    P.check_results_file(results, proto)
    if args.render:
        render_results.main([])
        return 0
    torch.set_num_threads(args.threads)
    data_override = ["data.name=npz"] if args.dataset_name else []
    teacher_cfg = P.teacher_config(args.data_path, args.teacher, extra=data_override)
    methods = args.methods.split(",") if args.methods else ["fp32", *sorted(METHODS)]
    out = Path(args.out or proto["out"])
    n, n_ref, steps, eta = (proto[k] for k in ("n_samples", "n_ref", "sample_steps", "eta"))
    version = P.code_version()  # the code this process runs (modules are loaded now)
    for method in methods:
        for seed in [0] if method == "fp32" else seeds_for(method, args):
            t0 = time.perf_counter()
            if method == "fp32":
                run_dir, train_s = P.ensure_teacher(teacher_cfg), None
            else:
                cfg = P.student(Path(args.teacher), method, seed, out / f"{method}_s{seed}", args.data_path,
                                [*data_override, *args.overrides], protocol=proto)  # fmt: skip
                run_dir, train_s = P.train_student(cfg)
                if args.train_only:
                    print(f"{method} seed {seed}: trained ({time.perf_counter() - t0:.0f} s)", flush=True)
                    continue
            result = P.evaluate_run(run_dir, teacher_cfg, n=n, n_ref=n_ref, steps=steps, eta=eta, seed=seed)
            label = {"method": method, "variant": None, "seed": seed, "dataset": args.dataset_name or "cifar10"}
            P.add_rows(results, P.rows_for(label, run_dir, version, result, train_s=train_s), protocol=proto)
            inc = result["metrics"]["by_space"]["inception"]
            print(f"{method} seed {seed}: FID {inc['fid']:.2f} recall {inc['recall']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if args.train_only:
        return 0
    if results.resolve().parent == P.RESULTS.resolve() and results.stem in render_results.SECTIONS:
        render_results.main([])  # a committed file with its own RESULTS.md section (Table 1, budget, lr, ...)
    else:
        print(P.render_markdown(P.load_results(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

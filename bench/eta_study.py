"""Re-score trained protocol-v2 models with another DDIM eta (the paper samples CIFAR-10 with eta = 0; protocol v2
uses eta = 1), without retraining: each model's checkpoint is linked into a view directory under ``--out`` and
sampled there, so the protocol's own samples and metrics in the run directory stay untouched.

    python bench/eta_study.py --eta 0 --seed 2 fp32=bench/teachers/cifar16 \\
        bidm=bench/out/quality_v2/bidm_s2 bbcu=bench/out/quality_v2/bbcu_s2 xnor=bench/out/quality_v2/xnor_s2

Every other protocol setting is kept (2000 samples, DDIM 100 steps, x0 clipped, Inception against 10,000 training
images). ``--seed`` sets the x_T of every model (use the seed the students were trained with, so the teacher shares
their x_T). Rows go to ``bench/results/eta0_cifar16.json`` (for ``--eta 0``) with the protocol's eta recorded, and
the table is rendered into bench/RESULTS.md. A row's ``commit`` is the code that sampled and scored it; the model's
own training commit is in the run's quality / ablation row (same ``config_hash``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402
import render_results  # noqa: E402

from bidm import checkpoint  # noqa: E402


def view(run_dir: Path, out: Path) -> Path:
    """A directory holding only links to ``run_dir``'s checkpoint and config.yaml (the scorer reads the training
    resolution from it): samples and metrics land there."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / checkpoint.CKPT_NAME
    target = checkpoint.resolve(run_dir).resolve()
    if link.is_symlink() and link.resolve() != target:
        link.unlink()  # re-pointed at another run: the old samples no longer describe it
        for stale in ("config.yaml", "samples.npz", "samples.json", "metrics.json", "metrics.stamp.json",
                      "summary.json"):  # fmt: skip
            (out / stale).unlink(missing_ok=True)
    if not link.exists():
        os.symlink(target, link)
    config = target.parent / "config.yaml"
    if config.is_file() and not (out / "config.yaml").exists():
        os.symlink(config, out / "config.yaml")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR (NAME is the row's method label)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, required=True, help="x_T seed for every model")
    p.add_argument("--data-path", default=str(P.ROOT.parent / "shared/data/cifar10"))
    p.add_argument("--teacher", default="bench/teachers/cifar16")
    p.add_argument("--out", default="bench/out/eta_study")
    p.add_argument("--results", default=None, help="default: bench/results/eta{ETA}_cifar16.json")
    p.add_argument("--protocol", default="v2", help="the protocol the runs were trained under (default v2, the "
                   "committed eta-0 rows' runs)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = [spec.split("=", 1) for spec in args.runs]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit("each run is NAME=RUN_DIR")
    tag = f"eta{args.eta:g}"
    results = Path(args.results or P.RESULTS / f"{tag}_cifar16.json")
    base = P.get_protocol(args.protocol)
    protocol = {**base, "name": f"{base['name']}-{tag}", "eta": args.eta}
    P.check_results_file(results, protocol)
    teacher_cfg = P.teacher_config(args.data_path, args.teacher)
    version = P.code_version()
    for name, run in pairs:
        t0 = time.perf_counter()
        run_dir = view(Path(run), Path(args.out) / tag / f"{name}_s{args.seed}")
        result = P.evaluate_run(run_dir, teacher_cfg, n=protocol["n_samples"], n_ref=protocol["n_ref"],
                                steps=protocol["sample_steps"], eta=args.eta, seed=args.seed)  # fmt: skip
        label = {"method": name, "variant": None, "seed": args.seed, "dataset": "cifar10", "source_run": str(run)}
        P.add_rows(results, P.rows_for(label, run_dir, version, result, train_s=None), protocol=protocol)
        inc = result["metrics"]["by_space"]["inception"]
        print(f"{name} ({run}) eta {args.eta:g}: FID {inc['fid']:.2f} recall {inc['recall']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    render_results.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())

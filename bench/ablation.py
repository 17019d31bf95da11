"""The paper's BiDM ablation (Tables 3, 5, 7) on protocol v3 (bench/protocol.py; ``--protocol v2``), at CPU scale.

Every variant is the ``bidm`` method under configs/recipes/cpu_cifar16.yaml with some components switched off:

    vanilla   BiDM's layer with k frozen at 1/(kh*kw) and no k bias (XNOR's box filter), no TBS, no SPD
    +k        learnable k (with its bias, as the official code)
    +k+tbs    + the cross-timestep connection (TBS complete)
    bidm      + SPD (= BiDM)
    bidm-l2   BiDM with plain L2 feature distillation instead of SPD (Table 7)
    bidm-none = +k+tbs (no feature loss; listed once)
    bidm-official-tbs  BiDM with the official TBS training cache (t+1, same eps) and the paper's alpha init 0.3
                       on every output block, instead of the recipe's eta=1-matched cache (bidm's improvement)
    bidm+kd   BiDM plus output distillation to the teacher's eps, weight 1 (``binarize.output_kd=1``, as the
              reactnet and efficientdm recipes); not in the paper, whose BiDM trains against the true noise only
    bidm+bias BiDM keeping the teacher's FP bias in every binary layer (``binarize.options.bias=true``); the
              official binary mode drops it, so no binary layer can add a per-channel offset
    bidm+bias+kd  both improvement candidates together
    bidm-ldm-shortcut  the shortcut scale of the paper / LDM code (|s|, init 0.3) instead of the CIFAR code's (s, 0)
    bidm+res1 the shortcut scale starting at 1 (a unit FP residual around every binary conv, as BBCU's)

Rows go to the protocol's file (v3: bench/results/ablation_v3_cifar16.json, v2: ablation_cifar16.json; field
``variant``) and bench/RESULTS.md. Seeds: 3 for vanilla and
bidm, 1 for the rest. Runs in parts with ``--variants`` / ``--seeds``; the full ``bidm`` variant's run directory
is shared with bench/quality.py (same config), so it is trained once.

    python bench/ablation.py --variants vanilla,bidm --seeds 0
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

VARIANTS = {
    "vanilla": ["binarize.options.learnable_k=false", "binarize.options.k_bias=false", "binarize.tbs=false",
                "binarize.feature_loss=none"],
    "+k": ["binarize.tbs=false", "binarize.feature_loss=none"],
    "+k+tbs": ["binarize.feature_loss=none"],
    "bidm": [],
    "bidm-l2": ["binarize.feature_loss=l2"],
    # the official TBS on this protocol: cache from t+1 with the same eps, alpha init 0.3 (paper), 8 blocks
    "bidm-official-tbs": ["binarize.train_cache=t+1", "binarize.train_cache_noise=same", "binarize.tbs_alpha_init=0.3",
                          "binarize.tbs_blocks=6"],
    "bidm+kd": ["binarize.output_kd=1.0"],
    # improvement candidate: keep the teacher's FP bias in every binary layer (the official binary mode drops it,
    # so no binary layer can add a per-channel offset; every baseline but xnor keeps it)
    "bidm+bias": ["binarize.options.bias=true"],
    "bidm+bias+kd": ["binarize.options.bias=true", "binarize.output_kd=1.0"],
    # the shortcut around every binary conv: the paper / LDM code's |s| from 0.3, and a unit residual as BBCU's
    "bidm-ldm-shortcut": ["binarize.options.shortcut_scale_init=0.3", "binarize.options.shortcut_abs=true"],
    "bidm+res1": ["binarize.options.shortcut_scale_init=1.0"],
    # the SPD : L_simple balance. The recipe's L_simple is an element mean; the official CIFAR code sums it over the
    # 3*16*16 = 768 pixels with the same lambda 1e-2, which is lambda 1e-2 / 768 = 1.3e-5 against an element mean.
    "bidm-spd-cifar-balance": ["binarize.spd_lambda=1.3e-5"],
    "bidm-spd1e-3": ["binarize.spd_lambda=1e-3"],
    "bidm-spd3e-2": ["binarize.spd_lambda=3e-2"],  # the paper's CIFAR-10 value (App. A)
    "bidm-spd3e-2+kd": ["binarize.spd_lambda=3e-2", "binarize.output_kd=1.0"],
}  # fmt: skip
THREE_SEEDS = ("vanilla", "bidm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=str(P.ROOT.parent / "shared/data/cifar10"))
    p.add_argument("--teacher", default="bench/teachers/cifar16", help="teacher run dir (committed)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default=None, help="default: 0,1,2 for vanilla and bidm, 0 for the rest")
    p.add_argument("--protocol", default="v3", help="v3 (default, lr 2e-3) or v2 (lr 5e-4)")
    p.add_argument("--out", default=None, help="run directories (default: the protocol's, shared with quality.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--results", default=None, help="results file (default: the protocol's; rows are merged in)")
    p.add_argument("--train-only", action="store_true", help="train the variants, score nothing")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the CPU)")
    args = p.parse_args(argv)
    proto = P.get_protocol(args.protocol)
    results = Path(args.results or P.RESULTS / f"{proto['ablation_results']}.json")
    P.check_results_file(results, proto)
    version = P.code_version()  # the code this process runs
    torch.set_num_threads(args.threads)
    teacher_dir, teacher_cfg = P.run_teacher(args.data_path, args.teacher)
    n, n_ref, steps, eta = (proto[k] for k in ("n_samples", "n_ref", "sample_steps", "eta"))
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0, 1, 2] if variant in THREE_SEEDS else [0]
        for seed in seeds:
            t0 = time.perf_counter()
            name = "bidm" if variant == "bidm" else f"ablation_{variant.replace('+', 'p')}"
            cfg = P.student(teacher_dir, "bidm", seed, Path(args.out or proto["out"]) / f"{name}_s{seed}",
                            args.data_path, [*VARIANTS[variant], *args.overrides], protocol=proto)  # fmt: skip
            run_dir, train_s = P.train_student(cfg)
            if args.train_only:
                continue
            result = P.evaluate_run(run_dir, teacher_cfg, n=n, n_ref=n_ref, steps=steps, eta=eta, seed=seed)
            label = {"method": "bidm", "variant": variant, "seed": seed, "dataset": "cifar10"}
            P.add_rows(results, P.rows_for(label, run_dir, version, result, train_s=train_s), protocol=proto)
            print(f"{variant} seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.train_only:
        render_results.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`bidm analyze`: the paper's observations (activation ranges, cross-step similarity, SPD vs L2, eps error per t,
binarization diagnostics) measured on a run, as figures + JSON + index.md."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze",
        help="figures of the BiDM observations for a teacher or student run",
        description="Run the model (and, for a student, its teacher) along DDIM trajectories from one fixed x_T and "
        "write PNG figures, analysis.json (every number) and index.md (all figures on one page) into --out. "
        "A student gets Obs. 1a/1b, Obs. 2 (L2 vs SPD, training log), eps error per timestep and binarization "
        "diagnostics; an FP run alone gets Obs. 1a/1b.",
    )
    p.add_argument("--ckpt", required=True, help="run directory (or checkpoint file) of a teacher or student")
    p.add_argument("--teacher", default=None, help="FP teacher of a student (default: the run's binarize.teacher)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=16, help="trajectory batch size (default 16)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's sample.steps)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's sample.eta)")
    p.add_argument("--seed", type=int, default=0, help="seed of x_T and of the sampler noise")
    p.add_argument("--sim-batch", type=int, default=8,
                   help="samples kept per output block for the similarity matrices (memory: steps x sim-batch x "
                        "block size floats per block; lower it for large models)")  # fmt: skip
    p.add_argument("--n-eps", type=int, default=64, help="training images for the eps error on q_sample inputs")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from bidm.analyze import analyze_run

    result = analyze_run(
        args.ckpt,
        args.out,
        teacher=args.teacher,
        n=args.n,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        sim_batch=args.sim_batch,
        n_eps=args.n_eps,
    )
    for path in result["files"]["figures"]:
        print(f"wrote figure: {path}")
    print(f"wrote {result['files']['json']}\nwrote {result['files']['index']}")
    print(f"({result['settings']['seconds']:.0f} s)")
    return 0

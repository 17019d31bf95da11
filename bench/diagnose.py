"""Per-timestep epsilon error of binary students against their FP teacher (bidm.analysis), as one table.

Each student is a trained run directory (``DIR+alpha0``: a TBS student with its mix switched off;
``DIR+unmixed``: its sampler carrying the pre-mix outputs, ``binarize.tbs_sample_cache=unmixed``), or
``init:METHOD[,key=value...]`` for a freshly binarized copy of the
teacher (step 0, the start of QAT; ``key=value`` are config overrides such as ``binarize.options.k_bias=false``).

    python bench/diagnose.py --teacher runs/cifar16_teacher runs/v/xnor runs/v/bidm init:xnor init:bidm

Columns: mean MSE(student eps, teacher eps) over the DDIM steps of each t range on the teacher's trajectory
("traj"), and on the training distribution (q_sample of real images, "train"; the TBS cache from t + T/steps).
A second table splits the trajectory error per t range into its colour part (MSE of the per-image, per-channel
means: what shifts a whole image's colour) and the gain <student eps, teacher eps> / |teacher eps|^2 (below 1: the
student shrinks its eps, so the x0 prediction keeps noise, which clipping turns into saturated pixels).
``--blocks`` adds a third table: each UNet block's output MSE against the teacher's on the same trajectory
(`bidm.observe.feature_distances`), for t < 100 and over all steps, per student (the first student's value, then
every other student's as a ratio to it): where in the network one student's features drift from the teacher's
more than another's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bidm import checkpoint
from bidm.analysis import bucket_means, eps_error_by_timestep, trajectory_eps_error
from bidm.config import from_dict
from bidm.data import load_training_images
from bidm.diffusion import initial_noise
from bidm.models import load_model, load_teacher, student_from_teacher
from bidm.observe import feature_distances
from bidm.pipeline import student_config
from bidm.train import schedule


def build(spec: str, teacher_dir: Path, teacher):
    if spec.endswith("+alpha0"):  # a trained TBS student sampled with its mix switched off (alpha = 0)
        model, cfg = load_model(spec[: -len("+alpha0")])
        with torch.no_grad():
            model.alpha.zero_()
        return model, cfg
    if spec.endswith("+unmixed"):  # a trained TBS student whose sampler carries the pre-mix outputs
        model, cfg = load_model(spec[: -len("+unmixed")])
        model.sample_cache = "unmixed"
        return model, cfg
    if not spec.startswith("init:"):
        return load_model(spec)
    method, *overrides = spec[len("init:") :].split(",")
    cfg = student_config(teacher_dir, method, Path("/tmp/unused"), overrides)
    torch.manual_seed(cfg.train.seed)
    return student_from_teacher(teacher, cfg).eval(), cfg


def block_table(results: dict) -> str:
    """Per block: the first student's feature MSE at t < 100 and over all steps, the others' as ratios to it."""
    specs = list(results)
    first = results[specs[0]]["blocks"]

    def means(rows: dict) -> tuple[float, float]:
        small = [v for t, v in zip(rows["t"], rows["l2"]) if t < 100]
        return sum(small) / max(len(small), 1), sum(rows["l2"]) / len(rows["l2"])

    head = f"| block | {specs[0]} t<100 | all |" + "".join(f" {s} / first, t<100 | all |" for s in specs[1:])
    lines = ["\n" + head, "|---" * (3 + 2 * (len(specs) - 1)) + "|"]
    for block in first:
        small0, all0 = means(first[block])
        cells = [f"{small0:.4g}", f"{all0:.4g}"]
        for spec in specs[1:]:
            small, every = means(results[spec]["blocks"][block])
            cells += [f"{small / small0:.2f}" if small0 else "–", f"{every / all0:.2f}" if all0 else "–"]
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+")
    p.add_argument("--teacher", required=True)
    p.add_argument("--n", type=int, default=128, help="batch of images / x_T")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the trajectory")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--traj-only", action="store_true", help="skip the training-distribution columns (faster)")
    p.add_argument("--blocks", action="store_true", help="also the per-block feature error table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for every row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_dir = Path(args.teacher)
    teacher_cfg = from_dict(checkpoint.load(teacher_dir).config)
    teacher, _ = load_teacher(teacher_dir, teacher_cfg.model)
    acp = schedule(teacher_cfg)
    x0 = load_training_images(teacher_cfg)[: args.n]  # fixed seeded shuffle of the teacher's data
    shape = (teacher_cfg.model.in_channels, teacher_cfg.model.resolution, teacher_cfg.model.resolution)
    x_T = initial_noise(args.n, shape, seed=123)
    t_train = list(range(5, 1000, 50))
    results = {}
    for spec in args.students:
        model, cfg = build(spec, teacher_dir, teacher)
        traj = trajectory_eps_error(model, teacher, x_T, acp, steps=args.steps, eta=args.eta, clip_x0=True)
        train = (
            []
            if args.traj_only
            else eps_error_by_timestep(model, teacher, x0, acp, t_train, cache_offset=1000 // args.steps)
        )
        results[spec] = {"trajectory": traj, "train": train}
        if args.blocks:
            fd = feature_distances(model, teacher, x_T, acp, steps=args.steps, eta=args.eta, clip_x0=True)
            results[spec]["blocks"] = {b: {"t": fd["t"], "l2": fd["l2"][b]} for b in fd["blocks"]}
    edges = (0, 100, 300, 600, 1000)
    names = [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
    print("| student | " + " | ".join(f"traj {n}" for n in names) + " | traj all | train all | train vs true |")
    print("|---" * (len(names) + 4) + "|")
    for spec, r in results.items():
        b = bucket_means(r["trajectory"], "student_vs_teacher", edges)
        traj_all = sum(x["student_vs_teacher"] for x in r["trajectory"]) / len(r["trajectory"])
        n_train = len(r["train"])
        train_all = f"{sum(x['student_vs_teacher'] for x in r['train']) / n_train:.4f}" if n_train else "–"
        true_all = f"{sum(x['student_vs_true'] for x in r['train']) / n_train:.4f}" if n_train else "–"
        cells = " | ".join(f"{b[n]:.4f}" for n in names)
        print(f"| {spec} | {cells} | {traj_all:.4f} | {train_all} | {true_all} |")
    print(
        "\n| student | "
        + " | ".join(f"colour {n}" for n in names)
        + " | "
        + " | ".join(f"gain {n}" for n in names)
        + " |"
    )
    print("|---" * (2 * len(names) + 1) + "|")
    for spec, r in results.items():
        colour = bucket_means(r["trajectory"], "colour_error", edges)
        gain = bucket_means(r["trajectory"], "gain", edges)
        cells = [f"{colour[n]:.2e}" for n in names] + [f"{gain[n]:.3f}" for n in names]
        print(f"| {spec} | " + " | ".join(cells) + " |")
    if args.blocks:
        print(block_table(results))
    if not args.traj_only:
        floor = sum(x["teacher_vs_true"] for x in next(iter(results.values()))["train"]) / len(t_train)
        print(f"teacher vs true eps (train distribution): {floor:.4f}")
    if args.out:  # students already in the file are kept unless measured again
        out = Path(args.out)
        old = json.loads(out.read_text()).get("students", {}) if out.exists() else {}
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import protocol

        data = {"tool": "bench/diagnose.py", "command": "python bench/diagnose.py " + " ".join(argv or sys.argv[1:]),
                **protocol.code_version(), "eta": args.eta, "n": args.n, "steps": args.steps,
                "students": {**old, **results}}  # fmt: skip
        out.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

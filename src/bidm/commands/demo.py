"""`bidm demo`: the main job on the built-in default, offline on CPU in minutes.

Trains (or reuses) a tiny FP teacher on scikit-learn digits at 16x16, binarizes it with XNOR and BiDM under the
same budget, samples every model from the same x_T, scores them in the domain feature space (and with the standard
Inception network on a small sample when --inception N is given), and writes report.md, report.json and the sample
grids into --out.
"""

from __future__ import annotations

from bidm.commands.common import add_force_arg, check_outputs, count, nonnegative, nonnegative_int

# The built-in default: a ~0.3 M-parameter UNet on 16x16 digits. Budgets are set for 2 CPU cores.
DEMO_TEACHER = [
    "data.name=digits",
    "data.size=16",
    "data.channels=1",
    "model.ch=32",
    "model.ch_mult=[1, 2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[8]",
    "model.dropout=0.0",
    "model.in_channels=1",
    "model.out_ch=1",
    "model.resolution=16",
    "train.batch_size=64",
    "train.lr=1e-3",
    "train.log_every=25",
    "train.ckpt_every=200",
    "sample.steps=50",
    "sample.clip_x0=true",
    "sample.eta=1.0",
]
DEMO_STUDENT = [  # the BiDM settings of configs/recipes/cpu_cifar16.yaml (docs/FIDELITY.md says why)
    "binarize.method_options.bidm.shortcut_scale_init=0.0",  # the official CIFAR (DDIM UNet) shortcut: s init 0
    "binarize.method_options.bidm.shortcut_abs=false",
    "binarize.tbs_blocks=2",
    "binarize.tbs_alpha_init=0.0",
    "binarize.train_cache=sampler",  # the TBS training cache at the sampler's stride, drawn as an eta=1 sampler
    "binarize.train_cache_noise=forward",
    "train.batch_size=32",
    "train.lr=2e-3",  # the recipe's lr, chosen on a validation seed of the CIFAR-10 bench (docs/FIDELITY.md)
    "train.log_every=10",
    "train.ckpt_every=100",
]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on digits (offline, CPU, minutes)", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--methods", default="xnor,bidm", help="comma-separated methods (default xnor,bidm)")
    p.add_argument("--teacher-steps", type=count, default=600)
    p.add_argument("--student-steps", type=count, default=300)
    p.add_argument("--n-samples", type=count, default=500, help="samples per model for the domain metrics")
    p.add_argument("--sample-steps", type=count, default=50, help="DDIM steps")
    p.add_argument("--eta", type=nonnegative, default=1.0, help="DDIM eta (1.0: tiny CPU models sample far better)")
    p.add_argument("--inception", type=nonnegative_int, default=0, metavar="N",
                   help="also score N samples with the standard Inception network (~0.2 s/image on CPU)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="student seed: new parameters, data order and x_T")
    p.add_argument("--spread", default=None, help="committed seed-spread file (default bench/results/demo_seeds.json "
                   "next to the working directory, if present)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra overrides for the teacher and students, e.g. --set train.seed=1")  # fmt: skip
    add_force_arg(p)
    p.set_defaults(func=main)


REPORTS = ("report.md", "report.json", "comparison.md", "comparison.csv", "comparison.json", "comparison.png",
           "samples.png")  # fmt: skip


def demo_outputs(out, methods: list[str]) -> list:
    """The files the demo's last stages write (earlier stages are cached run directories it reuses)."""
    return [out / name for name in REPORTS] + [out / m / "packed.safetensors" for m in methods]


def main(args) -> int:
    import json
    import time
    from pathlib import Path

    from bidm.config import load_config
    from bidm.errors import ConfigError
    from bidm.evaluate import compare_runs
    from bidm.fileio import atomic_write_text
    from bidm.pipeline import (
        ensure_metrics,
        ensure_samples,
        ensure_student,
        ensure_summary,
        ensure_teacher,
        student_config,
    )

    out = Path(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from bidm.binarize import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError(f"--methods: unknown {unknown or 'empty list'}; choose from {sorted(METHODS)}")
    if args.n_samples < 2:
        raise ConfigError(f"--n-samples must be >= 2 (FID needs a covariance), got {args.n_samples}")
    check_outputs(demo_outputs(out, methods), force=args.force)
    start = time.perf_counter()
    teacher_cfg = load_config(
        None, DEMO_TEACHER + args.overrides + [f"train.steps={args.teacher_steps}", f"out_dir={out / 'fp32'}"]
    )
    print(f"[1/5] FP teacher -> {teacher_cfg.out_dir}")
    teacher_dir = ensure_teacher(teacher_cfg)
    runs = {"fp32": teacher_dir}
    for i, method in enumerate(methods):
        print(f"[2/5] binarize + train {method} ({i + 1}/{len(methods)}), {args.student_steps} steps")
        overrides = DEMO_STUDENT + args.overrides + [f"train.steps={args.student_steps}", f"train.seed={args.seed}"]
        runs[method] = ensure_student(student_config(teacher_dir, method, out / method, overrides))
    print(f"[3/5] sampling {args.n_samples} images per model from the same x_T")
    spaces = {"domain": args.n_samples}
    if args.inception:
        spaces["inception"] = min(args.inception, args.n_samples)
    for run_dir in runs.values():
        seed = 0 if run_dir == teacher_dir else args.seed
        ensure_samples(
            run_dir, n=args.n_samples, steps=args.sample_steps, eta=args.eta, clip_x0=True, seed=seed, batch_size=250
        )
        ensure_summary(run_dir)
    print(f"[4/5] scoring ({', '.join(spaces)}) and writing the report")
    for run_dir in runs.values():
        ensure_metrics(run_dir, teacher_cfg, feature_spaces=spaces)
    report = compare_runs(list(runs.values()), out, labels=list(runs))
    spread = load_spread(args.spread, settings(args))
    ranking = ranking_sentence(report["rows"], spread)
    md = ranking + "\n\n" + (out / "comparison.md").read_text() + _export_section(runs, methods)
    header = (
        f"# bidm demo: digits 16x16, teacher {args.teacher_steps} steps, every student {args.student_steps} steps "
        f"(batch 32, same data order), {args.n_samples} samples, DDIM {args.sample_steps} steps (eta {args.eta}, "
        "x0 clipped), same x_T\n\n"
    )
    atomic_write_text(out / "report.md", header + md)
    report_json = {"settings": settings(args), "ranking": ranking, "rows": report["rows"], "files": report["files"]}
    atomic_write_text(out / "report.json", json.dumps(report_json, indent=2))
    print(header + md)
    print(f"report: {out / 'report.md'}  ({time.perf_counter() - start:.0f} s)")
    return 0


def settings(args) -> dict:
    """What decides the demo's numbers (a committed seed spread applies only to the same settings)."""
    return {
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "n_samples": args.n_samples,
        "sample_steps": args.sample_steps,
        "eta": args.eta,
        "methods": args.methods,
        "overrides": list(args.overrides),
        "student": DEMO_STUDENT,
    }


def load_spread(path, current: dict) -> dict | None:
    """Per-method domain-FID seed spread {method: [fid, ...]} from a `bench/demo_seeds.py` file whose settings
    equal ``current`` (None when there is no such file or it was measured with other settings)."""
    import json
    from pathlib import Path

    path = Path(path) if path else Path("bench/results/demo_seeds.json")
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("settings") != current:
        return None
    out: dict = {"file": str(path), "commit": data.get("commit"), "fid": {}, "by_seed": {}}
    for row in data["rows"]:
        out["fid"].setdefault(row["method"], []).append(row["fid"])
        if "seed" in row:
            out["by_seed"].setdefault(row["method"], {})[row["seed"]] = row["fid"]
    return out


def ranking_sentence(rows: list[dict], spread: dict | None) -> str:
    """One sentence: which binary method won (domain FID, lower is better), by how much, against the seed spread."""
    fids = {r["method"]: r["fid"] for r in rows if r["feature_space"] == "domain" and r["fid"] is not None}
    binary = sorted((fid, m) for m, fid in fids.items() if m != "fp32")
    if len(binary) < 2:
        return "Only one binary method was run: no ranking."
    (best_fid, best), (second_fid, second) = binary[0], binary[1]
    text = (
        f"**{best}** has the best domain FID of the binary students: {best_fid:.2f} against {second_fid:.2f} for "
        f"{second} ({best_fid - second_fid:+.2f}, ratio {best_fid / second_fid:.2f})"
    )
    from bidm.metrics import mean_std

    runs = [spread["fid"].get(m, []) for m in (best, second)] if spread else []
    stds = [mean_std(fids)[1] for fids in runs if len(fids) >= 2]
    if not stds:
        return text + "; no seed spread has been measured for these settings (`python bench/demo_seeds.py`)."
    sd = max(stds)
    verdict = "larger than" if second_fid - best_fid > 2 * sd else "within"
    n = min(len(spread["fid"].get(m, [])) for m in (best, second))
    text += (
        f"; the seed std of this setting is {sd:.2f} ({n} seeds, `{spread['file']}`), so the gap is "
        f"{verdict} twice the seed spread."
    )
    seeds = {m: spread.get("by_seed", {}).get(m, {}) for m in (best, second)}
    common = sorted(set(seeds[best]) & set(seeds[second]))
    if len(common) >= 2:  # the committed seeds themselves: means, and how often this run's winner won
        (mb, sb), (ms, ss) = (mean_std([seeds[m][k] for k in common]) for m in (best, second))
        wins = sum(seeds[best][k] < seeds[second][k] for k in common)
        text += (
            f" Over those seeds {best} scores {mb:.2f} ± {sb:.2f} against {ms:.2f} ± {ss:.2f} and is lower on "
            f"{wins} of {len(common)}."
        )
    return text


def _export_section(runs: dict, methods: list[str]) -> str:
    """[5/5] Pack every student into a bit-packed file and report its real size and parity."""
    import torch

    from bidm.config import to_dict
    from bidm.export import export_model
    from bidm.models import load_model

    print("[5/5] packed export (1-bit weights in int64 words, XNOR-popcount kernel)")
    lines = [
        "",
        "Packed export (`bidm export`): real file size, and the packed model's output vs the fake-binary one",
        "",
        "| Method | packed file (MiB) | FP32 weights (MiB) | smaller by | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        model, cfg = load_model(runs[method])
        r, c = cfg.model.resolution, cfg.model.in_channels
        example = (torch.randn(2, c, r, r, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500]))
        rep = export_model(model, runs[method] / "packed.safetensors", to_dict(cfg), example=example)
        lines.append(
            f"| {method} | {rep['file_bytes'] / 2**20:.3f} | {rep['fp32_bytes'] / 2**20:.3f} | "
            f"{rep['compression_vs_fp32']:.1f}x | {rep['max_abs_diff']:.2g} |"
        )
    return "\n".join(lines) + "\n"

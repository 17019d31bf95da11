"""Cached end-to-end stages (teacher -> students -> samples -> metrics -> table), shared by `bidm demo` and
`bench/quality.py`. Each stage writes into a run directory and is skipped when its output is already there for the
same settings, so a long comparison can run in parts, be interrupted and resumed, and be merged into one table.
"""

from __future__ import annotations

import json
from pathlib import Path

from bidm import checkpoint
from bidm.config import Config, load_config


def _done(run_dir: Path, steps: int) -> bool:
    path = run_dir / checkpoint.CKPT_NAME
    return path.is_file() and checkpoint.load(path).step >= steps


def ensure_teacher(cfg: Config) -> Path:
    """Train (or resume, or reuse) the FP teacher of ``cfg`` in ``cfg.out_dir``."""
    from bidm.train import train_teacher

    run_dir = Path(cfg.out_dir)
    if not _done(run_dir, cfg.train.steps):
        train_teacher(cfg, resume=True)
    return run_dir


def ensure_student(cfg: Config) -> Path:
    """Train (or resume, or reuse) the binarized student of ``cfg`` in ``cfg.out_dir``."""
    from bidm.qat import train_student

    run_dir = Path(cfg.out_dir)
    if not _done(run_dir, cfg.train.steps):
        train_student(cfg, resume=True)
    return run_dir


def teacher_sections(teacher: str | Path) -> dict:
    """The data/model/first_stage/diffusion/sample sections of a bidm teacher run (a student inherits them); {}
    for teachers that are not bidm runs (official checkpoints, diffusers directories)."""
    path = checkpoint.resolve(teacher)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    inherited = checkpoint.load(path).config
    return {k: inherited[k] for k in ("data", "model", "first_stage", "diffusion", "sample") if k in inherited}


def student_config(
    teacher_dir: Path, method: str, out_dir: Path, overrides: list[str] = (), recipe: str | Path | None = None
) -> Config:
    """The student config: the teacher run's data/model/diffusion/sample sections <- the ``recipe`` YAML (if any)
    <- ``overrides``."""
    extra = [f"binarize.method={method}", f"binarize.teacher={teacher_dir}", f"out_dir={out_dir}"]
    return load_config(recipe, list(overrides) + extra, base=teacher_sections(teacher_dir))


def ensure_samples(
    run_dir: Path,
    *,
    n: int,
    steps: int,
    eta: float,
    clip_x0: bool,
    seed: int = 0,
    batch_size: int = 256,
    device: str | None = None,
) -> Path:
    """``samples.npz`` (+ ``samples.png``) of the run's EMA model from the fixed x_T of ``seed``, sampled on
    ``device`` (default: the CPU). The x_T and the per-step noise are drawn on the CPU, so a device changes only
    the arithmetic, not the noise."""
    from bidm.models import load_model
    from bidm.npz_io import save_grid, save_samples_npz
    from bidm.sample import generate

    ckpt_step = checkpoint.load(run_dir).step
    settings = {"n": n, "steps": steps, "eta": eta, "clip_x0": clip_x0, "seed": seed, "ckpt_step": ckpt_step}
    stamp = run_dir / "samples.json"
    out = run_dir / "samples.npz"
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out
    model, cfg = load_model(run_dir)
    if device is not None:
        model.to(device)
    images = generate(model, cfg, n=n, steps=steps, eta=eta, clip_x0=clip_x0, seed=seed, batch_size=batch_size)
    save_samples_npz(out, images)
    save_grid(images[:64], run_dir / "samples.png")
    stamp.write_text(json.dumps(settings))
    return out


def ensure_summary(run_dir: Path) -> dict:
    """``summary.json``: the efficiency totals of the run's model (bidm.summary) plus its method name."""
    from bidm.models import load_model
    from bidm.profile import summarize

    path = run_dir / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, cfg = load_model(run_dir)
    shape = (1, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    totals = summarize(model, shape).to_dict()
    totals["method"] = "fp32" if cfg.binarize.method == "none" else cfg.binarize.method
    path.write_text(json.dumps(totals, indent=2))
    return totals


def ensure_metrics(run_dir: Path, cfg: Config, *, feature_spaces: dict[str, int], n_ref: int | None = None,
                   cache_dir: str | None = None) -> dict:  # fmt: skip
    """``metrics.json`` for the run's ``samples.npz``: ``feature_spaces`` maps each space to its sample count."""
    from bidm.evaluate import evaluate_samples, write_metrics

    path = run_dir / "metrics.json"
    settings = {"spaces": feature_spaces, "n_ref": n_ref, "samples": (run_dir / "samples.json").read_text()}
    stamp = run_dir / "metrics.stamp.json"
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return json.loads(path.read_text())
    d = cfg.data
    results = [
        evaluate_samples(
            run_dir / "samples.npz",
            dataset=d.name,
            feature_space=space,
            n=n,
            n_ref=n_ref,
            data_path=d.path,
            split=d.split,
            cache_dir=cache_dir,
        )  # fmt: skip
        for space, n in feature_spaces.items()
    ]
    write_metrics(results, run_dir)
    stamp.write_text(json.dumps(settings))
    return json.loads(path.read_text())

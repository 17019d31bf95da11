"""The CPU-scale quality protocol shared by bench/quality.py and bench/ablation.py, and its committed results.

Protocols v2 and v3 (``PROTOCOLS``; v3 = ``PROTOCOL`` is the default): one FP teacher (configs/cifar16_teacher.yaml,
CIFAR-10 at 16x16, seed 0, trained once; its EMA weights are committed as bench/teachers/cifar16, so every machine
scores students of one teacher); every student is that teacher binarized and trained with
configs/recipes/cpu_cifar16.yaml (the same budget, batch, optimizer and lr for every method); seed s sets the
student's new parameters, its data order and the x_T of its samples. v3 differs from v2 only in the recipe's lr (2e-3,
chosen on validation seed 100; v2 keeps 5e-4 as an override). Each model draws ``n_samples`` images with DDIM and is
scored with the standard Inception network against a fixed random subset of ``n_ref`` CIFAR-10 training images (FID,
sFID, precision, recall), plus the domain feature space as a secondary column.

Results outlive the machine: each finished model appends its rows to a committed JSON file
(``{"protocol": {...}, "rows": [...]}``) with the git commit of the code that trained it, whether the tree was
dirty, the code epoch, a hash of its resolved config and the machine. `render_markdown` turns a file into the
tables of bench/RESULTS.md; a row is *stale* when it was trained from uncommitted code or by an older code epoch
(`CODE_EPOCH`, bumped by any commit that changes what a model or a score would be).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch

from bidm.config import Config, from_dict, load_config, to_dict
from bidm.metrics import mean_std
from bidm.pipeline import (
    ensure_metrics,
    ensure_samples,
    ensure_student,
    ensure_summary,
    ensure_teacher,
    student_config,
)
from bidm.qat import resolve_recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
_CIFAR16 = {
    "dataset": "CIFAR-10 train, 16x16 (shared/data/cifar10, decoded from JPEG)",
    "teacher_config": "configs/cifar16_teacher.yaml",
    "recipe": "configs/recipes/cpu_cifar16.yaml",
    "n_samples": 2000,
    "n_ref": 10000,
    "sample_steps": 100,
    "eta": 1.0,
    "clip_x0": True,
    "features": ["inception", "domain"],
}
# v2 = the recipe with the lr it inherited from protocol v1 (5e-4); v3 = the recipe's lr chosen on validation seed
# 100 (2e-3, docs/FIDELITY.md "lr validation"), nothing else changed. Each protocol owns its results files, so a
# table never mixes the two; `student_overrides` are applied on top of the recipe.
PROTOCOLS = {
    "cifar16-v2": {"name": "cifar16-v2", **_CIFAR16, "student_overrides": ["train.lr=5e-4"],
                   "results": "quality_cifar16", "ablation_results": "ablation_cifar16",
                   "out": "bench/out/quality_v2"},
    "cifar16-v3": {"name": "cifar16-v3", **_CIFAR16, "student_overrides": [],
                   "results": "quality_v3_cifar16", "ablation_results": "ablation_v3_cifar16",
                   "out": "bench/out/quality_v3"},
}  # fmt: skip
PROTOCOL = PROTOCOLS["cifar16-v3"]  # the default of bench/quality.py and bench/ablation.py


def get_protocol(name: str) -> dict:
    """`PROTOCOLS[name]`; ``v2`` / ``v3`` are accepted for ``cifar16-v2`` / ``cifar16-v3``."""
    key = name if name in PROTOCOLS else f"cifar16-{name}"
    if key not in PROTOCOLS:
        raise SystemExit(f"unknown protocol {name!r}; expected one of {list(PROTOCOLS)}")
    return PROTOCOLS[key]


# The code epoch: bump it in the commit that changes what a trained model or a score would be (a binarizer, TBS,
# SPD, the training loop, the sampler, the metrics, the recipe). Rows of an older epoch are shown as stale; the
# commit in each row says exactly which code produced it. Epoch 1 = the first protocol-v2 code.
CODE_EPOCH = 1
# files that decide training, sampling or scoring: a row trained while one of them had uncommitted changes is stale
TRACKED = [
    "src/bidm/train.py", "src/bidm/diffusion.py", "src/bidm/unet.py", "src/bidm/sample.py", "src/bidm/data.py",
    "src/bidm/metrics.py", "src/bidm/features.py", "src/bidm/evaluate.py", "configs/cifar16_teacher.yaml",
    "src/bidm/binarize", "src/bidm/tbs.py", "src/bidm/distill.py", "src/bidm/qat.py", "src/bidm/models.py",
    "configs/recipes/cpu_cifar16.yaml",
]  # fmt: skip


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def code_version() -> dict:
    """{"commit": HEAD, "dirty": whether a tracked file differs from HEAD, "epoch": CODE_EPOCH}."""
    status = _git("status", "--porcelain", "--", *TRACKED)
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status), "epoch": CODE_EPOCH}


def machine() -> str:
    from bidm.export.kernels import cpu_model

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu_model()} ({os.cpu_count()} cores), {torch.get_num_threads()} threads, torch {torch.__version__}"


def config_hash(cfg: Config) -> str:
    """sha1 of what decides the model: the resolved config without its paths (out_dir, teacher, data path), the
    logging cadence, and the settings the method does not read (TBS fields without TBS, SPD fields without a
    feature loss, other methods' options)."""
    from bidm.models import uses_tbs

    d = to_dict(cfg)
    d.pop("out_dir", None)
    d["data"].pop("path", None)
    for key in ("log_every", "ckpt_every", "device"):
        d["train"].pop(key, None)
    b = d["binarize"]
    b.pop("teacher", None)
    b["method_options"] = {k: v for k, v in b["method_options"].items() if k == b["method"]}
    if not uses_tbs(cfg):
        for key in ("tbs", "tbs_blocks", "tbs_alpha_init", "train_cache", "train_cache_noise", "tbs_sample_cache"):
            b.pop(key, None)
    if b.get("feature_loss") in ("none", "auto") and cfg.binarize.method != "bidm":
        for key in ("spd_lambda", "spd_p"):
            b.pop(key, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def teacher_config(data_path: str, teacher_dir: str, extra=()) -> Config:
    return load_config(ROOT / PROTOCOL["teacher_config"], [f"out_dir={teacher_dir}", f"data.path={data_path}", *extra])


def student(teacher_dir: Path, method: str, seed: int, out_dir: Path, data_path: str, extra=(), *,
            protocol: dict | None = None) -> Config:  # fmt: skip
    """The protocol's student config: teacher sections <- recipe <- the protocol's overrides <- seed <- ``extra``."""
    proto = protocol or PROTOCOL
    overrides = [*proto.get("student_overrides", []), f"train.seed={seed}", f"sample.seed={seed}",
                 f"data.path={data_path}", *extra]  # fmt: skip
    return student_config(teacher_dir, method, out_dir, overrides, recipe=ROOT / PROTOCOL["recipe"])


def evaluate_run(run_dir: Path, cfg: Config, *, n: int, n_ref: int, steps: int, eta: float, seed: int,
                 features: list[str] | None = None) -> dict:  # fmt: skip
    """Samples + efficiency summary + metrics of one run; returns {"metrics": ..., "summary": ..., "seconds": ...}.
    ``features``: the feature spaces (default the protocol's)."""
    t0 = time.perf_counter()
    ensure_samples(run_dir, n=n, steps=steps, eta=eta, clip_x0=PROTOCOL["clip_x0"], seed=seed, batch_size=250)
    t1 = time.perf_counter()
    summary = ensure_summary(run_dir)
    spaces = {s: n for s in (features or PROTOCOL["features"])}
    metrics = ensure_metrics(run_dir, cfg, feature_spaces=spaces, n_ref=n_ref)
    return {"metrics": metrics, "summary": summary, "sample_s": t1 - t0, "score_s": time.perf_counter() - t1}


def rows_for(label: dict, run_dir: Path, version: dict, result: dict, *, train_s: float | None):
    """One row per feature space of a finished model; ``version`` is `code_version()` taken before it trained."""
    from bidm import checkpoint

    ck = checkpoint.load(run_dir)  # the config the model was really trained with
    base = {
        **label,
        "steps": ck.step,
        "config_hash": config_hash(from_dict(ck.config)),
        **version,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "train_seconds": None if train_s is None else round(train_s),
        "sample_seconds": round(result["sample_s"]),
        "size_mib": result["summary"].get("size_mib"),
        "ops": result["summary"].get("ops"),
    }
    rows = []
    for m in result["metrics"]["by_space"].values():
        rows.append(
            {
                **base,
                "feature_space": m["feature_space"],
                "n_samples": m["n_samples"],
                "n_ref": m["n_reference"],
                "fid": m.get("fid"),
                "sfid": m.get("sfid"),
                "precision": m.get("precision"),
                "recall": m.get("recall"),
            }
        )
    return rows


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"protocol": PROTOCOL, "rows": []}


def check_results_file(path: Path, protocol: dict) -> None:
    """Refuse a results file that holds another protocol's rows (call it before training, and on every write)."""
    if not path.is_file():
        return
    held = load_results(path).get("protocol", {}).get("name")
    if held != protocol["name"]:
        raise SystemExit(f"{path} holds protocol {held!r} rows; these would be {protocol['name']!r} (give them "
                         "their own --results file, or pick the file's --protocol)")  # fmt: skip


def add_rows(path: Path, rows: list[dict], key=("method", "variant", "seed", "feature_space"), *,
             protocol: dict | None = None) -> None:  # fmt: skip
    """Merge ``rows`` into the committed file (a row with the same key is replaced) and write it atomically;
    ``protocol`` (default `PROTOCOL`) is what the file says its rows were scored with."""
    protocol = protocol or PROTOCOL
    check_results_file(path, protocol)
    data = load_results(path)
    new_keys = {tuple(r.get(k) for k in key) for r in rows}
    kept = [r for r in data["rows"] if tuple(r.get(k) for k in key) not in new_keys]
    data = {"protocol": protocol, "rows": kept + rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def is_stale(row: dict) -> str | None:
    """Why ``row`` may no longer describe the current code, or None."""
    if row.get("dirty"):
        return "trained from uncommitted code"
    if row.get("epoch", 0) < CODE_EPOCH:
        return f"code epoch {row.get('epoch', 0)} < {CODE_EPOCH}"
    return None


def _cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(rows: list[dict], group: str) -> list[dict]:
    """Per ``group`` value (method or variant): its rows of each feature space and the stale reasons met."""
    out: dict[str, dict] = {}
    for r in rows:
        g = out.setdefault(r[group], {"name": r[group], "inception": [], "domain": [], "stale": []})
        g[r["feature_space"]].append(r)
        reason = is_stale(r)
        if reason and r["feature_space"] == "inception":
            g["stale"].append((r, reason))
    return list(out.values())


def render_markdown(data: dict, group: str = "method") -> str:
    """The Markdown table of a results file: mean ± std (sample std over seeds) per method / variant; a † marks
    rows trained by code that has changed since (listed below the table)."""
    groups = aggregate(data["rows"], group)
    order = sorted(groups, key=lambda g: (g["name"] != "fp32", _mean([r["fid"] for r in g["inception"]])))
    lines = [
        f"| {group} | seeds | steps | FID↓ | sFID↓ | Prec.↑ (%) | Rec.↑ (%) | domain FID↓ | n (ref) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in order:
        inc, dom = g["inception"], g["domain"]
        if not inc:
            continue
        seeds = sorted({r["seed"] for r in inc})
        commits = sorted({(r["commit"] or "?")[:7] for r in inc})
        mark = " †" if g["stale"] else ""
        lines.append(
            f"| {g['name']}{mark} | {','.join(map(str, seeds))} | {inc[0]['steps']} | "
            f"{_cell([r['fid'] for r in inc])} | "
            f"{_cell([r['sfid'] for r in inc])} | {_cell([r['precision'] for r in inc], 100)} | "
            f"{_cell([r['recall'] for r in inc], 100, 2)} | {_cell([r['fid'] for r in dom], 1, 2)} | "
            f"{inc[0]['n_samples']} ({inc[0]['n_ref']}) | {', '.join(commits)} |"
        )
    stale = [(r, why) for g in groups for r, why in g["stale"]]
    if stale:
        lines += ["", "† rows whose code changed since they were trained (rerun to refresh):", ""]
        for r, why in stale:
            commit = (r["commit"] or "?")[:7]
            lines.append(f"- {r[group]} seed {r['seed']}: FID {r['fid']:.1f} ({why}; commit {commit})")
    return "\n".join(lines) + "\n"


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("inf")


def run_teacher(data_path: str, teacher_dir: str) -> tuple[Path, Config]:
    cfg = teacher_config(data_path, teacher_dir)
    return ensure_teacher(cfg), cfg


def train_student(cfg: Config) -> tuple[Path, float | None]:
    """Train (or resume, or reuse) the student of ``cfg``; an existing run must have been trained with the same
    config (paths aside), so a table never mixes in a model trained otherwise."""
    from bidm import checkpoint

    t0 = time.perf_counter()
    path = Path(cfg.out_dir) / checkpoint.CKPT_NAME
    if path.is_file():
        saved = config_hash(from_dict(checkpoint.load(path).config))
        wanted = config_hash(resolve_recipe(cfg))
        if saved != wanted:
            raise SystemExit(f"{path} was trained with another config (hash {saved}, protocol wants {wanted}); "
                             "move it away to retrain")  # fmt: skip
    already = path.is_file() and checkpoint.load(path).step >= cfg.train.steps
    run_dir = ensure_student(cfg)
    return run_dir, None if already else time.perf_counter() - t0

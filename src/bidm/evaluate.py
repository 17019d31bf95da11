"""Score a samples ``.npz`` against a dataset, and compare many runs in Table-1 style.

``evaluate_samples``  one samples file, one feature space -> dict (FID, sFID, IS, precision, recall, counts).
``write_metrics``     one or more of those dicts -> ``metrics.json`` (the first is the primary, flat; all under
                      ``by_space``).
``compare_runs``      run directories (``metrics.json`` [+ ``summary.json``] [+ ``samples.npz``]) -> Markdown, CSV
                      and JSON tables, an FID-vs-cost figure and a side-by-side sample grid.

Protocol notes are written next to every number (``notes``): the sample and reference counts, the feature space,
and dataset caveats. Nothing is reported for a metric that cannot be computed honestly: it is ``null``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from bidm import features as feat
from bidm import metrics
from bidm.errors import BidmError
from bidm.fileio import atomic_write, atomic_write_text
from bidm.npz_io import images_to_uint8, load_samples_npz, make_grid, readable_scale

FEATURE_SPACES = ("inception", "domain")
SUMMARY_KEYS = ("fp_size_mib", "size_mib", "size_saving", "fp_flops", "bops", "flops", "ops", "ops_saving")
DATASET_NOTES = {
    "cifar10": "if the CIFAR-10 reference is shared/data/cifar10 (decoded from JPEG, lossy), numbers are comparable "
    "between our models only, not to published FIDs (which use the lossless originals)",
}


MIN_IMAGES = 2  # FID needs a covariance; precision/recall need more than k images (checked with k)
# Datasets without one stored resolution and the size their reference is taken at by default: digits are 8x8
# originals that every bidm run upsamples (data.size, default 16); folder images are cropped and resized anyway.
DEFAULT_REF_SIZE = {"digits": 16, "folder": None}


def run_data_size(samples_npz: str | Path, dataset: str) -> int | None:
    """``data.size`` of the run whose directory holds ``samples_npz`` (its ``config.yaml``), when it trained on
    ``dataset``: the resolution its reference must be compared at. None when there is no such run config."""
    import yaml

    file = Path(samples_npz).parent / "config.yaml"
    try:
        data = (yaml.safe_load(file.read_text()) or {}).get("data") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    size = data.get("size") if data.get("name") == dataset else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _load_dataset(name: str, *, path: str | None, split: str, size: int, channels: int, ref_size: int | None):
    """``bidm.data.load_dataset`` at the reference resolution; returns (float [-1, 1] NCHW, labels or None).

    The reference resolution is ``ref_size`` (the ``data.size`` the model was trained at) when given, else the
    dataset's own (a CIFAR-10 / npz file's stored size; `DEFAULT_REF_SIZE` for digits; folder images follow the
    samples). Samples of another resolution are refused: silently rescaling the reference to them gives a score
    for a different task (32x32 samples scored against 16x16 digits read as a near-perfect FID).
    """
    from bidm.data import load_dataset

    target = ref_size or DEFAULT_REF_SIZE.get(name)
    if name == "folder" and not ref_size:
        target = size
    images, labels = load_dataset(name, path=path, split=split, size=target, channels=channels)
    res = images.shape[-1]
    if res != size:
        raise BidmError(
            f"samples are {size}x{size} but the {name!r} reference is {res}x{res}: refusing to rescale the reference "
            f"to the samples (the score would not be comparable); pass --ref-size {size} only if the model was "
            f"trained on {name} resized to {size}x{size} (data.size={size})"
        )
    if images.shape[1] != channels:
        raise BidmError(f"samples have {channels} channel(s) but dataset {name!r} loads with {images.shape[1]}")
    return images, labels


def _subset(images: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """A fixed random subset of n images (datasets may be sorted by class), or all of them."""
    if n is None or n >= len(images):
        return images
    return images[np.sort(np.random.default_rng(seed).permutation(len(images))[:n])]


def _reference(ref, data, *, dataset, split, n_ref, shape) -> tuple[np.ndarray, str, str]:
    """(uint8 NHWC reference images, cache name, description) from the ``ref`` .npz, else the dataset images."""
    if ref is not None:
        images = load_samples_npz(ref)
        if images.shape[1:] != shape:
            raise BidmError(f"reference {ref} holds {images.shape[1:]} images, samples are {shape}")
        total, images = len(images), _subset(images, n_ref)
        return images, Path(ref).stem, f"{ref} ({len(images)} of {total} images)"
    total, images = len(data[0]), _subset(images_to_uint8(data[0]), n_ref)
    size = "x".join(map(str, shape))
    return images, dataset, f"{dataset}:{split} ({len(images)} of {total} images, {size})"


def _extractor(feature_space, data, *, dataset, cache_dir, device, inception, is_weights, resize,
               classifier_kwargs, progress):  # fmt: skip
    if feature_space == "inception":
        return feat.InceptionExtractor(inception, is_weights=is_weights, device=device, resize=resize)
    x, y = data
    if y is None:
        raise BidmError(f"dataset {dataset!r} has no labels, so no domain classifier can be trained for it")
    model, info = feat.load_or_train_domain_classifier(
        dataset, x, y, cache_dir=cache_dir, progress=progress, **(classifier_kwargs or {})
    )
    return feat.DomainExtractor(model, info, device=device)


def _scores(fake: dict, ref: dict, *, k: int, is_splits: int) -> dict:
    """Metric values from sample features and cached reference features (None where not computable)."""
    out = {key: None for key in ("fid", "sfid", "is", "is_std", "is_splits", "precision", "recall")}
    out["fid"] = metrics.frechet_distance(*metrics.feature_stats(fake["pool"]), ref["mu"], ref["sigma"])
    if "spatial" in fake:
        out["sfid"] = metrics.frechet_distance(*metrics.feature_stats(fake["spatial"]), ref["mu_s"], ref["sigma_s"])
    out["precision"], out["recall"] = metrics.precision_recall(ref["pool"], fake["pool"], k=k)
    if "logits" in fake:
        out["is_splits"] = min(is_splits, len(fake["logits"]))
        out["is"], out["is_std"] = metrics.inception_score(fake["logits"], out["is_splits"], logits=True)
    return out


def _notes(feature_space: str, extractor, result: dict, *, dataset: str, ref, n: int, n_ref: int) -> list[str]:
    """The protocol caveats stored next to the numbers."""
    notes = [f"{n} samples vs {n_ref} reference images; FID is biased upward at small n, compare at equal n only"]
    if feature_space == "domain":
        notes.append("domain space: features of a small CNN trained on the dataset, not Inception; comparable only "
                     f"between runs scored with the same classifier ({extractor.info.get('file')})")  # fmt: skip
        notes.append("sfid is null: sFID is defined on Inception mixed_6/conv features, with no domain equivalent")
        notes.append(f"is = domain IS (at most {extractor.info['num_classes']}, the class count), not Inception IS")
    elif result["is"] is None:
        notes.append(f"is is null: default_1.pt has no 1008-way logits; to get IS, {feat.IS_WEIGHTS_HOW_TO}")
    if dataset in DATASET_NOTES and ref is None:
        notes.append(DATASET_NOTES[dataset])
    return notes


def evaluate_samples(
    samples_npz: str | Path,
    *,
    dataset: str,
    feature_space: str = "inception",
    n: int | None = None,
    ref: str | Path | None = None,
    n_ref: int | None = None,
    split: str = "train",
    data_path: str | None = None,
    ref_size: int | None = None,
    cache_dir: str | Path | None = None,
    inception: str | Path | None = None,
    is_weights: str | Path | None = None,
    resize: str = "tf",
    device: str = "cpu",
    batch_size: int | None = None,
    k: int = 3,
    is_splits: int = 10,
    classifier_kwargs: dict | None = None,
    progress: bool = True,
) -> dict:
    """FID, sFID, IS, precision and recall of the first ``n`` samples in ``samples_npz`` against a reference.

    The reference is ``ref`` (an ADM-style ``.npz``) if given, else ``dataset``'s ``split`` loaded at the samples'
    resolution (``ref_size``: the model's training ``data.size``, by default read from the ``config.yaml`` next to
    the samples; another resolution than the samples' is an error, see `_load_dataset`); ``n_ref`` takes a fixed
    random subset of it. Reference features are cached in
    ``cache_dir/ref_stats``. In the ``domain`` space the classifier is trained (once, cached) on ``dataset``'s
    ``split``; sFID is null there. IS in the ``inception`` space needs ``is_weights`` and is null otherwise.
    """
    if feature_space not in FEATURE_SPACES:
        raise BidmError(f"unknown feature space {feature_space!r}; expected one of {FEATURE_SPACES}")
    if feature_space == "inception":
        feat.find_inception_weights(inception)  # fail before any data loading when the weights are missing
    timings = {}
    start = time.perf_counter()
    samples = load_samples_npz(samples_npz, n=n)
    _check_count("samples", samples_npz, len(samples), k)
    size, channels = samples.shape[1], samples.shape[3]
    if samples.shape[1] != samples.shape[2]:
        raise BidmError(f"expected square samples, got {samples.shape[1]}x{samples.shape[2]}")
    data = None  # the dataset is needed for the reference images and/or to train the domain classifier
    if ref is None or feature_space == "domain":
        ref_size = ref_size or run_data_size(samples_npz, dataset)
        data = _load_dataset(dataset, path=data_path, split=split, size=size, channels=channels, ref_size=ref_size)
    ref_images, ref_name, ref_desc = _reference(
        ref, data, dataset=dataset, split=split, n_ref=n_ref, shape=samples.shape[1:]
    )
    _check_count("reference images", ref or dataset, len(ref_images), k)
    extractor = _extractor(
        feature_space, data, dataset=dataset, cache_dir=cache_dir, device=device, inception=inception,
        is_weights=is_weights, resize=resize, classifier_kwargs=classifier_kwargs, progress=progress,
    )  # fmt: skip
    timings["setup"] = time.perf_counter() - start

    start = time.perf_counter()
    ref_split = "npz" if ref is not None else split
    ref_feats = feat.reference_features(
        ref_images, extractor, dataset=ref_name, split=ref_split, cache_dir=cache_dir, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    timings["reference"] = time.perf_counter() - start
    start = time.perf_counter()
    fake = feat.extract_features(samples, extractor, batch_size=batch_size, progress=progress, desc="samples")
    timings["samples"] = time.perf_counter() - start

    start = time.perf_counter()
    result = _scores(fake, ref_feats, k=k, is_splits=is_splits)
    timings["metrics"] = time.perf_counter() - start
    return {
        **result,
        "n_samples": len(samples),
        "n_reference": len(ref_images),
        "feature_space": feature_space,
        "reference": ref_desc,
        "dataset": dataset,
        "image_size": size,
        "samples": str(samples_npz),
        "extractor": extractor.describe(),
        "k": k,
        "notes": _notes(
            feature_space, extractor, result, dataset=dataset, ref=ref, n=len(samples), n_ref=len(ref_images)
        ),  # fmt: skip
        "seconds": {key: round(value, 2) for key, value in timings.items()},
    }


def _check_count(what: str, source, n: int, k: int) -> None:
    """FID needs >= 2 images (a covariance) and precision/recall > k (each image's k-th neighbour)."""
    need = max(MIN_IMAGES, k + 1)
    if n < need:
        raise BidmError(
            f"{source}: {n} {what}, but scoring needs at least {need} (FID: 2; precision/recall: k+1={k + 1})"
        )


def write_metrics(results: list[dict], out_dir: str | Path, label: str | None = None) -> Path:
    """Write ``metrics.json``: the first result's keys at top level, every result under ``by_space``."""
    if not results:
        raise BidmError("write_metrics needs at least one result")
    out = {**results[0], "by_space": {r["feature_space"]: r for r in results}}
    if label:
        out["label"] = label
    return atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(out, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, None when the file does not exist; malformed is a `BidmError`."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise BidmError(f"{path} is not valid JSON ({err}); rerun the command that wrote it") from None
    if not isinstance(value, dict):
        raise BidmError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def load_run_rows(run_dir: str | Path, label: str | None = None) -> list[dict]:
    """One table row per feature space in ``run_dir/metrics.json``, with ``summary.json`` efficiency merged in."""
    run_dir = Path(run_dir)
    scored = _read_json(run_dir / "metrics.json")
    if scored is None:
        raise FileNotFoundError(f"{run_dir / 'metrics.json'} not found; run `bidm evaluate` on that run first")
    summary = _read_json(run_dir / "summary.json") or {}
    method = label or scored.get("label") or summary.get("method") or run_dir.name
    rows = []
    for space in (scored.get("by_space") or {scored.get("feature_space"): scored}).values():
        row = {"method": method, "run": str(run_dir)}
        for key in ("feature_space", "fid", "sfid", "is", "is_std", "precision", "recall", "n_samples",
                    "n_reference", "reference", "dataset"):  # fmt: skip
            row[key] = space.get(key)
        row.update({key: summary.get(key) for key in SUMMARY_KEYS})
        rows.append(row)
    return rows


def _fmt(value, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * scale:.{digits}f}{suffix}"


def markdown_table(rows: list[dict]) -> str:
    """Table-1-style Markdown: quality (↓/↑), counts, feature space, then size and OPs with savings."""
    head = ["Method", "Features", "n (ref)", "FID↓", "sFID↓", "IS↑", "Prec.↑ (%)", "Rec.↑ (%)", "Size (MiB)",
            "OPs (×10⁹)", "Size saving", "OPs saving"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["method"], r["feature_space"] or "–", f"{r['n_samples']} ({r['n_reference']})",
            _fmt(r["fid"]), _fmt(r["sfid"]), _fmt(r["is"]), _fmt(r["precision"], 100), _fmt(r["recall"], 100),
            _fmt(r["size_mib"]), _fmt(r["ops"], 1e-9, 3), _fmt(r["size_saving"], suffix="×"),
            _fmt(r["ops_saving"], suffix="×"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    refs = sorted({f"{r['feature_space']}: {r['reference']}" for r in rows if r["reference"]})
    lines += ["", "Reference sets: " + "; ".join(refs) + "." if refs else ""]
    if any(r["feature_space"] == "domain" for r in rows):
        lines.append("Domain rows use a small CNN trained on the dataset (domain FID/IS), not Inception.")
    lines += [DATASET_NOTES[d] + "." for d in sorted({r["dataset"] for r in rows} & set(DATASET_NOTES))]
    return "\n".join(lines).rstrip() + "\n"


def efficiency_figure(rows: list[dict], path: str | Path) -> Path:
    """FID vs OPs and FID vs size (log x), one labelled point per method, in the preferred feature space."""
    from matplotlib.figure import Figure

    spaces = [r["feature_space"] for r in rows]
    space = "inception" if "inception" in spaces else (spaces[0] if spaces else None)
    rows = [r for r in rows if r["feature_space"] == space and r["fid"] is not None]
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, key, xlabel in zip(fig.subplots(1, 2), ("ops", "size_mib"), ("OPs (log)", "size, MiB (log)")):
        points = [r for r in rows if r.get(key)]
        for r in points:
            ax.scatter(r[key], r["fid"])
            ax.annotate(r["method"], (r[key], r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if points:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")  # labels at 1, 2, 5 x 10^k only: matplotlib's minor labels overlap on short ranges
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.text(0.5, 0.5, "no summary.json efficiency data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"FID ({space} features)")
        ax.grid(True, which="both", alpha=0.3)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def side_by_side(samples: dict[str, np.ndarray], path: str | Path) -> Path:
    """One row of images per run (label at left); rows match when runs share x_T."""
    from matplotlib.figure import Figure

    strips = {
        name: make_grid(images, nrow=len(images), padding=1, scale=readable_scale(images.shape[1]))
        for name, images in samples.items()
    }
    h, w = next(iter(strips.values())).shape[:2]
    fig = Figure(figsize=(12.0, 0.3 + len(strips) * max(0.5, 12.0 * h / w)))
    fig.subplots_adjust(hspace=0.05)
    for ax, (name, strip) in zip(fig.subplots(len(strips), 1, squeeze=False)[:, 0], strips.items()):
        image = strip[..., 0] if strip.shape[-1] == 1 else strip
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")  # no per-row contrast stretch
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))


def compare_runs(
    run_dirs: list[str | Path], out_dir: str | Path, *, labels: list[str | None] | None = None, n_images: int = 8
) -> dict:
    """Tables (``comparison.md/.csv/.json``), ``comparison.png`` and ``samples.png`` for several runs.

    Returns ``{"rows": [...], "files": {kind: path}}``. The sample grid shows the first ``n_images`` of each run's
    ``samples.npz`` (runs without one are left out of it).
    """
    if not run_dirs:
        raise BidmError("compare needs at least one run directory")
    labels = list(labels or [None] * len(run_dirs))
    per_run = [load_run_rows(run, label) for run, label in zip(run_dirs, labels)]
    rows = [row for run_rows in per_run for row in run_rows]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "json": out_dir / "comparison.json"}
    atomic_write_text(files["md"], markdown_table(rows))
    atomic_write_text(files["json"], json.dumps({"rows": rows}, indent=2) + "\n")

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(files["csv"], write_csv)
    files["figure"] = efficiency_figure(rows, out_dir / "comparison.png")

    grids = {}
    for run, run_rows in zip(run_dirs, per_run):
        if (Path(run) / "samples.npz").is_file():
            name = run_rows[0]["method"] if run_rows[0]["method"] not in grids else f"{run_rows[0]['method']} ({run})"
            grids[name] = load_samples_npz(Path(run) / "samples.npz")[:n_images]
    if grids:
        files["samples"] = side_by_side(grids, out_dir / "samples.png")
    return {"rows": rows, "files": {key: str(value) for key, value in files.items()}}

"""Why is a student's recall low? Re-score its samples after simple pixel repairs, and measure its k-NN geometry.

    python bench/recall_probe.py runs/cifar16_teacher bench/out/quality_v2/{bidm,bbcu,xnor}_s0 \
        --out bench/results/recall_probe_cifar16.json

The first run is the reference for colour (normally the FP teacher) unless ``--target-chroma`` is given. For every
run and every repair, the samples are scored in Inception space against the protocol's reference (CIFAR-10 train,
10,000 images, 16x16):

- ``none``: the samples as they are (reproduces the quality row);
- ``chroma``: each pixel's colour pulled toward its grey value so that the mean chroma (max - min of RGB) equals
  the first run's: tests whether over-saturation is what keeps real images outside the student's manifold;
- ``blur``: a 3x3 binomial blur, removing pixel-level residual noise (applied to the teacher too, as a control);
- ``chroma+blur``: both.

Geometry columns (Inception pool space, Euclidean): ``r_fake`` = median (and 90th percentile) distance of a sample
to its k-th nearest sample (the radius of the balls recall is counted with), ``d_real`` = median distance of a real
image to its nearest sample, ``coverage`` / ``density`` (Naeem et al. 2020; see `geometry`). Recall is the share of
real images with a sample within that sample's radius, so low recall means small radii (samples too alike), large
d_real (samples away from the real images), or few outlying samples with wide balls; coverage separates the last.
Features are cached under ``--cache`` by a hash of the pixels.

Cost: one Inception pass over the samples per (run, repair), about 5 minutes for 2000 images on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPAIRS = ("none", "chroma", "blur", "chroma+blur")


def chroma(images: np.ndarray) -> float:
    x = images.astype(np.float32) / 255.0
    return float((x.max(-1) - x.min(-1)).mean())


def scale_chroma(images: np.ndarray, factor: float) -> np.ndarray:
    """Pull (factor < 1) or push each pixel's RGB about its grey mean; uint8 in, uint8 out."""
    x = images.astype(np.float32)
    grey = x.mean(-1, keepdims=True)
    return np.clip(grey + (x - grey) * factor, 0, 255).round().astype(np.uint8)


def blur(images: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication; uint8 NHWC in and out."""
    x = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4
    x = (x[:, :, :-2] + 2 * x[:, :, 1:-1] + x[:, :, 2:]) / 4
    return np.clip(x, 0, 255).round().astype(np.uint8)


def repair(images: np.ndarray, name: str, target_chroma: float) -> np.ndarray:
    if "chroma" in name:
        images = scale_chroma(images, target_chroma / chroma(images))
    if "blur" in name:
        images = blur(images)
    return images


def geometry(real: np.ndarray, fake: np.ndarray, k: int, r_real: np.ndarray | None = None) -> dict:
    """Precision, recall and the k-NN geometry of the samples against the real images (squared distances inside,
    distances out). ``r_real``: the reals' squared k-NN radii (`bidm.metrics.knn_radii`), if already computed.

    ``precision`` / ``recall`` are `bidm.metrics.precision_recall`'s, from the same radii.

    ``coverage`` / ``density`` are Naeem et al. 2020's: coverage = share of real images whose own k-NN ball (among
    the reals) holds at least one sample, robust to outlier samples, which recall is not (one far-off sample has a
    wide ball that can hold many real images); density = mean count of real balls holding a sample, over k.
    """
    from bidm import metrics

    r_fake = metrics.knn_radii(fake, k)
    r_real = metrics.knn_radii(real, k) if r_real is None else r_real
    nearest = np.empty(len(real), np.float32)
    inside = np.zeros(len(fake), np.float64)  # per sample: how many real balls hold it
    for start in range(0, len(real), 512):
        d = metrics._pairwise_sq_dists(real[start : start + 512], fake)  # [reals, samples]
        nearest[start : start + 512] = d.min(1)
        inside += (d <= r_real[start : start + 512, None]).sum(0)
    return {
        "precision": float(metrics.manifold_coverage(real, r_real, fake).mean()),
        "recall": float(metrics.manifold_coverage(fake, r_fake, real).mean()),
        "r_fake": float(np.median(np.sqrt(r_fake))),
        "r_fake_p90": float(np.percentile(np.sqrt(r_fake), 90)),
        "d_real": float(np.median(np.sqrt(np.maximum(nearest, 0)))),
        "coverage": float((nearest <= r_real).mean()),
        "density": float(inside.mean() / k),
    }


def cached_features(images: np.ndarray, extractor, folder: Path) -> dict:
    """Inception features of ``images``, kept in ``folder`` by a hash of the pixels (one pass costs minutes)."""
    from bidm import features

    file = folder / f"{features.fingerprint(images, extra=extractor.id)}.npz"
    if file.is_file():
        with np.load(file) as z:
            return {key: z[key] for key in z.files}
    fake = features.extract_features(images, extractor, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(file, **fake)
    return fake


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories holding samples.npz; the first sets the target chroma")
    p.add_argument("--repairs", default=",".join(REPAIRS))
    p.add_argument("--data-path", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"))
    p.add_argument(
        "--target-chroma",
        type=float,
        default=None,
        help="colour target of the chroma repair (default: the first run's chroma)",
    )
    p.add_argument("--n-ref", type=int, default=10000)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="bench/out/recall_probe", help="folder for the samples' features")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bidm import evaluate, features, metrics
    from bidm.npz_io import load_samples_npz

    data = evaluate._load_dataset("cifar10", path=args.data_path, split="train", size=16, channels=3, ref_size=16)
    ref_images, ref_name, ref_desc = evaluate._reference(
        None, data, dataset="cifar10", split="train", n_ref=args.n_ref, shape=(16, 16, 3)
    )
    extractor = features.InceptionExtractor()
    ref = features.reference_features(ref_images, extractor, dataset=ref_name, split="train", progress=False)
    r_real = metrics.knn_radii(ref["pool"], args.k)  # shared by every row
    sets = {run: load_samples_npz(Path(run) / "samples.npz") for run in args.runs}
    target = args.target_chroma if args.target_chroma is not None else chroma(sets[args.runs[0]])
    rows = []
    source = "--target-chroma" if args.target_chroma is not None else args.runs[0]
    print(f"reference: {ref_desc}; target chroma {target:.3f} (from {source})")
    print("| run | repair | chroma | FID | Prec % | Rec % | coverage % | density | r_fake (p90) | d_real |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run, images in sets.items():
        for name in args.repairs.split(","):
            fixed = repair(images, name, target)
            fake = cached_features(fixed, extractor, Path(args.cache))
            fid = metrics.frechet_distance(*metrics.feature_stats(fake["pool"]), ref["mu"], ref["sigma"])
            row = {"run": run, "repair": name, "n": len(fixed), "chroma": chroma(fixed), "fid": fid,
                   **geometry(ref["pool"], fake["pool"], args.k, r_real)}  # fmt: skip
            prec, rec = row["precision"], row["recall"]
            rows.append(row)
            print(
                f"| {run} | {name} | {row['chroma']:.3f} | {fid:.1f} | {100 * prec:.1f} | {100 * rec:.2f} | "
                f"{100 * row['coverage']:.1f} | {row['density']:.3f} | {row['r_fake']:.2f} "
                f"({row['r_fake_p90']:.2f}) | {row['d_real']:.2f} |",
                flush=True,
            )
    if args.out:
        import protocol

        data = {"tool": "bench/recall_probe.py", **protocol.code_version(), "reference": ref_desc, "k": args.k,
                "target_chroma": target, "rows": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

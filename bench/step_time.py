"""Training step time of every method relative to XNOR, on the same teacher, batch and data.

One step = `bidm.qat.QATObjective` (BiDM: cache pass at t+1 + teacher pass + student pass + SPD; plain baselines:
student pass only) + backward + Adam. Prints a Markdown table and writes JSON.

    python bench/step_time.py --teacher runs/demo/fp32                  # the demo's digits teacher
    python bench/step_time.py --teacher runs/cifar16_teacher --methods xnor,bidm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bidm import METHODS
from bidm.data import load_training_images
from bidm.models import load_teacher, student_from_teacher
from bidm.pipeline import student_config
from bidm.qat import QATObjective, resolve_recipe
from bidm.train import schedule


def time_method(teacher_dir: Path, method: str, batch_size: int, steps: int, overrides: list[str]) -> float:
    cfg = resolve_recipe(student_config(teacher_dir, method, Path("unused"), [f"train.batch_size={batch_size}",
                                                                              *overrides]))  # fmt: skip
    teacher, _ = load_teacher(cfg.binarize.teacher, cfg.model)
    torch.manual_seed(0)
    student = student_from_teacher(teacher, cfg)
    objective = QATObjective(cfg, teacher, schedule(cfg))
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=cfg.train.lr)
    x0 = load_training_images(cfg)[:batch_size]
    times = []
    for step in range(steps + 2):  # the first two steps warm up allocators and the kernel caches
        start = time.perf_counter()
        objective.before_step(student, step, steps)
        loss, _ = objective(student, x0, torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/demo/fp32")
    p.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="student config overrides")
    p.add_argument("--out", default="bench/out/step_time.json")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else sorted(METHODS)
    if "xnor" not in methods:
        methods.insert(0, "xnor")
    seconds = {m: time_method(Path(args.teacher), m, args.batch_size, args.steps, args.overrides) for m in methods}
    rows = [{"method": m, "step_s": s, "vs_xnor": s / seconds["xnor"]} for m, s in seconds.items()]
    print(f"teacher {args.teacher}, batch {args.batch_size}, median of {args.steps} steps, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print("| method | step (s) | vs XNOR |\n|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['step_s']:.3f} | {r['vs_xnor']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"teacher": args.teacher, "batch_size": args.batch_size, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

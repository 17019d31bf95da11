"""What ``torch.compile`` (Inductor, CPU) gives the FP32 UNet and the packed models, against eager, side by side.

    python bench/compile_speed.py --threads 2 --out bench/results/kernel_compile.json
    python bench/compile_speed.py --quick          # the tiny UNet, batch 2 (a CPU smoke run, ~2 min)

For each model (fp32, packed xnor, packed bidm) and batch: the eager model and ``torch.compile(model)`` are timed in
alternation (``timeit_pair`` of bench/kernel.py, min / median over ``--reps`` calls after warm-up), with the
compile time (first call), the number of FX graphs Dynamo made and of graph breaks, and the largest output
difference. The packed models call the C kernels through ctypes, which Dynamo cannot trace: every packed layer
breaks the graph, and what Inductor can fuse is the FP glue between them. This is the issue-12 measurement of
"what torch.compile gives on CPU"; the packed runtime does not use it (see bench/RESULTS.md for the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel as K  # noqa: E402
import torch  # noqa: E402
import torch._dynamo as dynamo  # noqa: E402

from bidm.binarize import binarize_  # noqa: E402
from bidm.export import pack_  # noqa: E402
from bidm.unet import DDIMUNet, UNetConfig, tiny_unet_config  # noqa: E402


def build(cfg: UNetConfig, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = DDIMUNet(cfg).eval()
    if method != "fp32":
        binarize_(model, method)
        pack_(model)
    return model


def bench(cfg: UNetConfig, method: str, batch: int, reps: int) -> dict:
    model = build(cfg, method)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.full((batch,), 500, dtype=torch.long)
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = torch.compile(model)
    with torch.no_grad():
        ref = model(x, t)
        t0 = time.perf_counter()
        out = compiled(x, t)
        compile_s = time.perf_counter() - t0
        compiled(x, t)  # a second call: guards settled (a recompile, if any, happens here)
        (e_min, e_med), (c_min, c_med) = K.timeit_pair(lambda: model(x, t), lambda: compiled(x, t), reps)
    breaks = sum(dynamo.utils.counters["graph_break"].values())
    return {"method": method, "batch": batch, "eager_ms": e_min * 1e3, "eager_median_ms": e_med * 1e3,
            "compiled_ms": c_min * 1e3, "compiled_median_ms": c_med * 1e3, "speedup": e_min / c_min,
            "speedup_median": e_med / c_med, "compile_s": compile_s,
            "graphs": int(dynamo.utils.counters["stats"].get("unique_graphs", 0)), "graph_breaks": int(breaks),
            "max_abs_diff": float((out - ref).abs().max())}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny UNet at batch 2")
    p.add_argument("--methods", default="fp32,xnor,bidm")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,64; --quick 2)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per side (default 5; batch 1: 20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file (key 'compile', then the net; rows merged by model, batch)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mallopt = K.tune_malloc()
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)  # one frame per packed layer class
    cfg = tiny_unet_config() if args.quick else UNetConfig()
    batches = [int(b) for b in (args.batches or ("2" if args.quick else "1,64")).split(",")]
    head = ("model", "batch", "eager ms", "compiled ms", "speed-up (min / median)", "compile s", "graphs", "breaks",
            "max diff")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for method in args.methods.split(","):
        for batch in batches:
            reps = args.reps or (20 if batch == 1 else 5)
            r = bench(cfg, method, batch, reps)
            rows.append(r)
            print(f"| {method} | {batch} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['speedup']:.2f}x / "
                  f"{r['speedup_median']:.2f}x | {r['compile_s']:.0f} | {r['graphs']} | {r['graph_breaks']} | "
                  f"{r['max_abs_diff']:.1e} |", flush=True)  # fmt: skip
    if args.out:
        entry = {**K.code_version(), "machine": K.machine(), "threads": args.threads, "malloc_tuned": mallopt,
                 "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__,
                 "net": "tiny" if args.quick else "ddim-cifar10", "rows": rows}  # fmt: skip
        path = Path(args.out)
        old = json.loads(path.read_text()).get("compile", {}) if path.is_file() else {}
        net = entry["net"]
        kept = [
            r
            for r in old.get(net, {}).get("rows", [])
            if (r["method"], r["batch"]) not in {(r2["method"], r2["batch"]) for r2 in rows}
        ]  # rows of other runs (methods, batches) stay
        K.merge_json(path, "compile", {**old, net: {**entry, "rows": kept + rows}})
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

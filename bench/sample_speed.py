"""Whole DDIM trajectories: the packed student against the FP32 model, images/s and peak memory.

    python bench/sample_speed.py                        # DDIM CIFAR-10 UNet, 100 steps, batch 1 and 64, xnor + bidm
    python bench/sample_speed.py --out bench/results/kernel.json     # merge the rows into the committed results
    python bench/sample_speed.py --quick                # tiny UNet, 3 steps, batch 1 and 2: seconds (used by a test)

Each (model, batch) runs in its own child process, so its peak RSS (``ru_maxrss``) is its own: FP32 first, then
each packed method, one after the other at each batch (side by side, same machine state). A child builds the UNet
(random init, seed 0; the packed student is ``binarize_`` + ``bidm.export.pack_`` of that same FP model), runs
one warm-up step, then times ``ddim_sample`` over the whole trajectory (eta 0, x0 clipped) from the same x_T.
``speedup`` = FP32 seconds / packed seconds at the same batch. The rows carry the commit, machine, threads, batch and
the 1-minute load average before and after the run; glibc's malloc is tuned as in ``bench/kernel.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel as K  # noqa: E402
import torch  # noqa: E402

from bidm.diffusion import alphas_cumprod, ddim_sample, initial_noise, make_betas  # noqa: E402
from bidm.unet import DDIMUNet, UNetConfig, tiny_unet_config  # noqa: E402


def build(net: str, model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_unet_config() if net == "tiny" else UNetConfig()
    fp = DDIMUNet(cfg).eval()
    if model == "fp32":
        return fp
    from bidm.binarize import binarize_
    from bidm.export import pack_

    binarize_(fp, model)
    return pack_(fp.eval())


def worker(net: str, model: str, batch: int, steps: int) -> dict:
    """One trajectory in this process; returns its row."""
    m = build(net, model)
    cfg = m.config
    acp = alphas_cumprod(make_betas("linear", 1000, 1e-4, 0.02)).float()
    x_T = initial_noise(batch, (cfg.in_channels, cfg.resolution, cfg.resolution), seed=0)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        m(x_T, torch.full((batch,), 999, dtype=torch.long))  # warm-up: kernel build, weight panels, allocator
        start = time.perf_counter()
        x0 = ddim_sample(m, x_T, acp, steps=steps, eta=0.0, clip_x0=True)
        seconds = time.perf_counter() - start
    return {
        "model": model,
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "step_ms": 1e3 * seconds / steps,
        "images_per_s": batch / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_build_mb": rss_built,
        "finite": bool(torch.isfinite(x0).all()),
    }


def run_child(args, model: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, "--net", args.net, "--batch", str(batch)]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads)] + (["--no-mallopt"] if args.no_mallopt else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} batch {batch} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| model | batch | steps | seconds | ms/step | images/s | peak RSS MB | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"**{r['speedup']:.2f}x**" if "speedup" in r else "1"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['steps']} | {r['seconds']:.1f} | {r['step_ms']:.0f} "
            f"| {r['images_per_s']:.3f} | {r['peak_rss_mb']:.0f} | {speed} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="defaults: tiny UNet, 3 steps, batch 1 and 2, xnor")
    parser.add_argument("--net", choices=["ddim-cifar10", "tiny"], help="default ddim-cifar10")
    parser.add_argument("--methods", help="comma-separated packed methods (default xnor,bidm)")
    parser.add_argument("--batches", help="default 1,64")
    parser.add_argument("--steps", type=int, help="default 100")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-mallopt", action="store_true")
    parser.add_argument("--out", default="bench/out/sample_speed.json", help="JSON file; sets its 'trajectories' key")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = ("tiny", "xnor", "1,2", 3) if args.quick else ("ddim-cifar10", "xnor,bidm", "1,64", 100)
    for name, value in zip(("net", "methods", "batches", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)

    torch.set_num_threads(args.threads)
    if args.worker:
        if not args.no_mallopt:
            K.tune_malloc()
        print(json.dumps(worker(args.net, args.worker, args.batch, args.steps)))
        return 0

    load_before = os.getloadavg()[0]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        fp = run_child(args, "fp32", batch)
        rows.append(fp)
        for method in args.methods.split(","):
            row = run_child(args, method, batch)
            row["speedup"] = fp["seconds"] / row["seconds"]
            rows.append(row)
        print(table([r for r in rows if r["batch"] == batch]), flush=True)
    result = {
        "net": args.net,
        **K.code_version(),
        "machine": K.machine(),
        "threads": args.threads,
        "malloc_tuned": not args.no_mallopt,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "kernel": K.kernels.kernel_info(),
        "rows": rows,
    }
    print(f"\n{args.net}, {args.threads} threads, load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print(table(rows))
    K.merge_json(Path(args.out), "trajectories", result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

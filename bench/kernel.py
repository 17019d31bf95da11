"""Binary conv kernel vs FP32 conv on this CPU, per conv shape and for one full denoising step.

    python bench/kernel.py                 # ~3-5 min: DDIM CIFAR-10 UNet + tiny UNet shapes, batch 1 and 64
    python bench/kernel.py --quick         # < 1 min: batch 1 and 8, fewer repeats
    python bench/kernel.py --threads 2 --batch 64 --out bench/out/kernel.json

Per conv: every distinct binarized 3x3 conv (Cin, Cout, H, W, stride, padding) of the UNet's forward, FP32
``F.conv2d`` (x, weight, bias) against the packed path = bit-packing of the input codes + the XNOR-popcount kernel
(the sign itself, which both the fake-binary and the packed model compute, is outside both timings). ``share`` is
the fraction of the packed time spent packing. ``all 3x3`` weights each shape by how often the forward runs it.

Full step: one ``model(x, t)`` of the FP UNet (default DDIM CIFAR-10 config) vs the same UNet after ``binarize_`` +
``bidm.export.pack_`` (``--method``, default xnor and bidm), whole network, at batch 1 and the sampling batch (batch 1
only with --quick), and a profile of where the packed step's time goes: ``sign`` (each layer's ``quantize_input``),
``pack`` (bit-packing), ``popcount gemm`` (the kernel), ``postprocess`` (scales, K map, shortcut, ...), and the rest
of the network (FP convs, GroupNorm, SiLU, attention matmuls).

glibc's malloc is tuned with ``mallopt`` to keep large freed blocks (see `tune_malloc`; ``--no-mallopt`` to skip).
Timings are the minimum over repeats (the machine is shared; the minimum is the least disturbed run); the medians
and the 1-minute load average are in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.export import kernels, pack
from bidm.unet import DDIMUNet, UNetConfig, tiny_unet_config

FP_KEPT = ("conv_in", "conv_out", "nin_shortcut")


def timeit(fn, reps: int, min_time: float = 0.0) -> tuple[float, float]:
    """(min, median) seconds over ``reps`` calls after one warm-up, repeating until ``min_time`` has passed."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 20 * reps:
            break
    return min(times), statistics.median(times)


def conv_shapes(cfg: UNetConfig) -> list[dict]:
    """Distinct binarized 3x3 convs of one forward, with how many times each runs."""
    model = DDIMUNet(cfg).eval()
    found: dict[tuple, dict] = {}

    def hook(name):
        def record(mod, inputs, out):
            x = inputs[0]
            key = (mod.in_channels, mod.out_channels, x.shape[2], x.shape[3], mod.stride[0], mod.padding[0])
            entry = found.setdefault(key, {"count": 0, "example": name})
            entry["count"] += 1

        return record

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3) and not name.endswith(FP_KEPT):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.randn(1, cfg.in_channels, cfg.resolution, cfg.resolution), torch.tensor([500]))
    return [dict(zip(("cin", "cout", "h", "w", "stride", "padding"), k), **v) for k, v in found.items()]


def bench_conv(shape: dict, batch: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    cin, cout, h, w, s, p = (shape[k] for k in ("cin", "cout", "h", "w", "stride", "padding"))
    x = torch.randn(batch, cin, h, w, generator=gen)
    codes = torch.where(x >= 0, 1.0, -1.0)
    weight = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
    bias = torch.zeros(cout)
    packed = kernels.KernelWeight(pack.pack_conv_weight(torch.where(weight >= 0, 1.0, -1.0)), cin)
    a_words = kernels.pack_activation(codes)

    def binary():
        return kernels.binary_conv2d(kernels.pack_activation(codes), packed, (s, s), (p, p))

    min_time = 0.05 if batch == 1 else 0.0
    with torch.no_grad():
        fp = timeit(lambda: F.conv2d(x, weight, bias, s, p), reps, min_time)
        bn = timeit(binary, reps, min_time)
        pk = timeit(lambda: kernels.pack_activation(codes), reps, min_time)
        gemm = timeit(lambda: kernels.binary_conv2d(a_words, packed, (s, s), (p, p)), reps, min_time)
    macs = batch * cout * cin * 9 * ((h + 2 * p - 3) // s + 1) * ((w + 2 * p - 3) // s + 1)
    return {
        **shape,
        "batch": batch,
        "macs": macs,
        "fp_ms": fp[0] * 1e3,
        "packed_ms": bn[0] * 1e3,
        "pack_ms": pk[0] * 1e3,
        "gemm_ms": gemm[0] * 1e3,
        "fp_median_ms": fp[1] * 1e3,
        "packed_median_ms": bn[1] * 1e3,
        "speedup": fp[0] / bn[0],
        "fp_gmacs": macs / fp[0] / 1e9,
        "binary_gmacs": macs / bn[0] / 1e9,
    }


def conv_table(rows: list[dict]) -> str:
    lines = [
        "| net | Cin→Cout | HxW | s | ×/fwd | batch | FP32 ms | packed ms | pack share | speed-up | bGMAC/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['cin']}→{r['cout']} | {r['h']}x{r['w']} | {r['stride']} | {r['count']} | {r['batch']} "
            f"| {r['fp_ms']:.2f} | {r['packed_ms']:.2f} | {r['pack_ms'] / r['packed_ms']:.0%} "
            f"| **{r['speedup']:.1f}x** | {r['binary_gmacs']:.0f} |"
        )
    return "\n".join(lines)


def totals(rows: list[dict]) -> list[dict]:
    """Per (net, batch): all binarized 3x3 convs of one forward, each shape weighted by its count."""
    out = []
    for key in sorted({(r["net"], r["batch"]) for r in rows}):
        sel = [r for r in rows if (r["net"], r["batch"]) == key]
        fp = sum(r["fp_ms"] * r["count"] for r in sel)
        bn = sum(r["packed_ms"] * r["count"] for r in sel)
        out.append({"net": key[0], "batch": key[1], "fp_ms": fp, "packed_ms": bn, "speedup": fp / bn})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Full denoising step


def bench_steps(cfg: UNetConfig, method: str, batches: list[int], reps: int) -> list[dict]:
    """One ``model(x, t)`` of the FP UNet vs the packed student, per batch size, with the packed profile."""
    try:
        from bidm.binarize import binarize_
        from bidm.export import pack_
        from bidm.export.timing import profile_packed
    except ImportError as err:
        print(f"full step skipped: {err}", file=sys.stderr)
        return []
    fp_model = DDIMUNet(cfg).eval()
    student = copy.deepcopy(fp_model)
    binarize_(student, method)
    pack_(student.eval())
    out = []
    for batch in batches:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=gen)
        t = torch.full((batch,), 500, dtype=torch.long)
        with torch.no_grad():
            fp = timeit(partial(fp_model, x, t), reps)
            pk = timeit(partial(student, x, t), reps)
            prof = profile_packed(student, x, t)
        out.append(
            {
                "method": method,
                "batch": batch,
                "fp_ms": fp[0] * 1e3,
                "packed_ms": pk[0] * 1e3,
                "fp_median_ms": fp[1] * 1e3,
                "packed_median_ms": pk[1] * 1e3,
                "speedup": fp[0] / pk[0],
                "profile_ms": prof,
            }
        )
    return out


def tune_malloc() -> bool:
    """Keep freed large blocks in the heap (glibc ``mallopt``), as a jemalloc/tcmalloc deployment would.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each op on a
    batch-64 activation page-faults its whole output again (measured here: ``x + 1`` on a 64x128x32x32 tensor
    22 ms -> 2.3 ms with this). It slows the FP and the packed model alike, the packed one more (it runs more
    element-wise ops per layer). Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        big = 1 << 30
        return bool(libc.mallopt(m_mmap_threshold, big)) and bool(libc.mallopt(m_trim_threshold, 2 * big))
    except (OSError, AttributeError):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, fewer repeats (< 1 min)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="sampling batch (default 64, --quick 8)")
    parser.add_argument(
        "--method",
        default=None,
        help="comma-separated methods of the full-step benchmark (default xnor,bidm; --quick xnor)",
    )
    parser.add_argument("--no-step", action="store_true", help="per-conv table only")
    parser.add_argument("--no-mallopt", action="store_true", help="keep glibc's default large-block policy")
    parser.add_argument("--out", default="bench/out/kernel.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    mallopt = False if args.no_mallopt else tune_malloc()
    batch = args.batch or (8 if args.quick else 64)
    reps = 3 if args.quick else 5
    info = kernels.kernel_info()
    print(f"# Binary conv kernel vs FP32 conv ({platform.processor() or platform.machine()}, {args.threads} threads)")
    print(f"kernel: {info.get('backend')} {info.get('flags', info.get('reason', ''))}; malloc tuned: {mallopt}\n")

    nets = {"ddim-cifar10": UNetConfig(), "tiny": tiny_unet_config()}
    rows = []
    for net, cfg in nets.items():
        shapes = conv_shapes(cfg)
        for b in (1, batch):
            for shape in shapes:
                rows.append({"net": net, **bench_conv(shape, b, reps)})
    print(conv_table(rows))
    tot = totals(rows)
    print("\nAll binarized 3x3 convs of one forward (shape time x count):\n")
    print("| net | batch | FP32 ms | packed ms | speed-up |\n|---|---|---|---|---|")
    for r in tot:
        print(f"| {r['net']} | {r['batch']} | {r['fp_ms']:.1f} | {r['packed_ms']:.1f} | **{r['speedup']:.2f}x** |")

    steps = []
    if not args.no_step:
        methods = (args.method or ("xnor" if args.quick else "xnor,bidm")).split(",")
        for method in methods:
            steps += bench_steps(nets["ddim-cifar10"], method, [1] if args.quick else [1, batch], 2)
        if steps:
            print("\nOne full denoising step `model(x, t)`, DDIM CIFAR-10 UNet (35.7 M params):\n")
            print(
                "| method | batch | FP32 ms | packed ms | speed-up | packed profile (ms) |\n|---|---|---|---|---|---|"
            )
            for s in steps:
                prof = ", ".join(f"{k} {v:.0f}" for k, v in s["profile_ms"].items())
                print(
                    f"| {s['method']} | {s['batch']} | {s['fp_ms']:.0f} | {s['packed_ms']:.0f} "
                    f"| **{s['speedup']:.2f}x** | {prof} |"
                )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "malloc_tuned": mallopt,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "kernel": info,
        "convs": rows,
        "conv_totals": tot,
        "steps": steps,
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Binary conv kernel vs FP32 conv on this CPU, per conv shape and for one full denoising step.

    python bench/kernel.py                 # ~3-5 min: DDIM CIFAR-10 UNet + tiny UNet shapes, batch 1 and 64
    python bench/kernel.py --quick         # < 1 min: batch 1 and 8, fewer repeats
    python bench/kernel.py --threads 2 --batch 64 --out bench/out/kernel.json

Per conv: every distinct binarized 3x3 conv (Cin, Cout, H, W, stride, padding) of the UNet's forward, FP32
``F.conv2d`` (x, weight, bias) on an NCHW input against the fused packed conv on the same values stored channels
last (as the packed model holds them): the input pass (threshold, sign, bit-pack, mean|x|) + the XNOR-popcount
kernel with its epilogue (alpha, K map, bias), FP input to FP output. ``pack share`` is the fraction of the packed
time in the input pass. ``all 3x3`` weights each shape by how often the forward runs it.

Full step: one ``model(x, t)`` of the FP UNet (default DDIM CIFAR-10 config) vs the same UNet after ``binarize_`` +
``bidm.export.pack_`` (``--method``, default xnor and bidm), whole network, at batch 1 and the sampling batch (batch 1
only with --quick), and a profile of where the packed step's time goes: ``sign`` (each layer's ``quantize_input``),
``pack`` (bit-packing), ``popcount gemm`` (the kernel), ``postprocess`` (scales, K map, shortcut, ...), and the rest
of the network (FP convs, GroupNorm, SiLU, attention matmuls).

``--bf16-reference`` also times the FP UNet under bfloat16 autocast: on CPUs with AMX or AVX-512-BF16, oneDNN's
bf16 convs are a second, faster dense baseline a user may pick instead of FP32 (the goals are against FP32).

``BIDM_FUSED=0`` runs the full step through the generic (unfused, NCHW) packed path, for an A/B of the fusion.
glibc's malloc is tuned with ``mallopt`` to keep large freed blocks (see `tune_malloc`; ``--no-mallopt`` to skip).
Timings are the minimum over repeats (the machine is shared; the minimum is the least disturbed run); the medians
and the 1-minute load average are in the JSON. The full step interleaves its FP32 and packed repeats (``--step-reps``,
default 5; 4x that at batch 1), so both see the same machine state.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import subprocess
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
ROOT = Path(__file__).resolve().parent.parent


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


def timeit_pair(fn_a, fn_b, reps: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``timeit`` of two callables with their repeats interleaved (a, b, a, b, ...), so that a slow spell of a shared
    machine hits both alike: ((min, median) of a, (min, median) of b) in seconds."""
    fn_a(), fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, acc in zip((fn_a, fn_b), times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return tuple((min(t), statistics.median(t)) for t in times)


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
    """FP32 ``F.conv2d(x, w, b)`` against the fused packed conv on the same FP input: input pass (threshold, sign,
    pack, mean|x|) + popcount GEMM with its epilogue (alpha, K map, bias), through the prepared C calls
    (`bidm.export.kernels.PreparedConv`) a packed BiDM/XNOR layer runs."""
    gen = torch.Generator().manual_seed(0)
    cin, cout, h, w, s, p = (shape[k] for k in ("cin", "cout", "h", "w", "stride", "padding"))
    x = torch.randn(batch, cin, h, w, generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last)  # the packed model's activations are channels last
    weight = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
    bias = torch.zeros(cout)
    shift = 0.01 * torch.randn(cin, generator=gen)
    packed = kernels.KernelWeight(pack.pack_conv_weight(torch.where(weight >= 0, 1.0, -1.0)), cin)
    a_words, mean = kernels.pack_input(x_cl, shift, absmean=True)
    alpha, k_weight = weight.abs().mean((1, 2, 3)), torch.full((1, 1, 3, 3), 1 / 9)

    def epilogue(mean):
        return kernels.Epilogue(alpha, None, bias, None, 1.0, mean, k_weight, 0.1)

    plan = kernels.PreparedConv(packed, (s, s), (p, p), "pm1", alpha, bias, shift, k_weight, 0.1, 1.0)
    with torch.no_grad():  # the prepared calls give the general calls' values
        general = kernels.binary_conv2d(a_words, packed, (s, s), (p, p), epilogue=epilogue(mean), channels_last=True)
        assert torch.equal(plan.gemm(*plan.pack(x_cl), None), general)

    def binary():
        return plan.gemm(*plan.pack(x_cl), None)

    min_time = 0.05 if batch == 1 else 0.0
    with torch.no_grad():
        fp = timeit(lambda: F.conv2d(x, weight, bias, s, p), reps, min_time)
        bn = timeit(binary, reps, min_time)
        pk = timeit(lambda: plan.pack(x_cl), reps, min_time)
        gemm = timeit(lambda: plan.gemm(a_words, mean, None), reps, min_time)
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


def _bf16(fn):
    """``fn`` under CPU autocast to bfloat16 (oneDNN runs its convs and matmuls on AMX/AVX-512-BF16 where present)."""

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return run


def bench_steps(cfg: UNetConfig, method: str, batches: list[int], reps: int, bf16: bool = False) -> list[dict]:
    """One ``model(x, t)`` of the FP UNet vs the packed student, per batch size, with the packed profile; with
    ``bf16`` also the FP UNet under bfloat16 autocast, as a second reference (not the issue's FP32 baseline)."""
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
            # batch 1 costs ~1/40 of batch 64 and swings more on a shared machine: 4x the repeats
            fp, pk = timeit_pair(partial(fp_model, x, t), partial(student, x, t), reps * (4 if batch == 1 else 1))
            prof = profile_packed(student, x, t)
            ref = None
            if bf16:
                fp_bf16 = _bf16(partial(fp_model, x, t))
                fp16 = timeit(fp_bf16, reps)
                y32, y16 = fp_model(x, t), fp_bf16().float()
                p32, p16 = student(x, t), _bf16(partial(student, x, t))().float()  # its FP parts in bf16
                ref = {"fp_bf16_ms": fp16[0] * 1e3, "fp_bf16_rel_err": float((y16 - y32).norm() / y32.norm()),
                       "speedup_vs_bf16": fp16[0] / pk[0],
                       "packed_bf16_rel_err": float((p16 - p32).norm() / p32.norm())}  # fmt: skip
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
                **(ref or {}),
            }
        )
    return out


def code_version() -> dict:
    """{"commit": HEAD, "dirty": uncommitted changes to tracked files outside bench/results/} (None where git is
    unavailable): the benches write their rows there, so a second bench into the same file is still clean code."""

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine() -> str:
    return f"{kernels.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def merge_json(path: Path, key: str, value: dict) -> None:
    """Set ``path[key] = value`` (other keys kept; a file from before this layout is replaced), atomically."""
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
        if not isinstance(data, dict) or "convs" in data:  # the old single-section layout
            data = {}
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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
    parser.add_argument("--no-conv", action="store_true", help="full step only")
    parser.add_argument(
        "--bf16-reference", action="store_true", help="also time the FP UNet under bfloat16 autocast (full step)"
    )
    parser.add_argument("--step-reps", type=int, default=5, help="full-step repeats (FP32 and packed interleaved)")
    parser.add_argument("--no-mallopt", action="store_true", help="keep glibc's default large-block policy")
    parser.add_argument(
        "--out", default="bench/out/kernel.json", help="JSON file; its 'kernel' key is set (bench/results/kernel.json)"
    )
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
    for net, cfg in nets.items() if not args.no_conv else ():
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
            batches = [1] if args.quick else [1, batch]
            steps += bench_steps(nets["ddim-cifar10"], method, batches, args.step_reps, bf16=args.bf16_reference)
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
            if args.bf16_reference:
                print("\nThe FP UNet under bfloat16 autocast, as a second reference:\n")
                print("| method | batch | FP bf16 ms | bf16 vs FP32 rel. err | packed vs bf16 | packed, bf16 FP err |")
                print("|---|---|---|---|---|---|")
                for s in steps:
                    print(f"| {s['method']} | {s['batch']} | {s['fp_bf16_ms']:.0f} | {s['fp_bf16_rel_err']:.2e} "
                          f"| {s['speedup_vs_bf16']:.2f}x | {s['packed_bf16_rel_err']:.2e} |")  # fmt: skip

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **code_version(),
        "machine": machine(),
        "batch": batch,
        "cpu": kernels.cpu_model(),
        "threads": args.threads,
        "malloc_tuned": mallopt,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "kernel": info,
        "convs": rows,
        "conv_totals": tot,
        "steps": steps,
    }
    merge_json(out, "kernel", result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

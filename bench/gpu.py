"""One script for a GPU machine (at most ~8 minutes on one H200): every path on the device, timed.

    python bench/gpu.py                                  # full-size DDIM CIFAR-10 UNet, 300 steps each, on CUDA
    python bench/gpu.py --data-path cifar_subset.npz     # real images instead of the synthetic stand-in
    python bench/gpu.py --device cpu --smoke             # tiny UNet, 2 steps: the test suite's run of this script

It trains the FP teacher (the DDIM CIFAR-10 UNet shape: ch 128, mult 1-2-2-2, 2 res blocks, attention at 16x16,
35.7 M parameters) from scratch and its xnor and bidm students by distillation, each for ``--steps`` steps through
`bidm.train.run` (Accelerate; ``train.device``), samples every model with DDIM, then packs both students and samples
the packed files: on the CPU (the popcount kernels) and, on a GPU, on the device too (int8 GEMMs of the codes,
`bidm.export.int8_gemm`, with its parity against the fake-binary student). Reports per path: step time, peak
memory (CUDA allocator peak, or the process's peak RSS on CPU), sampling images/s, for the teacher also in FP16 and
bf16 autocast. Writes JSON (``--out``) and prints a Markdown table. Exits non-zero when any path fails; the error
is in the JSON. Data: ``--data-path`` (an ``.npz`` of uint8 ``images`` [N, H, W, 3]); by default synthetic smooth
random images (step time does not depend on their content).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

SMOKE_MODEL = ["model.ch=32", "model.ch_mult=[1, 2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
               "model.resolution=8", "data.size=8"]  # fmt: skip


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 RGB images (upsampled noise), [n, size, size, 3]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(size // 4, 1), max(size // 4, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def step_time(run_dir: Path) -> float:
    """Median logged step time, the first logged interval (warm-up, compilation) left out when there are more."""
    times = [json.loads(line)["step_time_s"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return statistics.median(times[1:] if len(times) > 1 else times)


def time_sampling(model, cfg, device, n: int, steps: int, dtype: str = "fp32") -> float:
    """Images/s of `bidm.sample.generate` (η = 1) for ``n`` images in one batch, after one warm-up batch."""
    from bidm.sample import generate

    def go(k):
        ctx = torch.autocast(device.type, dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])) \
            if dtype != "fp32" else torch.no_grad()  # fmt: skip
        with ctx:
            return generate(model, cfg, n=k, batch_size=k, steps=steps, eta=1.0, progress=False)

    go(min(n, 2))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    go(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny UNet, 2 steps, 2 images: checks every path quickly")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sample-n", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--data-path")
    p.add_argument("--methods", default="xnor,bidm")
    p.add_argument("--work", default="bench/out/gpu", help="run directories")
    p.add_argument("--out", default="bench/out/gpu.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (pass --device cpu for the CPU check)")
    if args.smoke:
        args.steps, args.batch_size, args.sample_n, args.sample_steps = 2, 4, 2, 2

    from bidm.config import load_config
    from bidm.export import export_model, load_packed
    from bidm.models import load_model
    from bidm.qat import train_student
    from bidm.train import train_teacher

    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_path) if args.data_path else work / "synthetic.npz"
    size = 8 if args.smoke else 32
    if not args.data_path:
        np.savez(data, images=synthetic_images(256 if args.smoke else 2048, size))
    common = ["data.name=npz", f"data.path={data}", "data.channels=3", f"train.device={args.device}",
              f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.ckpt_every={args.steps}",
              f"train.log_every={1 if args.smoke else 25}", *(SMOKE_MODEL if args.smoke else [])]  # fmt: skip
    rows, failed = [], False

    def record(path: str, fn):
        nonlocal failed
        reset_peak(device)
        start = time.perf_counter()
        row = {"path": path}
        try:
            row.update(fn())
        except Exception as err:  # every path is tried; the script fails at the end
            failed = True
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        row["wall_s"] = round(time.perf_counter() - start, 2)
        row["peak_mib"] = round(peak_memory_mib(device), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    teacher_dir = work / "teacher"

    def teacher():
        cfg = load_config(None, [*common, f"out_dir={teacher_dir}", "train.lr=2e-4"])
        train_teacher(cfg, resume=(teacher_dir / "checkpoint.safetensors").exists())
        model, cfg = load_model(teacher_dir)
        model.to(device)
        out = {"step_s": step_time(teacher_dir), "img_per_s_fp32": time_sampling(model, cfg, device, args.sample_n,
                                                                                    args.sample_steps)}  # fmt: skip
        if device.type == "cuda":
            for dtype in ("fp16", "bf16"):
                out[f"img_per_s_{dtype}"] = time_sampling(model, cfg, device, args.sample_n, args.sample_steps, dtype)
        return out

    record("teacher", teacher)
    for method in args.methods.split(","):
        run_dir = work / method

        def student(run_dir=run_dir, method=method):
            cfg = load_config(None, [*common, f"out_dir={run_dir}", "train.lr=5e-4", f"binarize.method={method}",
                                     f"binarize.teacher={teacher_dir}"])  # fmt: skip
            train_student(cfg, resume=(run_dir / "checkpoint.safetensors").exists())
            model, cfg = load_model(run_dir)
            model.to(device)
            return {"step_s": step_time(run_dir),
                    "img_per_s_fp32": time_sampling(model, cfg, device, args.sample_n, args.sample_steps)}  # fmt: skip

        def packed(run_dir=run_dir):
            from bidm.config import to_dict

            model, cfg = load_model(run_dir)
            report = export_model(model, run_dir / "packed.safetensors", to_dict(cfg))
            model, cfg = load_packed(run_dir / "packed.safetensors")  # CPU bit kernels
            speed = time_sampling(model, cfg, torch.device("cpu"), args.sample_n, args.sample_steps)
            out = {"packed_bytes": report.get("file_bytes"), "device": "cpu", "img_per_s": speed}
            if device.type != "cpu":  # the packed model on the device: int8 GEMMs of the codes (export.int8_gemm)
                fake, _ = load_model(run_dir)
                model, fake = model.to(device), fake.to(device).eval()
                x = torch.randn(8, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution, device=device)
                t = torch.full((8,), 500, device=device, dtype=torch.long)
                with torch.no_grad():
                    ref = fake(x, t)
                    diff = (model(x, t) - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                out.update(img_per_s_device=time_sampling(model, cfg, device, args.sample_n, args.sample_steps),
                           max_rel_diff_device=diff)  # fmt: skip
                if diff > 1e-3:
                    raise RuntimeError(f"packed model on {device} differs from the fake-binary one: rel {diff:.2e}")
            return out

        record(method, student)
        record(f"{method} packed", packed)

    result = {
        "script": "bench/gpu.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sample": {"n": args.sample_n, "steps": args.sample_steps, "eta": 1.0},
        "rows": rows,
        "ok": not failed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n| path | step s | peak MiB | img/s fp32 | img/s fp16 | img/s bf16 | packed img/s (CPU) | packed img/s "
          "(device) | error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        keys = ("step_s", "peak_mib", "img_per_s_fp32", "img_per_s_fp16", "img_per_s_bf16", "img_per_s",
                "img_per_s_device")  # fmt: skip
        cells = [r["path"], *(r.get(k) for k in keys), r.get("error", "")]
        print("| " + " | ".join("" if c is None else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells)
              + " |")  # fmt: skip
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

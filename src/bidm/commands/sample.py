"""`bidm sample`: DDIM samples from a trained run (FP, binarized, or a packed export) as .npz + PNG grid, with a
``samples.json`` record of how they were made (source, sampler settings, weights, processes, time)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bidm.commands.common import add_force_arg, check_outputs, count, nonnegative, nonnegative_int


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample a trained model with DDIM", description=__doc__)
    p.add_argument("model", help="run directory / checkpoint.safetensors, or a packed .safetensors from `bidm export`")
    p.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=count,
        help="number of images (default: sample.n of the run's config); under torchrun write "
        "--num-samples (torchrun's own parser takes --n for its --nnodes)",
    )
    p.add_argument("--batch-size", type=count)
    p.add_argument("--steps", type=count, help="DDIM steps (default: sample.steps of the run's config)")
    p.add_argument("--eta", type=nonnegative)
    p.add_argument("--skip", choices=["uniform", "quad"])
    p.add_argument("--seed", type=nonnegative_int, help="x_T seed; the same seed gives every model the same x_T")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", help="output directory (default: the run directory)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (default): this process's accelerator device (CUDA under `torchrun`/`accelerate "
        "launch`, else CPU) for checkpoints, the CPU (popcount kernels) for packed files; or cpu, cuda, cuda:N "
        "(a packed file on CUDA runs int8 GEMMs of its codes)",
    )
    add_force_arg(p)
    p.set_defaults(func=main)


def load_any(path: str, use_ema: bool = True):
    """A bidm checkpoint or a packed export -> (model, config)."""
    from bidm.models import load_model

    p = Path(path)
    if p.is_file() and p.name != "checkpoint.safetensors":
        from bidm.export import is_packed_file, load_packed

        if is_packed_file(p):
            return load_packed(p)
    return load_model(path, use_ema=use_ema)


def speed_line(model, n: int, seconds: float) -> str:
    """``sampling: N images in S s = R images/s (packed XNOR-popcount kernel: c, 2 threads)``."""
    import torch

    from bidm.export import is_packed, kernel_info

    packed = any(is_packed(m) for m in model.modules())
    on_cpu = next(model.buffers(), torch.zeros(())).device.type == "cpu"
    kind = "PyTorch"
    if packed:
        kind = f"packed XNOR-popcount kernel: {kernel_info()['backend']}" if on_cpu else "packed, int8 GEMM"
    rate = n / seconds if seconds > 0 else float("inf")
    return f"sampling: {n} images in {seconds:.2f} s = {rate:.2f} images/s ({kind}, {torch.get_num_threads()} threads)"


def main(args) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from bidm.checkpoint import resolve
    from bidm.config import updated
    from bidm.fileio import atomic_write_text
    from bidm.npz_io import save_grid, save_samples_npz
    from bidm.sample import generate

    # the process group of `torchrun` / `accelerate launch`, or a single process
    state = PartialState(cpu=not torch.cuda.is_available())
    src = Path(args.model)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    check_outputs([out / "samples.npz", out / "samples.png", out / "samples.json"], [resolve(src)], force=args.force)
    model, cfg = load_any(args.model, use_ema=not args.raw)
    from bidm.export import is_packed

    packed = any(is_packed(m) for m in model.modules())
    model = model.to(pick_device(args.device, state, packed=packed))
    rank, world = state.process_index, state.num_processes
    start = time.perf_counter()
    images = generate(
        model,
        cfg,
        n=args.n,
        batch_size=args.batch_size,
        steps=args.steps,
        eta=args.eta,
        skip=args.skip,
        seed=args.seed,
        progress=state.is_main_process,
        rank=rank,
        world=world,
    )
    seconds = time.perf_counter() - start
    if world > 1:  # chunk k was made by process k mod world: interleave the processes' chunks back into order
        parts = sorted(gather_object([(rank, images)]), key=lambda x: x[0])
        images = interleave([p for _, p in parts], args.batch_size or cfg.sample.batch_size)
    if state.is_main_process:
        save_samples_npz(out / "samples.npz", images)
        save_grid(images[:64], out / "samples.png")
        s = updated(cfg.sample, "sample", n=args.n, steps=args.steps, eta=args.eta, skip=args.skip, seed=args.seed)
        record = provenance(src, s, n=len(images), ema=not args.raw, packed=packed, world=world, seconds=seconds)
        atomic_write_text(out / "samples.json", json.dumps(record, indent=2))
        print(f"{len(images)} samples ({world} process{'es' if world > 1 else ''}): {out / 'samples.npz'}, "
              f"grid: {out / 'samples.png'}")  # fmt: skip
        print(speed_line(model, len(images), seconds))
    state.wait_for_everyone()
    # a gloo group left alive at interpreter exit can abort a rank ("terminate called without an active exception")
    state.destroy_process_group()
    return 0


def provenance(src: Path, settings, *, n: int, ema: bool, packed: bool, world: int, seconds: float) -> dict:
    """What ``samples.json`` records: enough to remake the images (the x_T of image i depends only on the seed)."""
    return {
        "source": str(src.resolve()),
        "packed": packed,
        "weights": "packed" if packed else ("ema" if ema else "raw"),
        "n": n,
        "steps": settings.steps,
        "eta": settings.eta,
        "skip": settings.skip,
        "clip_x0": settings.clip_x0,
        "seed": settings.seed,
        "processes": world,
        "seconds": round(seconds, 3),
    }


def pick_device(choice: str, state, *, packed: bool):
    """The device to sample on: ``auto`` is the process's accelerator device, except packed files (the CPU popcount
    kernels; they run elsewhere only when asked, by `bidm.export.int8_gemm`)."""
    import torch

    from bidm.errors import BidmError

    if choice == "auto":
        return torch.device("cpu") if packed else state.device
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BidmError(f"--device {choice}: CUDA is not available here")
    return device


def interleave(parts, batch_size: int):
    """Process r's images are chunks r, r + W, ... of ``batch_size`` images each: merge them into chunk order."""
    import numpy as np

    world = len(parts)
    split = [[p[i : i + batch_size] for i in range(0, len(p), batch_size)] for p in parts]
    ordered = [split[k % world][k // world] for k in range(sum(len(s) for s in split))]
    return np.concatenate(ordered)

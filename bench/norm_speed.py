"""GroupNorm + SiLU of the DDIM CIFAR-10 UNet: torch NCHW (the FP model), torch channels last (the packed model
before `bidm.export.norm`), and the packed runtime's fused channels-last kernel.

    python bench/norm_speed.py --threads 2 --out bench/results/kernel.json     # ~1 min; sets the "norms" key
    python bench/norm_speed.py --quick                                          # tiny UNet, batch 1 and 2

Every distinct GroupNorm input shape of one forward, with how often the forward runs it; each row times
``F.silu(norm(x), inplace=True)`` on an NCHW input and on the same values channels last, and
``PackedGroupNorm(x, silu=True)``. Minimum over repeats, as in ``bench/kernel.py``; the last column is the largest
absolute difference between the fused result and torch's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel as K  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bidm.export import kernels  # noqa: E402
from bidm.export.norm import convert_norms_  # noqa: E402
from bidm.unet import DDIMUNet, UNetConfig, tiny_unet_config  # noqa: E402


def norm_shapes(cfg: UNetConfig) -> list[dict]:
    """Distinct (channels, groups, H, W) of the GroupNorms one forward runs, with counts."""
    model = DDIMUNet(cfg).eval()
    found: dict[tuple, int] = {}

    def record(mod, inputs):
        key = (mod.num_channels, mod.num_groups, *inputs[0].shape[2:])
        found[key] = found.get(key, 0) + 1

    for mod in model.modules():
        if isinstance(mod, nn.GroupNorm):
            mod.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.randn(1, cfg.in_channels, cfg.resolution, cfg.resolution), torch.tensor([500]))
    return [dict(zip(("c", "groups", "h", "w"), k), count=n) for k, n in found.items()]


def bench_norm(shape: dict, batch: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    c, h, w = shape["c"], shape["h"], shape["w"]
    norm = nn.GroupNorm(shape["groups"], c, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(c, generator=gen))
        norm.bias.add_(0.1 * torch.randn(c, generator=gen))
    fused = convert_norms_(nn.Sequential(nn.GroupNorm(shape["groups"], c, eps=1e-6)))[0]
    fused.load_state_dict(norm.state_dict())
    x = torch.randn(batch, c, h, w, generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    min_time = 0.05 if batch == 1 else 0.0
    with torch.no_grad():
        nchw = K.timeit(lambda: F.silu(norm(x), inplace=True), reps, min_time)
        cl = K.timeit(lambda: F.silu(norm(x_cl), inplace=True), reps, min_time)
        ours = K.timeit(lambda: fused(x_cl, silu=True), reps, min_time)
        err = float((fused(x_cl, silu=True) - F.silu(norm(x_cl))).abs().max())
    return {**shape, "batch": batch, "torch_nchw_ms": nchw[0] * 1e3, "torch_cl_ms": cl[0] * 1e3,
            "fused_ms": ours[0] * 1e3, "speedup_vs_cl": cl[0] / ours[0], "max_abs_diff": err}  # fmt: skip


def norm_table(rows: list[dict]) -> str:
    head = "| C | groups | HxW | ×/fwd | batch | torch NCHW ms | torch chan.-last ms | fused ms | vs channels-last |"
    lines = [head + " max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['c']} | {r['groups']} | {r['h']}x{r['w']} | {r['count']} | {r['batch']} "
                     f"| {r['torch_nchw_ms']:.2f} | {r['torch_cl_ms']:.2f} | {r['fused_ms']:.2f} "
                     f"| **{r['speedup_vs_cl']:.2f}x** | {r['max_abs_diff']:.1e} |")  # fmt: skip
    per_fwd = {}
    for r in rows:
        acc = per_fwd.setdefault(r["batch"], [0.0, 0.0, 0.0])
        for i, key in enumerate(("torch_nchw_ms", "torch_cl_ms", "fused_ms")):
            acc[i] += r[key] * r["count"]
    lines.append("\nAll GroupNorm + SiLU of one forward (time x count): " + "; ".join(
        f"batch {b}: torch NCHW {v[0]:.1f} ms, torch channels last {v[1]:.1f} ms, fused {v[2]:.1f} ms"
        for b, v in per_fwd.items()) + ".")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny UNet, batch 1 and 2, one repeat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="bench/out/kernel.json", help="JSON file; its 'norms' key is set")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mallopt = K.tune_malloc()
    if kernels.backend() != "c":
        print("norm_speed: the compiled kernel is unavailable; nothing to time", file=sys.stderr)
        return 1
    cfg = tiny_unet_config() if args.quick else UNetConfig()
    batches, reps = ((1, 2), 1) if args.quick else ((1, args.batch), 5)
    rows = [bench_norm(s, b, reps) for b in batches for s in norm_shapes(cfg)]
    print(norm_table(rows))
    K.merge_json(Path(args.out), "norms", {**K.code_version(), "machine": K.machine(), "threads": args.threads,
                 "malloc_tuned": mallopt, "loadavg_1min": os.getloadavg()[0], "net": "tiny" if args.quick else
                 "ddim-cifar10", "rows": rows})  # fmt: skip
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

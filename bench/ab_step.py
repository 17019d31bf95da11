"""A/B of one runtime switch on the packed model's full denoising step, interleaved in one process.

    python bench/ab_step.py --switch BIDM_PREPARED --batch 1 --out bench/results/kernel_ab.json
    python bench/ab_step.py --switch BIDM_FUSED_NORM --batch 64 --rounds 3 --calls 2

The packed runtime reads its switches (``BIDM_FUSED``, ``BIDM_FUSED_NORM``, ``BIDM_PREPARED``) at every call, so one
process can time the same model with the switch on and off in turn: ``--rounds`` rounds of ``--calls`` steps with it
on ("1"), then ``--calls`` with it off ("0"). A slow spell of a shared machine then hits both sides alike, which
separate processes (or separate bench runs) do not guarantee. Reports the min and median per-step time of each side
and their ratio, and checks that both sides give the same output (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel as K  # noqa: E402
import torch  # noqa: E402

from bidm.binarize import binarize_  # noqa: E402
from bidm.export import pack_  # noqa: E402
from bidm.unet import DDIMUNet, UNetConfig, tiny_unet_config  # noqa: E402

SWITCHES = ("BIDM_FUSED", "BIDM_FUSED_NORM", "BIDM_PREPARED", "BIDM_SKIP_CONCAT", "BIDM_FUSED_BLOCK")


def ab(model, x, t, switch: str, rounds: int, calls: int) -> dict:
    times: dict[str, list[float]] = {"1": [], "0": []}
    outs = {}
    saved = os.environ.get(switch)
    try:
        with torch.no_grad():
            for value in ("1", "0"):  # warm-up both sides (panels, plans, allocator)
                os.environ[switch] = value
                outs[value] = model(x, t)
            for _ in range(rounds):
                for value in ("1", "0"):
                    os.environ[switch] = value
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        model(x, t)
                        times[value].append(time.perf_counter() - t0)
    finally:
        if saved is None:
            os.environ.pop(switch, None)
        else:
            os.environ[switch] = saved
    on, off = (sorted(times[v]) for v in ("1", "0"))
    return {"on_min_ms": on[0] * 1e3, "on_median_ms": statistics.median(on) * 1e3, "off_min_ms": off[0] * 1e3,
            "off_median_ms": statistics.median(off) * 1e3, "speedup_min": off[0] / on[0],
            "speedup_median": statistics.median(off) / statistics.median(on), "n_per_side": len(on),
            "max_abs_diff": float((outs["1"] - outs["0"]).abs().max())}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switch", choices=SWITCHES, required=True)
    p.add_argument("--methods", default="xnor,bidm")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=10, help="steps per side per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the tiny UNet")
    p.add_argument("--out", default=None, help="JSON file; its 'ab' key gets one entry per (switch, batch)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mallopt = K.tune_malloc()
    cfg = tiny_unet_config() if args.quick else UNetConfig()
    rows = []
    print(f"| method | batch | {args.switch}=1 ms (min / median) | =0 ms | speed-up (min / median) | max abs diff |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = DDIMUNet(cfg).eval()
        binarize_(model, method)
        pack_(model)
        x = torch.randn(args.batch, cfg.in_channels, cfg.resolution, cfg.resolution)
        t = torch.full((args.batch,), 500, dtype=torch.long)
        r = {"method": method, "batch": args.batch, **ab(model, x, t, args.switch, args.rounds, args.calls)}
        rows.append(r)
        print(f"| {method} | {args.batch} | {r['on_min_ms']:.1f} / {r['on_median_ms']:.1f} "
              f"| {r['off_min_ms']:.1f} / {r['off_median_ms']:.1f} | {r['speedup_min']:.2f}x / "
              f"{r['speedup_median']:.2f}x | {r['max_abs_diff']:.1e} |")  # fmt: skip
    if args.out:
        path = Path(args.out)
        data = json.loads(path.read_text()) if path.is_file() else {}
        entry = {**K.code_version(), "machine": K.machine(), "threads": args.threads, "malloc_tuned": mallopt,
                 "loadavg_1min": os.getloadavg()[0], "net": "tiny" if args.quick else "ddim-cifar10",
                 "rounds": args.rounds, "calls": args.calls, "rows": rows}  # fmt: skip
        data.setdefault("ab", {})[f"{args.switch}@{args.batch}"] = entry
        K.merge_json(path, "ab", data["ab"])
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

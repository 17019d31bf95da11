"""How far a trained student's packed runtime is from its fake-binary model: relative eps error per t.

    python bench/packed_parity.py bench/out/quality_v2/bidm_s0 bench/out/quality_v2/xnor_s0

For each run: the fake-binary student (as trained) and a `bidm.export.pack_` copy, on the same 16 Gaussian inputs
at t = 999, 500 and 50: ||eps_packed - eps_fake|| / ||eps_fake|| for the default runtime (fused layers, channels
last, fused GroupNorm) and for the generic NCHW path (``BIDM_FUSED=0``). A flipped activation sign anywhere shows
as an error far above float rounding (~1e-7).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from bidm.export import pack_
from bidm.models import load_model


def parity(run: str, n: int, ts: list[int]) -> list[dict]:
    fake, cfg = load_model(run)
    fake.eval()
    packed = pack_(copy.deepcopy(fake))
    m = cfg.model
    x = torch.randn(n, m.in_channels, m.resolution, m.resolution, generator=torch.Generator().manual_seed(0))
    rows = []
    for t in ts:
        tt = torch.full((n,), t, dtype=torch.long)
        with torch.no_grad():
            ref = fake(x, tt)
            fused = packed(x, tt)
            os.environ["BIDM_FUSED"] = "0"
            try:
                generic = packed(x, tt)
            finally:
                os.environ.pop("BIDM_FUSED")
        rel = {k: float((y - ref).norm() / ref.norm()) for k, y in (("fused", fused), ("generic", generic))}
        rows.append({"run": run, "t": t, **rel})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--t", default="999,500,50")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| run | t | fused, channels last | generic NCHW |\n|---|---|---|---|")
    for run in args.runs:
        for r in parity(run, args.n, [int(v) for v in args.t.split(",")]):
            print(f"| {run} | {r['t']} | {r['fused']:.1e} | {r['generic']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

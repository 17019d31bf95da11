"""The bare popcount GEMM (no input pass, no epilogue) on a few binary 3x3 conv shapes, for micro-kernel A/B tests.

    python bench/gemm_micro.py --threads 2
    BIDM_CFLAGS="-DBIDM_MR=4" python bench/gemm_micro.py        # another pixel block
    BIDM_CFLAGS="-mno-avx512f" python bench/gemm_micro.py       # the AVX2 nibble-LUT kernel on an AVX-512 CPU
    BIDM_CFLAGS="-mno-avx512f -DBIDM_HARLEY_SEAL=1" python bench/gemm_micro.py   # AVX2 Harley-Seal instead
    python bench/gemm_micro.py --pixel-major 0,32768            # loop-order threshold A/B, interleaved in one process

Each build variant is compiled into the kernel cache under its own name. Prints the minimum over ``--reps`` runs
per shape (after one warm-up). ``--pixel-major`` instead times the kernel with its epilogue (alpha, K map, bias,
residual, channels last, as the fused layers call it) under each panel-size threshold of the pixel-major sweep
(`bidm_set_pixel_major_bytes`), in rounds that alternate the thresholds, and prints min / median per threshold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel as K  # noqa: E402
import torch  # noqa: E402

from bidm.export import kernels, pack  # noqa: E402

SHAPES = [(128, 128, 32, 16), (128, 128, 16, 64), (256, 256, 8, 64), (256, 256, 4, 64)]  # Cin, Cout, H=W, batch
AB_SHAPES = [(128, 128, 32, 64), (256, 128, 32, 64), (128, 256, 16, 64), (256, 256, 16, 64), (128, 128, 32, 1)]


def pixel_major_ab(thresholds: list[int], rounds: int) -> None:
    lib, gen = kernels.library(), torch.Generator().manual_seed(0)
    for cin, cout, hw, b in AB_SHAPES:
        words = pack.pack_codes(torch.where(torch.rand(b, hw, hw, cin, generator=gen) < 0.5, 1.0, -1.0), "pm1")
        w = torch.where(torch.rand(cout, cin, 3, 3, generator=gen) < 0.5, 1.0, -1.0)
        weight = kernels.KernelWeight(pack.pack_conv_weight(w), cin)
        res = torch.randn(b, cout, hw, hw).contiguous(memory_format=torch.channels_last) if cin == cout else None
        epi = kernels.Epilogue(torch.rand(cout), None, torch.rand(cout), res, 0.3, torch.rand(b, 1, hw, hw),
                               torch.rand(1, 1, 3, 3), 0.1)  # fmt: skip
        call = partial(kernels.binary_conv2d, words, weight, (1, 1), (1, 1), "pm1", epilogue=epi, channels_last=True)
        times: dict[int, list[float]] = {t: [] for t in thresholds}
        old = lib.bidm_set_pixel_major_bytes(thresholds[0])
        try:
            outs = []
            for t in thresholds:
                lib.bidm_set_pixel_major_bytes(t)
                outs.append(call())  # warm-up, and the same output under every order
            for _ in range(rounds):
                for t in thresholds:
                    lib.bidm_set_pixel_major_bytes(t)
                    for _ in range(3 if b > 1 else 50):
                        t0 = time.perf_counter()
                        call()
                        times[t].append(time.perf_counter() - t0)
        finally:
            lib.bidm_set_pixel_major_bytes(old)
        same = all(torch.equal(o, outs[0]) for o in outs)
        cells = "  ".join(f"{t} B: {min(v) * 1e3:.2f} / {statistics.median(v) * 1e3:.2f} ms" for t, v in times.items())
        print(f"  {cin}->{cout} 3x3 {hw}x{hw} batch {b} (min / median): {cells}  same output: {same}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--pixel-major", default=None, help="comma-separated panel-size thresholds (bytes) to A/B")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = kernels.kernel_info()
    if info["backend"] != "c":
        print(f"no compiled kernel: {info.get('reason')}", file=sys.stderr)
        return 1
    print(f"flags: {info['flags']}; avx512 {info['avx512']}, MR {info['mr']}, {args.threads} threads")
    if args.pixel_major:
        K.tune_malloc()
        pixel_major_ab([int(v) for v in args.pixel_major.split(",")], args.reps)
        return 0
    gen = torch.Generator().manual_seed(0)
    for cin, cout, hw, b in SHAPES:
        a = torch.where(torch.rand(b, hw, hw, cin, generator=gen) < 0.5, 1.0, -1.0)
        words = pack.pack_codes(a, "pm1")
        w = torch.where(torch.rand(cout, cin, 3, 3, generator=gen) < 0.5, 1.0, -1.0)
        weight = kernels.KernelWeight(pack.pack_conv_weight(w), cin)
        best, _ = K.timeit(partial(kernels.binary_conv2d, words, weight, padding=(1, 1)), args.reps)
        print(f"  {cin}->{cout} 3x3 {hw}x{hw} batch {b}: {best * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bare popcount GEMM (no input pass, no epilogue) on a few binary 3x3 conv shapes, for micro-kernel A/B tests.

    python bench/gemm_micro.py --threads 2
    BIDM_CFLAGS="-DBIDM_MR=4" python bench/gemm_micro.py        # another pixel block
    BIDM_CFLAGS="-mno-avx512f" python bench/gemm_micro.py       # the AVX2 nibble-LUT kernel on an AVX-512 CPU

Each build variant is compiled into the kernel cache under its own name. Prints the minimum over ``--reps`` runs
per shape (after one warm-up).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel as K  # noqa: E402
import torch  # noqa: E402

from bidm.export import kernels, pack  # noqa: E402

SHAPES = [(128, 128, 32, 16), (128, 128, 16, 64), (256, 256, 8, 64), (256, 256, 4, 64)]  # Cin, Cout, H=W, batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = kernels.kernel_info()
    if info["backend"] != "c":
        print(f"no compiled kernel: {info.get('reason')}", file=sys.stderr)
        return 1
    print(f"flags: {info['flags']}; avx512 {info['avx512']}, MR {info['mr']}, {args.threads} threads")
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

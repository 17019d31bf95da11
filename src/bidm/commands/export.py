"""`bidm export`: pack a trained binarized student into one safetensors file (1-bit weights as int64 words).

The packed model runs the XNOR/AND-popcount kernel in place of the float conv on the binary codes and equals the
fake-binary student (checked here on a random input). `bidm sample` accepts the file in place of a run directory.
"""

from __future__ import annotations

from bidm.commands.common import add_force_arg, check_outputs


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="pack a binarized student for the popcount runtime", description=__doc__)
    p.add_argument("--ckpt", required=True, help="student run directory or its checkpoint.safetensors")
    p.add_argument("--out", required=True, help="packed file to write, e.g. packed.safetensors")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--no-check", action="store_true", help="skip the parity check of packed vs fake-binary model")
    add_force_arg(p)
    p.set_defaults(func=main)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(args) -> int:
    import torch

    from bidm.checkpoint import resolve
    from bidm.config import to_dict
    from bidm.errors import BidmError
    from bidm.export import export_model, kernel_info
    from bidm.models import load_model

    check_outputs([args.out], [resolve(args.ckpt)], force=args.force)
    model, cfg = load_model(args.ckpt, use_ema=not args.raw)
    if cfg.binarize.method == "none":
        raise BidmError(f"{args.ckpt} is a full-precision model: there is nothing to pack (binarize it first)")
    example = None
    if not args.no_check:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution, generator=gen)
        example = (x, torch.tensor([999, 500]))
    report = export_model(model, args.out, to_dict(cfg), example=example)
    ckpt_bytes = resolve(args.ckpt).stat().st_size
    print(f"packed {cfg.binarize.method} model: {args.out}")
    print(f"  file               {_mib(report['file_bytes'])}")
    print(f"  dense FP32         {_mib(report['fp32_bytes'])}  ({report['compression_vs_fp32']:.1f}x smaller packed)")
    print(f"  theoretical 1-bit  {_mib(report['theoretical_bytes'])}  (binarized weights at 1 bit, the rest FP32)")
    if "summary_bytes" in report:
        print(
            f"  bidm.summary (1b) {_mib(report['summary_bytes'])} binarized vs "
            f"{_mib(report['summary_fp32_bytes'])} FP32 reference"
        )
    print(f"  student checkpoint {_mib(ckpt_bytes)}  (with EMA / optimizer state)")
    print(f"  kernel             {kernel_info()['backend']}")
    if example is not None:
        print(f"  parity             max |packed - fake-binary| = {report['max_abs_diff']:.3g} "
              f"({report['max_rel_diff']:.2g} of max |eps|)")  # fmt: skip
        if report["max_rel_diff"] > 1e-4:
            raise BidmError(f"the packed model differs from the student by {report['max_rel_diff']:.2g} (> 1e-4)")
    return 0

"""`bidm train`: train a full-precision diffusion UNet (the teacher)."""

from __future__ import annotations

from bidm.commands.common import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an FP diffusion UNet (teacher)", description=__doc__)
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.set_defaults(func=main)


def main(args) -> int:
    from bidm.train import train_teacher

    path = train_teacher(config_from_args(args), resume=args.resume)
    print(f"checkpoint: {path}")
    return 0

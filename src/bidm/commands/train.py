"""`bidm train`: train a full-precision diffusion UNet (the teacher)."""

from __future__ import annotations

from bidm.commands.common import add_config_args, check_outputs, config_from_args, run_outputs
from bidm.shard import is_main_process


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an FP diffusion UNet (teacher)", description=__doc__)
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.set_defaults(func=main)


def main(args) -> int:
    from bidm.train import train_teacher

    cfg = config_from_args(args)
    check_outputs(run_outputs(cfg.out_dir), [cfg.data.path], force=True)  # existing: --resume decides
    path = train_teacher(cfg, resume=args.resume)
    if is_main_process():
        print(f"checkpoint: {path}")
    return 0

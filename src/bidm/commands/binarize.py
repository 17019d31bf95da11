"""`bidm binarize`: binarize an FP teacher with a registered method and train it by distillation (QAT).

The student is ``binarize_(copy of teacher, method)``: its latent weights start equal to the teacher's. Data,
model and diffusion settings are inherited from a bidm teacher run unless overridden; every method trains with the
same loop, optimizer, budget and data order. The output run directory is read by `bidm sample`, `bidm export` and
`bidm evaluate` with no extra flags.
"""

from __future__ import annotations

from bidm.commands.common import add_config_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "binarize", help="binarize an FP teacher and train it (QAT + distillation)", description=__doc__
    )
    p.add_argument("--teacher", help="bidm run dir / official DDIM .ckpt / diffusers UNet2DModel dir")
    p.add_argument(
        "--method", help="a key of bidm.METHODS (xnor, xnorpp, dorefa, reactnet, reste, bbcu, efficientdm, bidm)"
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.set_defaults(func=main)


def build_config(args):
    """Teacher run's data/model/diffusion/sample sections <- --config <- --set <- --teacher/--method/--out."""
    from bidm.errors import ConfigError
    from bidm.pipeline import teacher_sections

    extra = [f"binarize.teacher={args.teacher}"] if args.teacher else []
    extra += [f"binarize.method={args.method}"] if args.method else []
    cfg = config_from_args(args, extra)
    if not cfg.binarize.teacher:
        raise ConfigError("no teacher: pass --teacher (or binarize.teacher in the config)")
    if cfg.binarize.method == "none":
        raise ConfigError("no method: pass --method (one of bidm.METHODS)")
    return config_from_args(args, extra, base=teacher_sections(cfg.binarize.teacher))


def main(args) -> int:
    from bidm.qat import train_student

    path = train_student(build_config(args), resume=args.resume)
    print(f"checkpoint: {path}")
    return 0

"""`bidm binarize`: binarize an FP teacher with a registered method and train it by distillation (QAT).

The student is ``binarize_(copy of teacher, method)``: its latent weights start equal to the teacher's. Data,
model and diffusion settings are inherited from a bidm teacher run unless overridden; every method trains with the
same loop, optimizer, budget and data order. The output run directory is read by `bidm sample`, `bidm export` and
`bidm evaluate` with no extra flags.
"""

from __future__ import annotations

from pathlib import Path

from bidm.commands.common import add_config_args, check_outputs, config_from_args, run_outputs
from bidm.shard import is_main_process


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


def teacher_input(spec: str) -> Path:
    """What a teacher spec reads: a diffusers directory as a whole, else the checkpoint file of a run / the file."""
    from bidm.checkpoint import resolve

    path = Path(spec)
    return path if (path / "config.json").is_file() else resolve(path)


def main(args) -> int:
    from bidm.qat import train_student

    cfg = build_config(args)
    check_outputs(run_outputs(cfg.out_dir), [cfg.data.path, teacher_input(cfg.binarize.teacher)], force=True)
    path = train_student(cfg, resume=args.resume)
    if is_main_process():
        print(f"checkpoint: {path}")
    return 0

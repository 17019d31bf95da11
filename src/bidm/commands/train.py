"""`bidm train`: train a full-precision diffusion UNet (the teacher)."""

from __future__ import annotations

from bidm.commands.common import add_config_args, config_from_args, load_training_images


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an FP diffusion UNet (teacher)", description=__doc__)
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.set_defaults(func=main)


def main(args) -> int:
    import torch

    from bidm.errors import ConfigError
    from bidm.train import EpsObjective, run, schedule
    from bidm.unet import build_unet

    cfg = config_from_args(args)
    if cfg.binarize.method != "none":
        raise ConfigError("`bidm train` trains FP teachers; use `bidm binarize` for binarized students")
    images = load_training_images(cfg)
    _check_shape(cfg, images)
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    model = build_unet(cfg.model)
    objective = EpsObjective(schedule(cfg), reduction=cfg.train.loss_reduction, kind=cfg.train.loss_kind)
    path = run(cfg, model, objective, images, out_dir=cfg.out_dir, resume=args.resume)
    print(f"checkpoint: {path}")
    return 0


def _check_shape(cfg, images) -> None:
    from bidm.errors import ConfigError

    c, h = images.shape[1], images.shape[-1]
    if c != cfg.model.in_channels or h != cfg.model.resolution:
        raise ConfigError(
            f"data gives [{c}, {h}, {h}] images but the model expects in_channels={cfg.model.in_channels}, "
            f"resolution={cfg.model.resolution}: set model.in_channels/model.out_ch/model.resolution or data.size"
        )

"""Build models from a resolved config and load them back: FP teachers (bidm runs, official DDIM checkpoints,
diffusers directories) and binarized students (the FP UNet after `binarize_`, wrapped by TBS for BiDM)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from bidm import checkpoint
from bidm.config import Config, from_dict
from bidm.errors import CheckpointError, ConfigError
from bidm.unet import DiffusersUNet, UNetConfig, build_unet, load_state_dict_reporting, read_official_state_dict


def uses_tbs(cfg: Config) -> bool:
    b = cfg.binarize
    return b.method == "bidm" and b.tbs and b.tbs_blocks > 0


def method_options(cfg: Config) -> dict:
    """The layer-factory options of ``cfg.binarize.method``: its ``method_options`` entry, then ``options``."""
    b = cfg.binarize
    per_method = b.method_options.get(b.method) or {}
    if not isinstance(per_method, dict):
        raise ConfigError(f"binarize.method_options.{b.method} must be a mapping, got {per_method!r}")
    return {**per_method, **b.options}


def layer_filter(cfg: Config):
    """Which layers `binarize_` swaps: the paper protocol (`bidm.binarize.default_filter`), plus the ResBlock skip
    convs when ``binarize.skip_convs == "binary"`` (the paper's size count treats them as 1-bit, reference §7)."""
    from bidm.binarize import FP_KEPT, SKIP_CONVS, default_filter, matches

    if cfg.binarize.skip_convs == "fp":
        return default_filter
    kept = tuple(p for p in FP_KEPT if p not in SKIP_CONVS)
    return lambda module, name: not matches(name, kept)


def binarize_unet(unet: nn.Module, cfg: Config) -> nn.Module:
    """The student: ``binarize_`` on the given FP UNet (in place), plus the TBS wrapper for BiDM."""
    from bidm.binarize import binarize_

    # one forward on dummy inputs creates shape-dependent parameters (XNOR++'s spatial scales) before the
    # optimizer and the EMA see the model
    res, ch = cfg.model.resolution, cfg.model.in_channels
    device = next(unet.parameters()).device
    example = (torch.zeros(1, ch, res, res, device=device), torch.zeros(1, dtype=torch.long, device=device))
    binarize_(unet, cfg.binarize.method, filter_fn=layer_filter(cfg), example_inputs=example, **method_options(cfg))
    if uses_tbs(cfg):
        from bidm.tbs import CrossTimestep

        b = cfg.binarize
        n_blocks = b.tbs_blocks
        if n_blocks > unet.num_output_blocks():
            n_blocks = unet.num_output_blocks()
            warnings.warn(
                f"binarize.tbs_blocks={b.tbs_blocks} but the UNet has {n_blocks} output blocks: mixing all {n_blocks}",
                stacklevel=2,
            )
        return CrossTimestep(
            unet,
            n_blocks=n_blocks,
            alpha_init=b.tbs_alpha_init,
            num_timesteps=cfg.diffusion.num_timesteps,
            train_cache=b.train_cache,
            cache_noise=b.train_cache_noise,
            sample_cache=b.tbs_sample_cache,
            sampler_steps=cfg.sample.steps,
            table_columns=b.tbs_table_columns,
        )
    return unet


def build_model(cfg: Config) -> nn.Module:
    unet = build_unet(cfg.model)
    return unet if cfg.binarize.method == "none" else binarize_unet(unet, cfg)


def load_model(path: str | Path, *, use_ema: bool = True) -> tuple[nn.Module, Config]:
    """Rebuild a trained model (teacher or student) from its checkpoint; returns (model in eval mode, config)."""
    ck = checkpoint.load(path)
    cfg = from_dict(ck.config)
    model = build_model(cfg)
    load_state_dict_reporting(model, ck.weights(use_ema), source=str(ck.path))
    return model.eval(), cfg


def load_teacher(spec: str | Path, model_cfg: UNetConfig) -> tuple[nn.Module, UNetConfig]:
    """The frozen FP teacher from a bidm run/checkpoint, an official DDIM ``.ckpt``, an official LDM ``.ckpt``
    (``model_cfg.arch == "ldm"``; a missing file names the official release) or a diffusers directory.

    Returns (teacher in eval mode with grads off, the UNetConfig the student must use).
    """
    spec = Path(spec)
    if (spec / "config.json").is_file():
        teacher = DiffusersUNet.from_pretrained(spec)
    elif checkpoint.resolve(spec).is_file() and checkpoint.resolve(spec).suffix == ".safetensors":
        teacher, cfg = load_model(spec, use_ema=True)
        if cfg.binarize.method != "none":
            raise CheckpointError(f"{spec} is a binarized ({cfg.binarize.method}) model, not an FP teacher")
    elif model_cfg.arch == "ldm":  # an official LatentDiffusion .ckpt (model.diffusion_model.*)
        from bidm.ldm.official import convert_unet_state_dict, read_ckpt

        teacher = build_unet(model_cfg)
        load_state_dict_reporting(teacher, convert_unet_state_dict(read_ckpt(spec)), source=str(spec))
    elif spec.is_file():
        teacher = build_unet(model_cfg)
        load_state_dict_reporting(teacher, read_official_state_dict(spec), source=str(spec))
    else:
        raise CheckpointError(
            f"teacher {spec} not found: give a bidm run directory (from `bidm train`), an official DDIM "
            "CIFAR-10 .ckpt (pesser/pytorch_diffusion model-790000.ckpt), or a diffusers UNet2DModel directory"
        )
    teacher.eval().requires_grad_(False)
    return teacher, teacher.config


def student_from_teacher(teacher: nn.Module, cfg: Config) -> nn.Module:
    """A binarized copy of the teacher: its latent weights start equal to the teacher's weights."""
    return binarize_unet(copy.deepcopy(teacher).requires_grad_(True).train(), cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""LDM's first stage: the VQ-f4 / KL-f8 autoencoders, full precision and frozen, as diffusers ``VQModel`` /
``AutoencoderKL`` with the CompVis weights (``first_stage_model.*``) converted by key.

Latents follow LatentDiffusion exactly (``encode_first_stage`` / ``get_first_stage_encoding`` /
``decode_first_stage``)::

    VQ:  z = scale_factor * quant_conv(encoder(x))                (no quantization at encode)
         x = decoder(post_quant_conv(quantize(z / scale_factor)))
    KL:  z = scale_factor * (mean + exp(logvar / 2) * n),  n ~ N(0, I)   (a fresh draw at every step)
         x = decoder(post_quant_conv(z / scale_factor))

`FirstStage.moments` is the deterministic half (VQ: h; KL: [mean, logvar]), `FirstStage.latents` draws z from
them, so a latent cache on disk (`bidm.ldm.latents`) stores moments and training still draws KL noise per step.

``scale_factor`` (`resolve_scale_factor`): the config's value when set; else the checkpoint's ``scale_factor``
buffer (LDM checkpoints: 1.0 for the VQ-f4 models, ~0.23 for churches); else, with ``scale_by_std``, 1/std of the
first training batch's latents (LDM's ``scale_by_std`` at step 0); else 1.0 (LDM's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from bidm.errors import CheckpointError, ConfigError
from bidm.fields import choice, num


@dataclass
class FirstStageConfig:
    """The autoencoder of a latent model (``kind="none"``: pixel-space diffusion). Defaults: VQ-f4."""

    kind: str = choice("none", ("none", "vq", "kl"))
    ckpt: str | None = None  # an LDM/first-stage .ckpt (CompVis keys) or a .safetensors of diffusers keys
    scale_factor: float | None = num(None, gt=0)  # None: the checkpoint's, else 1/std (scale_by_std), else 1.0
    scale_by_std: bool = False  # LDM-8 churches: True (the checkpoint's scale_factor is used when present)
    ch: int = num(128, gt=0)
    ch_mult: tuple[int, ...] = num((1, 2, 4), gt=0)  # VQ-f4 (1, 2, 4); KL-f8 (1, 2, 4, 4)
    num_res_blocks: int = num(2, gt=0)
    z_channels: int = num(3, gt=0)  # VQ-f4 3; KL-f8 4
    embed_dim: int = num(3, gt=0)  # = z_channels for both released models
    n_embed: int = num(8192, gt=0)  # VQ codebook size
    in_channels: int = num(3, gt=0)
    latent_cache: str | None = None  # directory for the encoded training set (moments), reused across runs

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)

    @property
    def factor(self) -> int:
        """Downsampling factor f (image size / latent size)."""
        return 2 ** (len(self.ch_mult) - 1)


def build_autoencoder(cfg: FirstStageConfig) -> nn.Module:
    """The diffusers model of ``cfg`` with random weights."""
    from diffusers import AutoencoderKL, VQModel

    n = len(cfg.ch_mult)
    common = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
    )
    if cfg.kind == "vq":
        return VQModel(**common, num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim)
    if cfg.kind == "kl":
        if cfg.embed_dim != cfg.z_channels:
            raise ConfigError("first_stage.kind=kl needs embed_dim == z_channels (as both released KL models)")
        return AutoencoderKL(**common)
    raise ConfigError(f"first_stage.kind must be 'vq' or 'kl' to build an autoencoder, got {cfg.kind!r}")


def convert_compvis(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """CompVis autoencoder keys -> diffusers keys (diffusers' own LDM converter, plus the VQ codebook)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    out = convert_ldm_vae_checkpoint(state, dict(model.config))
    if "quantize.embedding.weight" in state:
        out["quantize.embedding.weight"] = state["quantize.embedding.weight"]
    return out


class FirstStage(nn.Module):
    """A frozen autoencoder with LDM's latent scaling: `moments`, `latents`, `encode`, `decode`."""

    def __init__(self, autoencoder: nn.Module, kind: str, scale_factor: float):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.kind = kind
        self.scale_factor = float(scale_factor)

    def train(self, mode: bool = True) -> FirstStage:  # always frozen, always in eval mode
        return super().train(False)

    @torch.no_grad()
    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> VQ: h [B, e, h, w]; KL: [mean, logvar] concatenated on channels [B, 2z, h, w]."""
        ae = self.autoencoder
        h = ae.quant_conv(ae.encoder(x))
        if self.kind == "vq":
            return h
        mean, logvar = h.chunk(2, dim=1)
        return torch.cat([mean, logvar.clamp(-30.0, 20.0)], dim=1)  # the clamp of DiagonalGaussianDistribution

    def latents(self, moments: torch.Tensor, generator: torch.Generator | None = None, shard=None) -> torch.Tensor:
        """z = scale_factor * (VQ: h; KL: a draw of N(mean, exp(logvar))) (noise from ``generator``, on the CPU;
        drawn for the global batch of ``shard``, a `bidm.shard.BatchShard`, and this process's rows kept)."""
        if self.kind == "vq":
            return self.scale_factor * moments
        mean, logvar = moments.chunk(2, dim=1)
        if shard is None or generator is None:
            n = torch.randn(mean.shape, generator=generator).to(mean)
        else:
            n = shard.randn(tuple(mean.shape[1:]), generator).to(mean)
        return self.scale_factor * (mean + torch.exp(0.5 * logvar) * n)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents(self.moments(x), generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images (clamped to [-1, 1]); VQ quantizes first, as LDM's ``decode_first_stage``."""
        return self.autoencoder.decode(z / self.scale_factor).sample.clamp(-1, 1)


def read_weights(path: str | Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], float | None]:
    """(diffusers state dict, the file's scale_factor or None) from a CompVis ``.ckpt`` or a bidm ``.safetensors``."""
    from bidm.ldm.official import first_stage_state_dict, read_ckpt, scale_factor

    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"first-stage weights {path} not found")
        from safetensors.torch import load_file

        state = load_file(path)
        scale = state.pop("scale_factor", None)
        return state, None if scale is None else float(scale)
    raw = read_ckpt(path, what="first-stage checkpoint")
    compvis = first_stage_state_dict(raw)
    if not compvis:
        raise CheckpointError(f"{path} holds no first-stage keys (first_stage_model.*, encoder.*, decoder.*)")
    return convert_compvis(compvis, model), scale_factor(raw)


def resolve_scale_factor(cfg: FirstStageConfig, from_file: float | None) -> float | None:
    """The config's scale_factor, else the file's, else None (= estimate by std) with scale_by_std, else 1.0."""
    if cfg.scale_factor is not None:
        return cfg.scale_factor
    if from_file is not None:
        return from_file
    return None if cfg.scale_by_std else 1.0


def load_autoencoder(cfg: FirstStageConfig) -> tuple[nn.Module, float | None]:
    """(the frozen diffusers autoencoder of ``cfg`` with the weights of ``cfg.ckpt``, the file's scale_factor)."""
    from bidm.unet import load_state_dict_reporting

    if cfg.kind == "none":
        raise ConfigError("first_stage.kind is 'none': this config has no first stage")
    if not cfg.ckpt:
        raise ConfigError(
            "first_stage.ckpt is not set: give the LDM model.ckpt (it holds first_stage_model.*) or the "
            "first-stage model.ckpt (models/first_stage_models/vq-f4 or kl-f8)"
        )
    model = build_autoencoder(cfg)
    state, from_file = read_weights(cfg.ckpt, model)
    load_state_dict_reporting(model, state, source=f"first stage {cfg.ckpt}")
    return model.eval().requires_grad_(False), from_file


def load_first_stage(cfg: FirstStageConfig) -> FirstStage:
    """The frozen first stage of ``cfg`` with its resolved scale_factor (`resolve_scale_factor`)."""
    model, from_file = load_autoencoder(cfg)
    scale = resolve_scale_factor(cfg, from_file)
    if scale is None:
        raise ConfigError(
            "first_stage.scale_factor is unknown: the checkpoint has none and scale_by_std estimates it at the "
            "start of training (set first_stage.scale_factor, or sample a trained run whose config holds it)"
        )
    return FirstStage(model, cfg.kind, scale)


def estimate_scale_factor(first_stage: FirstStage, images: torch.Tensor, generator: torch.Generator) -> float:
    """LDM's ``scale_by_std``: 1 / std of the (unscaled) latents of one batch."""
    moments = first_stage.moments(images)
    z = FirstStage(first_stage.autoencoder, first_stage.kind, 1.0).latents(moments, generator)
    return float(1.0 / z.flatten().std())

"""Tiny latent-diffusion stand-ins saved in the official CompVis layouts, for the LDM tests.

`official_ckpt` writes what the LDM model zoo's ``model.ckpt`` holds -- ``{"state_dict": {model.diffusion_model.*,
first_stage_model.*, scale_factor}}`` -- from a random tiny LDM UNet and autoencoder. The UNet side is our module
with its Linear attention weights given the Conv1d kernel axis back; the first stage side is written with
`to_compvis` below, an independent inverse of diffusers' ``convert_ldm_vae_checkpoint`` (the loader uses diffusers'
converter, so a wrong map on either side fails the round trip).
"""

from __future__ import annotations

import re

import numpy as np
import torch

TINY_LDM = [  # 16x16 images -> 8x8 latents (f = 2)
    "model.arch=ldm",
    "model.ch=32",
    "model.ch_mult=[1, 2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
    "model.in_channels=3",
    "model.out_ch=3",
    "model.resolution=8",
    "model.dropout=0.0",
    "model.num_head_channels=16",
    "data.size=16",
]
TINY_VQ = [
    "first_stage.kind=vq",
    "first_stage.ch=32",
    "first_stage.ch_mult=[1, 2]",
    "first_stage.num_res_blocks=1",
    "first_stage.z_channels=3",
    "first_stage.embed_dim=3",
    "first_stage.n_embed=16",
]
TINY_KL = [  # LDM-8-like: scale-shift norm, ResBlock resampling, 4 latent channels
    *[o for o in TINY_LDM if not o.startswith(("model.in_channels", "model.out_ch", "model.num_head"))],
    "model.in_channels=4",
    "model.out_ch=4",
    "model.num_heads=2",
    "model.use_scale_shift_norm=true",
    "model.resblock_updown=true",
    "first_stage.kind=kl",
    "first_stage.ch=32",
    "first_stage.ch_mult=[1, 2]",
    "first_stage.num_res_blocks=1",
    "first_stage.z_channels=4",
    "first_stage.embed_dim=4",
]


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Every parameter random (zero-initialised convs too, so a wrong key or shape changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if norm_weight else 0.0))
    return model


def to_compvis(state: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """diffusers VQModel / AutoencoderKL keys -> CompVis (taming) autoencoder keys."""
    out = {}
    for key, value in state.items():
        k = key
        k = k.replace("conv_norm_out", "norm_out")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(.*)", k)
        if m:
            level, rest = n_levels - 1 - int(m.group(1)), m.group(2)
            rest = re.sub(r"^resnets\.(\d+)", r"block.\1", rest).replace("upsamplers.0", "upsample")
            k = f"decoder.up.{level}.{rest}"
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda mm: f"mid.block_{int(mm.group(1)) + 1}", k)
        k = k.replace("mid_block.attentions.0", "mid.attn_1")
        k = k.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in k:
            k = k.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
            k = k.replace("to_out.0", "proj_out")
            if value.dim() == 2:
                value = value[:, :, None, None]  # CompVis attention q/k/v/proj_out are 1x1 Conv2d
        out[k] = value
    return out


def unet_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`bidm.ldm.unet.LDMUNet` keys -> ``model.diffusion_model.*`` with the attention Linear weights as Conv1d."""
    out = {}
    for k, v in state.items():
        if k.endswith((".qkv.weight", ".proj_out.weight")):
            v = v[:, :, None]
        out["model.diffusion_model." + k] = v
    return out


def official_ckpt(path, overrides, *, seed: int = 0, scale_factor: float = 0.5, ema: bool = False):
    """Write a fake LDM ``model.ckpt`` for the config ``overrides``; returns (unet, autoencoder) with its weights."""
    from bidm.config import load_config
    from bidm.ldm.first_stage import build_autoencoder
    from bidm.unet import build_unet

    cfg = load_config(None, list(overrides))
    torch.manual_seed(seed)
    unet = randomize_(build_unet(cfg.model), seed)
    ae = randomize_(build_autoencoder(cfg.first_stage), seed + 1)
    state = unet_to_official(unet.state_dict())
    if ema:  # LitEma copy: dots removed, different values than the raw weights
        for k, v in unet.state_dict().items():
            state["model_ema." + ("diffusion_model." + k).replace(".", "")] = v + 1.0
        state["model_ema.num_updates"] = torch.tensor(7)
    fs = to_compvis(ae.state_dict(), len(cfg.first_stage.ch_mult))
    state.update({"first_stage_model." + k: v for k, v in fs.items()})
    state["scale_factor"] = torch.tensor(scale_factor)
    state["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    torch.save({"state_dict": state, "global_step": 10, "epoch": 0}, path)
    return unet.eval(), ae.eval()


def write_pngs(directory, n: int, size: int = 20, seed: int = 0):
    """``n`` random RGB PNGs (non-square, so the center crop matters) under ``directory``/a and /b."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = directory / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        Image.fromarray(img).save(sub / f"{i:03d}.png")
    return directory

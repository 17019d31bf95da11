"""Official CompVis latent-diffusion checkpoints, read offline by key.

A LatentDiffusion ``model.ckpt`` (LDM model zoo) holds ``{"state_dict": {...}}`` with
``model.diffusion_model.*`` (the UNet), ``first_stage_model.*`` (the autoencoder), the ``scale_factor`` buffer,
schedule buffers, and possibly ``model_ema.*`` (LitEma: the UNet key with its dots removed, e.g.
``model_ema.diffusion_modelinput_blocks00weight``). A first-stage ``model.ckpt`` holds the autoencoder's keys
without the prefix. Files are read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bidm.errors import CheckpointError

ZOO = "https://ommer-lab.com/files/latent-diffusion"
RELEASES = {  # what the official release publishes (CompVis/latent-diffusion scripts/download_*.sh)
    "ldm-bedrooms": ("models/ldm/lsun_beds256/model.ckpt", f"{ZOO}/lsun_bedrooms.zip"),
    "ldm-churches": ("models/ldm/lsun_churches256/model.ckpt", f"{ZOO}/lsun_churches.zip"),
    "ldm-ffhq": ("models/ldm/ffhq256/model.ckpt", f"{ZOO}/ffhq.zip"),
    "vq-f4": ("models/first_stage_models/vq-f4/model.ckpt", f"{ZOO}/vq-f4.zip"),
    "kl-f8": ("models/first_stage_models/kl-f8/model.ckpt", f"{ZOO}/kl-f8.zip"),
}
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."


def _where() -> str:
    return "; ".join(f"{name}: {file} from {url}" for name, (file, url) in RELEASES.items())


def read_ckpt(path: str | Path, what: str = "LDM checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an LDM ``.ckpt`` (tensors only; other entries dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{what} {path} not found. The official CompVis/latent-diffusion release publishes (unzip, then pass "
            f"the model.ckpt path): {_where()}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled code; a truncated file also lands here
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert_unet_state_dict(state: dict[str, torch.Tensor], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` -> `bidm.ldm.unet.LDMUNet` keys: the prefix dropped, the attention's 1x1 Conv1d
    weights ``[out, in, 1]`` squeezed to Linear ``[out, in]``. With ``prefer_ema`` and ``model_ema.*`` present,
    the EMA copy of each tensor is taken."""
    unet = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        raise CheckpointError(f"no {UNET_PREFIX}* keys: not a LatentDiffusion checkpoint")
    if prefer_ema:
        ema = {k: state.get("model_ema." + ("diffusion_model." + k).replace(".", "")) for k in unet}
        if all(v is not None for v in ema.values()):
            unet = ema
    out = {}
    for key, value in unet.items():
        attn_1d = key.endswith((".qkv.weight", ".proj_out.weight")) and value.dim() == 3
        out[key] = value[..., 0] if attn_1d else value
    return out


def first_stage_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's CompVis keys (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ...), from a LatentDiffusion
    checkpoint (``first_stage_model.*``) or a first-stage checkpoint (no prefix; its ``loss.*`` dropped)."""
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in state):
        return {k.removeprefix(FIRST_STAGE_PREFIX): v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    keep = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
    return {k: v for k, v in state.items() if k.startswith(keep)}


def scale_factor(state: dict[str, torch.Tensor]) -> float | None:
    """The checkpoint's ``scale_factor`` buffer (LatentDiffusion), or None when it has none."""
    v = state.get("scale_factor")
    return None if v is None else float(v)

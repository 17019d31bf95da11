"""Binarization diagnostics read from a student's parameters (no forward pass), for `bidm analyze`.

Per binarized layer (`bidm.qat.binarized_layers`, which reads ``w_bits``, so every method):
    flip_fraction     -- share of weight codes whose sign differs from the teacher's weight (the student starts as
                         a copy of the teacher, so this is what training flipped); sign(0) = +1 as in `bidm.qat`
    mean_abs          -- mean |latent weight| (and the teacher's, for scale); clipped: share with |W| > 1, where
                         the clamp STE gives no gradient
    thresholds        -- the learned per-channel activation thresholds ``act_shift`` (RSign b_c), if any
    k_conv            -- BiDM's learnable k-conv (``filter_k``) weights times kh*kw, so 1 = the XNOR 1/(kh*kw) init
And per model: the TBS alpha table [buckets, mixed blocks] of a `bidm.tbs.CrossTimestep` (`alpha_table`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bidm.qat import binarized_layers
from bidm.tbs import CrossTimestep


def flip_fraction(codes: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of elements where (codes >= 0) != (reference >= 0)."""
    return float(((codes >= 0) != (reference >= 0)).float().mean())


def k_conv_ratio(weight: torch.Tensor) -> torch.Tensor:
    """k-conv weight [1, 1, kh, kw] times kh*kw, flattened: all ones at the XNOR-Net initialisation 1/(kh*kw)."""
    kh, kw = weight.shape[-2:]
    return weight.detach().flatten().float() * (kh * kw)


def summarize(values: torch.Tensor) -> dict[str, float]:
    v = values.detach().flatten().float()
    std = float(v.std()) if v.numel() > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max())}


def binarized_layer_names(model: nn.Module) -> list[str]:
    """Module names of the binarized layers of ``model``, in `named_modules` order."""
    layers = {id(m) for m in binarized_layers(model)}
    return [name for name, m in model.named_modules() if id(m) in layers]


def _latent(layer: nn.Module) -> torch.Tensor:
    # EfficientDM trains adapters on a frozen weight: its latent weight is weight + the adapter product
    return layer.latent_weight() if hasattr(layer, "latent_weight") else layer.weight


@torch.no_grad()
def layer_diagnostics(student: nn.Module, teacher: nn.Module | None = None) -> list[dict]:
    """One row per binarized layer of ``student`` (module docstring); teacher layers are found by the same name
    (names relative to the UNet inside a TBS wrapper)."""
    unet = student.unet if isinstance(student, CrossTimestep) else student
    rows = []
    for name in binarized_layer_names(unet):
        layer = unet.get_submodule(name)
        latent = _latent(layer)
        row = {
            "name": name,
            "kind": "conv" if latent.dim() == 4 else "linear",
            "shape": list(latent.shape),
            "mean_abs": float(latent.abs().mean()),
            "clipped": float((latent.abs() > 1).float().mean()),
            "flip_fraction": None,
            "teacher_mean_abs": None,
        }
        if teacher is not None:
            reference = teacher.get_submodule(name).weight
            row["flip_fraction"] = flip_fraction(layer.quantize_weight(), reference)
            row["teacher_mean_abs"] = float(reference.abs().mean())
        if isinstance(getattr(layer, "act_shift", None), torch.Tensor) and layer.act_shift.numel():
            row["thresholds"] = {**summarize(layer.act_shift), "values": layer.act_shift.flatten().tolist()}
        k_conv = getattr(layer, "filter_k", None)
        if isinstance(k_conv, nn.Conv2d):
            ratio = k_conv_ratio(k_conv.weight)
            row["k_conv"] = {
                "ratio": ratio.tolist(),
                "mean_abs_dev": float((ratio - 1).abs().mean()),
                "bias": float(k_conv.bias) if k_conv.bias is not None else None,
            }
        rows.append(row)
    return rows


def alpha_table(model: nn.Module) -> dict | None:
    """The learned TBS mixing weights of a `CrossTimestep` student, or None for any other model."""
    if not isinstance(model, CrossTimestep) or model.n_blocks == 0:
        return None
    alpha = model.alpha.detach().float()[:, model.mixed_columns()]  # the read columns (official LDM table: 8 of 31)
    return {
        "alpha": alpha.tolist(),  # [num_buckets, n_blocks]
        "blocks": list(model.mixed_names),
        "num_buckets": model.num_buckets,
        "num_timesteps": model.num_timesteps,
        **summarize(alpha),
    }

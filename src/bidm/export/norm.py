"""GroupNorm (+ SiLU) of the packed runtime: the compiled channels-last kernel of ``bidm/csrc/groupnorm.c``.

A packed model with fused binary layers runs channels last (`bidm.export.fused`). `pack_` turns each of its
``nn.GroupNorm`` layers into a `PackedGroupNorm` (same parameters, same state dict, same result up to float
rounding), which normalises a channels-last float32 CPU input in two passes over memory instead of torch's slower
channels-last kernel. Called as ``norm(x, silu=True)`` it also applies SiLU in the same pass; the UNets ask for
that through `bidm.unet.norm_silu` only when the norm says it can (``fuses_silu``). Everything else (NCHW input,
autograd, another dtype or device, no compiled kernel, ``BIDM_FUSED_NORM=0``) takes torch's GroupNorm (+ SiLU).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.export import kernels
from bidm.export.skip_concat import ChannelPair


def enabled() -> bool:
    return kernels.switch("BIDM_FUSED_NORM")


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and kernels.is_channels_last(x)
        and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)))
        and enabled()
        and kernels.backend() == "c"
    )


def group_norm(x: torch.Tensor | ChannelPair, norm: nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """``norm(x)`` (then SiLU when ``silu``) by the compiled kernel where it applies, else by torch. A `ChannelPair`
    is normalised as its concatenation, which the kernel never makes (`bidm.export.skip_concat`)."""
    if isinstance(x, ChannelPair):
        if all(_kernel_applies(t, norm.weight) for t in x):
            return _group_norm_pair(x, norm, silu)
        x = x.cat()
    if not _kernel_applies(x, norm.weight):
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(y, inplace=not torch.is_grad_enabled()) if silu else y
    y = torch.empty_like(x, memory_format=torch.channels_last)
    weight = None if norm.weight is None else norm.weight.detach().float().contiguous()
    bias = None if norm.bias is None else norm.bias.detach().float().contiguous()
    b, c, h, w = x.shape
    status = kernels.library().bidm_group_norm_nhwc(
        kernels._ptr(x), b, h * w, c, norm.num_groups, kernels._ptr(weight), kernels._ptr(bias), norm.eps,
        int(silu), kernels._ptr(y), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"bidm_group_norm_nhwc failed on {tuple(x.shape)} with {norm.num_groups} groups")
    return y


def _group_norm_pair(x: ChannelPair, norm: nn.GroupNorm, silu: bool) -> torch.Tensor:
    (b, c1, h, w), c2 = x.a.shape, x.b.shape[1]
    y = torch.empty(b, c1 + c2, h, w, memory_format=torch.channels_last)
    weight = None if norm.weight is None else norm.weight.detach().float().contiguous()
    bias = None if norm.bias is None else norm.bias.detach().float().contiguous()
    status = kernels.library().bidm_group_norm_cat_nhwc(
        kernels._ptr(x.a), c1, kernels._ptr(x.b), c2, b, h * w, norm.num_groups, kernels._ptr(weight),
        kernels._ptr(bias), norm.eps, int(silu), kernels._ptr(y), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"bidm_group_norm_cat_nhwc failed on {tuple(x.shape)} with {norm.num_groups} groups")
    return y


class PackedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose forward runs the compiled channels-last kernel where it applies."""

    fuses_silu = True
    takes_pairs = True  # a `ChannelPair` (the UNet's skip concatenation, unmade) is normalised as its concatenation

    def forward(self, x: torch.Tensor | ChannelPair, silu: bool = False) -> torch.Tensor:
        return group_norm(x, self, silu)


def convert_norms_(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.GroupNorm`` (or subclass that adds no forward) of ``model`` into a `PackedGroupNorm`."""
    for m in model.modules():
        plain = isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward
        if plain and not isinstance(m, PackedGroupNorm):
            m.__class__ = PackedGroupNorm
    return model

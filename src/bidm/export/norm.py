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
    parts = _kernel_parts(x, norm)
    if parts is not None:
        return _kernel(parts, norm, silu)
    x = x.cat() if isinstance(x, ChannelPair) else x
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y, inplace=not torch.is_grad_enabled()) if silu else y


def _affine(norm: nn.GroupNorm) -> tuple[int | None, int | None]:
    """Pointers to ``norm``'s weight and bias as float32 contiguous tensors, made once per parameter version (a batch-1
    step calls ~50 norms: the per-call conversions cost more than small kernels)."""
    params = (norm.weight, norm.bias)
    key = tuple(None if p is None else (p.data_ptr(), p._version) for p in params)
    cache = norm.__dict__.get("_kernel_affine")
    if cache is None or cache[0] != key:
        tensors = tuple(None if p is None else p.detach().float().contiguous() for p in params)
        ptrs = tuple(None if t is None else t.data_ptr() for t in tensors)
        cache = norm.__dict__["_kernel_affine"] = (key, tensors, ptrs)
    return cache[2]


def group_norm_packed(x: torch.Tensor | ChannelPair, norm: nn.GroupNorm, silu: bool, plan: kernels.PreparedConv):
    """``(y, words, mean)``: ``y = norm(x)`` (+ SiLU) as `group_norm` gives it, and the binary conv ``plan``'s input
    pass of ``y`` (its packed codes and mean_c|y|, as ``plan.pack(y)``), made in the norm's pass over ``y`` while
    each block of pixels is in cache; None where the kernel does not apply."""
    parts = _kernel_parts(x, norm)
    return None if parts is None else _kernel(parts, norm, silu, plan)


def _kernel_parts(x: torch.Tensor | ChannelPair, norm: nn.GroupNorm) -> tuple[torch.Tensor, ...] | None:
    """``x`` as the kernel's one or two input tensors, or None where the kernel does not apply to them."""
    parts = tuple(x) if isinstance(x, ChannelPair) else (x,)
    return parts if all(_kernel_applies(t, norm.weight) for t in parts) else None


def _kernel(parts: tuple[torch.Tensor, ...], norm: nn.GroupNorm, silu: bool, plan=None):
    """The compiled kernel on one channels-last tensor or on the two halves of a concatenation (with ``plan``:
    also its packed input, `group_norm_packed`)."""
    (b, c1, h, w), c2 = parts[0].shape, sum(t.shape[1] for t in parts[1:])
    y = torch.empty(b, c1 + c2, h, w, memory_format=torch.channels_last)
    weight, bias = _affine(norm)
    second = parts[1].data_ptr() if len(parts) > 1 else None
    pack_args: tuple = (None, 0, None, None)  # no input pass
    if plan is not None:
        words = torch.empty(b, h, w, plan.wc, dtype=torch.int64)
        mean = torch.empty(b, 1, h, w, dtype=torch.float32)
        pack_args = (plan.shift_ptr, plan.mode, words.data_ptr(), mean.data_ptr())
    status = kernels.library().bidm_group_norm_cat_nhwc(
        parts[0].data_ptr(), c1, second, c2, b, h * w, norm.num_groups, weight, bias, norm.eps, int(silu),
        y.data_ptr(), torch.get_num_threads(), *pack_args,
    )  # fmt: skip
    if status != 0:
        shape = (b, c1 + c2, h, w)
        raise RuntimeError(f"bidm_group_norm_cat_nhwc failed on {shape} with {norm.num_groups} groups")
    return y if plan is None else (y, words, mean)


class PackedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose forward runs the compiled channels-last kernel where it applies."""

    fuses_silu = True
    takes_pairs = True  # a `ChannelPair` (the UNet's skip concatenation, unmade) is normalised as its concatenation

    def forward(self, x: torch.Tensor | ChannelPair, silu: bool = False) -> torch.Tensor:
        return group_norm(x, self, silu)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_kernel_affine", None)  # pointers: rebuilt on the next forward
        return state


def convert_norms_(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.GroupNorm`` (or subclass that adds no forward) of ``model`` into a `PackedGroupNorm`."""
    for m in model.modules():
        plain = isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward
        if plain and not isinstance(m, PackedGroupNorm):
            m.__class__ = PackedGroupNorm
    return model

"""The UNet's skip concatenation, left unmade: ``torch.cat([h, skip], dim=1)`` handed to the block as a pair.

`bidm.unet.DDIMUNet`'s up path gives each ResnetBlock ``block.concat(h, hs.pop())``, by default ``torch.cat``. The
block reads that tensor twice: in its first GroupNorm (+ SiLU) and in its FP 1x1 ``nin_shortcut``. So the
concatenation is one more write and read of the block's widest activation: in the packed BiDM step at batch 64 its
13 calls took 127 ms of 832 (torch.profiler, DDIM CIFAR-10 UNet, 2 threads), as much as all the binary layers'
packing and norms together. In a packed model whose norms run the compiled kernel, `convert_` makes such blocks'
``concat`` build a `ChannelPair` instead:

- the norm (`bidm.export.norm.group_norm`) sums both parts into one set of group statistics and writes its output
  (which it has to write anyway) from both halves: ``bidm_group_norm_cat_nhwc``;
- the 1x1 conv is two GEMMs into one output, ``y = W[:, :C1] h + W[:, C1:] skip + b``
  (`bidm.export.conv1x1.PackedConv1x1`).

The values are those of the concatenated path up to float rounding (the 1x1 conv sums in another order).
``BIDM_SKIP_CONCAT=0`` keeps ``torch.cat``, and so do NCHW inputs (the generic path). A consumer that cannot take
the pair (autograd, another dtype) concatenates it first (`ChannelPair.cat`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from bidm.export import kernels


class ChannelPair(NamedTuple):
    """``torch.cat([a, b], dim=1)`` of two ``[B, C, H, W]`` tensors, not yet made."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.a.shape[0], self.a.shape[1] + self.b.shape[1], *self.a.shape[2:]))

    def cat(self) -> torch.Tensor:
        return torch.cat([self.a, self.b], dim=1)


def enabled() -> bool:
    return kernels.switch("BIDM_SKIP_CONCAT")


def pair_or_cat(a: torch.Tensor, b: torch.Tensor) -> ChannelPair | torch.Tensor:
    """The ``concat`` of a converted block: a `ChannelPair` of two channels-last tensors (the fused runtime's
    layout), else ``torch.cat`` (the generic NCHW path stays the fake-binary model's to the bit)."""
    if enabled() and kernels.is_channels_last(a) and kernels.is_channels_last(b):
        return ChannelPair(a, b)
    return torch.cat([a, b], dim=1)


def _eligible(block: nn.Module) -> bool:
    return (
        hasattr(block, "concat")
        and getattr(getattr(block, "norm1", None), "takes_pairs", False)
        and getattr(getattr(block, "nin_shortcut", None), "takes_pairs", False)
    )


def convert_(model: nn.Module) -> nn.Module:
    """Let every block that takes a skip concatenation and whose norm and 1x1 skip conv read pairs do so (in place;
    run after the norms and 1x1 convs were converted). Returns ``model``."""
    for block in model.modules():
        if _eligible(block):
            block.concat = pair_or_cat
    return model

"""BBCU (basic binary convolution unit): RSign + ApproxSign, scaled sign weights, RPReLU, then a full-precision
residual around every binary conv; no BatchNorm.

Forward (conv)::

    u = x + b_c                                          (learnable per-channel shift ``act_shift``, init 0)
    y = (sign(u) (*) sign(W)) . alpha [+ FP bias],       alpha_o = mean|W_o| (detached)
    out = RPReLU(y) + shortcut(x)                        (identity / avg-pool(stride) / FP 1x1 conv, unscaled)

Linear layers: the same; the residual is the identity when in_features == out_features, absent otherwise.

Backward (STE)::

    dL/du = dL/dsign(u) . max(0, 2 - 2|u|)               (ApproxSign, as in the official BinaryActivation)
    dL/dW = dL/d(alpha sign(W)) . 1_{|W| <= 1}           (clip STE on the effective weight)

Differences from ``reactnet``: the residual is added *after* RPReLU (BBCU's order, "RPReLU(BinConv(x)) + x"), no
distribution loss. Choice: BBCU's residual alignment for channel changes (repeat / sum of channel groups) only
covers Cout = 2 Cin or Cin/2; a UNet changes channels arbitrarily, so Cin != Cout uses BiDM's FP 1x1 conv. BBCU's
input amplification factor k (for images in [0, 1]) is not used: UNet features are not image-range.

Reference: Xia et al., "Basic Binary Convolution Unit for Binarized Image Restoration Network", ICLR 2023, §3-4
(Fig. 2, BBCU-V4) and the official code (Zj-BinXia/BBCU); BiDM reference §6 (FID 236 as a baseline).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bidm.binarize.core import (
    BinaryConv2d,
    BinaryLinear,
    MagnitudeAwareWeights,
    RPReLU,
    RSignInput,
    conv_shortcut,
    pick,
    register,
)


class _BBCU(RSignInput, MagnitudeAwareWeights):
    method = "bbcu"


class BBCUConv2d(_BBCU, BinaryConv2d):
    def __init__(self, fp: nn.Conv2d, *, bias: bool, prelu_init: float):
        super().__init__(fp, bias=bias)
        self.act_shift = nn.Parameter(torch.zeros(self.in_channels))
        self.rprelu = RPReLU(self.out_channels, slope_init=prelu_init, channel_dim=1)
        self.shortcut = conv_shortcut(self, scale_init=None)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.rprelu(self.add_bias(y * self.per_out(self.weight_scale())))
        return y + self.shortcut(x, y.shape[-2:])


class BBCULinear(_BBCU, BinaryLinear):
    def __init__(self, fp: nn.Linear, *, bias: bool, prelu_init: float):
        super().__init__(fp, bias=bias)
        self.act_shift = nn.Parameter(torch.zeros(self.in_features))
        self.rprelu = RPReLU(self.out_features, slope_init=prelu_init, channel_dim=-1)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.rprelu(self.add_bias(y * self.weight_scale()))
        return y + x if self.in_features == self.out_features else y


@register("bbcu")
def bbcu(fp: nn.Module, *, bias: bool = True, prelu_init: float = 0.25):
    """BBCU layer from an FP nn.Conv2d / nn.Linear."""
    return pick(fp, BBCUConv2d, BBCULinear, bias=bias, prelu_init=prelu_init)

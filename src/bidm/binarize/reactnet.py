"""ReActNet: RSign (learnable per-channel shift) + ApproxSign backward, magnitude-aware sign weights, a shortcut
around every binary conv, then RPReLU; plus the distributional loss as a training signal.

Forward (conv)::

    u = x + b_c                               (RSign: sign(x - beta_c) with beta_c = -b_c; ``act_shift``, init 0)
    y = (sign(u) (*) sign(W)) . alpha [+ FP bias],   alpha_o = mean|W_o| (detached)
    y = y + shortcut(x)                       (identity / avg-pool(stride) / FP 1x1 conv when Cin != Cout, scale 1)
    out = RPReLU(y) = PReLU_beta(y - gamma) + zeta

Linear layers: the same without a shortcut, except an identity one when in_features == out_features.

Backward (STE)::

    dL/du = dL/dsign(u) . max(0, 2 - 2|u|)               (ApproxSign, Bi-Real Net)
    dL/dW = dL/d(alpha sign(W)) . 1_{|W| <= 1}           (clip STE on the effective weight)

Choices: ReActNet's reduction blocks duplicate channels (Cout = 2 Cin); a UNet changes channels arbitrarily, so the
Cin != Cout shortcut is BiDM's FP 1x1 conv. The shortcut is unscaled (ReActNet) and added before RPReLU (ReActNet
block order). RPReLU's slope starts at 0.25 (``prelu_init``, nn.PReLU's default used by ReActNet).

ReActNet's distributional loss (KL to the FP network's output distribution) is a training signal, not a layer: for an
eps-predicting Gaussian model the KL between N(eps_T, s^2 I) and N(eps_S, s^2 I) is ||eps_T - eps_S||^2 / 2s^2, so
bidm's trainer realises it as output distillation (``binarize.output_kd``, set to 1 by the reactnet recipe in
`bidm.qat.RECIPES`).

Reference: Liu et al., "ReActNet: Towards Precise Binary Neural Network with Generalized Activation Functions",
ECCV 2020, §3.2 (RSign/RPReLU, Eq. 2-4), §3.3 (distributional loss, Eq. 8); Bi-Real Net (ECCV 2018) for ApproxSign.
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


class _ReAct(RSignInput, MagnitudeAwareWeights):
    method = "reactnet"


class ReActConv2d(_ReAct, BinaryConv2d):
    def __init__(self, fp: nn.Conv2d, *, bias: bool, prelu_init: float):
        super().__init__(fp, bias=bias)
        self.act_shift = nn.Parameter(torch.zeros(self.in_channels))
        self.shortcut = conv_shortcut(self, scale_init=None)
        self.rprelu = RPReLU(self.out_channels, slope_init=prelu_init, channel_dim=1)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.add_bias(y * self.per_out(self.weight_scale()))
        return self.rprelu(y + self.shortcut(x, y.shape[-2:]))


class ReActLinear(_ReAct, BinaryLinear):
    def __init__(self, fp: nn.Linear, *, bias: bool, prelu_init: float):
        super().__init__(fp, bias=bias)
        self.act_shift = nn.Parameter(torch.zeros(self.in_features))
        self.rprelu = RPReLU(self.out_features, slope_init=prelu_init, channel_dim=-1)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.add_bias(y * self.weight_scale())
        if self.in_features == self.out_features:
            y = y + x
        return self.rprelu(y)


@register("reactnet")
def reactnet(fp: nn.Module, *, bias: bool = True, prelu_init: float = 0.25):
    """ReActNet layer from an FP nn.Conv2d / nn.Linear."""
    return pick(fp, ReActConv2d, ReActLinear, bias=bias, prelu_init=prelu_init)

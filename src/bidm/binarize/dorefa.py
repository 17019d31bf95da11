"""DoReFa-Net at 1 bit: layer-wise scaled sign weights, {0, 1} activations.

Forward::

    a = round(clip(x, 0, 1))  in {0, 1}   (a_code "01"; 0.5 rounds up: a = 1_{x >= 0.5})
    y = (a (*) sign(W)) . E|W|            (E|W| = mean over the whole layer, detached)   [+ FP bias]

Zero padding of the {0,1} input contributes 0, like a 0 activation.

Backward (STE)::

    dL/dx = dL/da . 1_{0 <= x <= 1}                  (identity inside the clip range)
    dL/dW = dL/d(E|W| sign(W))                       (identity STE on the effective weight, E|W| detached)

Reference: Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
Gradients", arXiv:1606.06160, §2.2 (Eq. 7, k=1 weights) and §2.3 (k-bit activations with k=1); BiDM reference §6
(the paper leaves the activation code space unstated; {0,1} is DoReFa's own).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bidm.binarize.core import (
    BinaryConv2d,
    BinaryLinear,
    grad_wrt_effective_weight,
    identity_grad,
    pick,
    register,
    sign_ste,
    straight_through,
)


def unit_interval_grad(x: torch.Tensor) -> torch.Tensor:
    """Identity STE inside the clip range [0, 1], zero outside."""
    return ((x >= 0) & (x <= 1)).to(x.dtype)


class _DoReFa:
    method = "dorefa"
    a_code = "01"

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        codes = (x >= 0.5).to(x.dtype)
        return straight_through(x, codes, unit_interval_grad)

    def weight_scale(self) -> torch.Tensor:
        return self.weight.abs().mean().detach()

    def quantize_weight(self) -> torch.Tensor:
        w = self.weight
        return sign_ste(w, grad_wrt_effective_weight(identity_grad(w), self.weight_scale()))

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(y * self.weight_scale())


class DoReFaConv2d(_DoReFa, BinaryConv2d):
    pass


class DoReFaLinear(_DoReFa, BinaryLinear):
    pass


@register("dorefa")
def dorefa(fp: nn.Module, *, bias: bool = True):
    """DoReFa 1-bit layer from an FP nn.Conv2d / nn.Linear."""
    return pick(fp, DoReFaConv2d, DoReFaLinear, bias=bias)

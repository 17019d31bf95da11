"""XNOR-Net: sign weights scaled per output channel, sign activations scaled by a fixed box-filtered |input| map.

Forward (conv)::

    y = (sign(x) (*) sign(W)) . K . alpha,   alpha_o = mean|W_o| (detached),   K = k (*) mean_c|x|,
    k = 1/(kh*kw) everywhere (fixed buffer ``filter_k``; same kernel/stride/padding/dilation as the conv)

Linear layers are the 1x1 case: ``K = mean|x|`` over the input features of each sample.

Backward (STE)::

    dL/dx  = dL/dsign(x) . 1_{|x| <= 1}                       (clip STE; K's own path is differentiable)
    dL/dW  = dL/d(alpha*sign(W)) . 1_{|W| <= 1}               (clip STE on the effective weight, alpha detached)

The FP bias is dropped by default (``bias=False``), as in BiDM's binary layers. Note: the "vanilla" row of the BiDM
ablation (Table 3) is BiDM's layer with k frozen, i.e. ``bidm`` with ``learnable_k=False`` (it keeps BiDM's
shortcut); this file is the plain XNOR-Net layer.

Reference: Rastegari et al., "XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks",
ECCV 2016, §3.2 (Eq. 11 and Fig. 2); BiDM reference §6.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.binarize.core import (
    BinaryConv2d,
    BinaryLinear,
    clip_grad,
    grad_wrt_effective_weight,
    mean_abs_per_out,
    pick,
    register,
    sign_ste,
)


class _Xnor:
    method = "xnor"

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x, clip_grad)

    def weight_scale(self) -> torch.Tensor:
        return mean_abs_per_out(self.weight).detach()

    def quantize_weight(self) -> torch.Tensor:
        w = self.weight
        return sign_ste(w, grad_wrt_effective_weight(clip_grad(w), self.weight_scale()))

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y * self.activation_scale(x) * self.per_out(self.weight_scale())
        return self.add_bias(y)


class XnorConv2d(_Xnor, BinaryConv2d):
    def __init__(self, fp: nn.Conv2d, *, bias: bool):
        super().__init__(fp, bias=bias)
        kh, kw = self.kernel_size
        self.register_buffer("filter_k", torch.full((1, 1, kh, kw), 1.0 / (kh * kw)))

    def activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        """K = k (*) mean_c|x|: [B, 1, Hout, Wout]."""
        a = x.abs().mean(dim=1, keepdim=True)
        return F.conv2d(a, self.filter_k, None, self.stride, self.padding, self.dilation)


class XnorLinear(_Xnor, BinaryLinear):
    def activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().mean(dim=-1, keepdim=True)


@register("xnor")
def xnor(fp: nn.Module, *, bias: bool = False):
    """XNOR-Net layer from an FP nn.Conv2d / nn.Linear."""
    return pick(fp, XnorConv2d, XnorLinear, bias=bias)

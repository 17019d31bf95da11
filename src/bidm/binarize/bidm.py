"""BiDM binary layers (reference §2a-2c): XNOR with a learnable k-conv scale map, RSign + ApproxSign, detached
per-channel alpha with the clamp STE, and a ReActNet-style scaled shortcut around every conv.

Forward (conv; reference §2a)::

    u = x + b_c                                           (``act_shift``, per input channel, init 0)
    K = filter_k(mean_c|x|)                               (learnable 1->1 conv, same kernel/stride/padding as the
                                                           conv, weight 1/(kh*kw), bias U(-1/sqrt(kh*kw), +))
    y = (sign(u) (*) sign(W)) . alpha . K + |s| . shortcut(x),   alpha_o = mean|W_o| (detached)
    shortcut: identity (Cin == Cout, stride 1) / avg-pool(stride) / FP 1x1 conv ``shortcut.proj`` (Cin != Cout)

Forward (linear; reference §2c): ``y = (sign(u) (*) sign(W)) . alpha``; no K, no shortcut, no bias.

Backward (STE)::

    dL/du = dL/dsign(u) . max(0, 2 - 2|u|)                      (Bi-Real ApproxSign, at u = x + b)
    dL/dW = dL/d(alpha sign(W)) . 1_{|W| <= 1}                  (clamp STE, not multiplied by alpha)
    K, s, filter_k, shortcut.proj: ordinary gradients (mean_c|x| is not detached)

Options and where they depart from the official code (reference §9-10):
- ``learnable_k`` (True) / ``k_bias`` (True, PyTorch default init as in the official code): k is initialised to
  1/(kh*kw) ONCE, at construction, and never reset. The official code re-initialises k's weight at the first
  binary forward of every process (flag not saved), so a loaded checkpoint loses its learned k (§9.2); we do not.
- ``shortcut_scale_init`` 0.3 with ``shortcut_abs=True`` (paper / LDM code: ``|s|``); the CIFAR code uses 0.0 without
  abs (``shortcut_scale_init=0.0, shortcut_abs=False``). With abs and init 0, s never moves (d|s|/ds = 0 at 0).
- ``linear_threshold_in_forward`` (True): the official BNNLinear's forward uses sign(x) and ignores the threshold,
  while its ApproxSign backward is evaluated at x + b (§2c quirk). Default: the threshold is used in the forward
  (fixed). False reproduces the quirk: forward sign(x), backward max(0, 2 - 2|x + b|) to both x and b.
- ``bias`` (False): the FP bias is dropped, as in the official binary mode.
- The DDIM UNet's 1x1 attention convs (q/k/v/proj_out) are ordinary BiDM convs with a K map and an identity
  shortcut, as in the official CIFAR code (BNNConv2d). LDM's 1x1 Conv1d qkv/proj_out are nn.Linear in
  `bidm.ldm.unet`, so they become `BiDMLinear`: the official BNNConv1d (no K, no shortcut, no bias; its forward
  uses the threshold, i.e. ``linear_threshold_in_forward=True``).
- An FP conv marked ``zero_init`` (LDM's ``zero_module``: every ResBlock's last conv) gets its threshold, k-conv
  bias and shortcut scale zeroed (`zero_new_parameters`), so with ``|s|`` its shortcut stays 0 as in the LDM code.

Reference: Zheng et al., "BiDM: Pushing the Limit of Quantization for Diffusion Models", NeurIPS 2024, §3.2
(Eq. 6-8, learnable k) and §4 (shortcut); official code ``util_ours.py`` / ``bidm-cifar/models/util_bidm.py``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from bidm.binarize.core import (
    BinaryConv2d,
    BinaryLinear,
    MagnitudeAwareWeights,
    RSignInput,
    approx_sign_grad,
    conv_shortcut,
    pick,
    register,
    sign,
    straight_through,
)


class _BiDM(MagnitudeAwareWeights):
    method = "bidm"


class BiDMConv2d(_BiDM, RSignInput, BinaryConv2d):
    def __init__(
        self,
        fp: nn.Conv2d,
        *,
        bias: bool,
        learnable_k: bool,
        k_bias: bool,
        shortcut_scale_init: float,
        shortcut_abs: bool,
    ):
        super().__init__(fp, bias=bias)
        self.act_shift = nn.Parameter(torch.zeros(self.in_channels))
        kh, kw = self.kernel_size
        self.filter_k = nn.Conv2d(1, 1, self.kernel_size, self.stride, self.padding, self.dilation, bias=k_bias)
        with torch.no_grad():
            self.filter_k.weight.fill_(1.0 / (kh * kw))
        self.filter_k.requires_grad_(learnable_k)
        self.shortcut = conv_shortcut(self, scale_init=shortcut_scale_init, abs_scale=shortcut_abs)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k_map = self.filter_k(x.abs().mean(dim=1, keepdim=True))  # [B, 1, Hout, Wout]
        y = self.add_bias(y * self.per_out(self.weight_scale()) * k_map)
        return y + self.shortcut(x, y.shape[-2:])


class BiDMLinear(_BiDM, BinaryLinear):
    def __init__(self, fp: nn.Linear, *, bias: bool, linear_threshold_in_forward: bool):
        super().__init__(fp, bias=bias)
        self.act_shift = nn.Parameter(torch.zeros(self.in_features))
        self.threshold_in_forward = linear_threshold_in_forward

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        u = x + self.act_shift
        value = sign(u) if self.threshold_in_forward else sign(x)
        return straight_through(u, value, approx_sign_grad)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(y * self.weight_scale())


def zero_new_parameters(layer: BiDMConv2d) -> None:
    """What LDM's ``zero_module`` does to an official BNNConv2d (reference §2a.5): its threshold, k-conv bias and
    shortcut scale start at 0 (k's weight keeps 1/(kh*kw) from the first binary forward). With ``|s|`` the shortcut
    then stays off for good (d|s|/ds = 0 at 0); without abs it can still move."""
    with torch.no_grad():
        layer.act_shift.zero_()
        if layer.filter_k.bias is not None:
            layer.filter_k.bias.zero_()
        if layer.shortcut.scale is not None:
            layer.shortcut.scale.zero_()
        if hasattr(layer.shortcut, "proj"):
            layer.shortcut.proj.weight.zero_()
            layer.shortcut.proj.bias.zero_()


@register("bidm")
def bidm(
    fp: nn.Module,
    *,
    bias: bool = False,
    learnable_k: bool = True,
    k_bias: bool = True,
    shortcut_scale_init: float = 0.3,
    shortcut_abs: bool = True,
    linear_threshold_in_forward: bool = True,
):
    """BiDM layer from an FP nn.Conv2d / nn.Linear (options above)."""
    if shortcut_abs and shortcut_scale_init == 0.0:
        warnings.warn("bidm: shortcut_abs with shortcut_scale_init=0 keeps the shortcut off forever", stacklevel=2)
    if isinstance(fp, nn.Conv2d):
        layer = BiDMConv2d(
            fp,
            bias=bias,
            learnable_k=learnable_k,
            k_bias=k_bias,
            shortcut_scale_init=shortcut_scale_init,
            shortcut_abs=shortcut_abs,
        )
        if getattr(fp, "zero_init", False):
            zero_new_parameters(layer)
        return layer
    return pick(fp, None, BiDMLinear, bias=bias, linear_threshold_in_forward=linear_threshold_in_forward)

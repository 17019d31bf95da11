"""XNOR-Net++: sign weights and activations, one learned input-independent output scale Gamma.

Forward::

    y = (sign(x) (*) sign(W)) . Gamma,   Gamma[o, h, w] = gamma_out[o] * gamma_h[h] * gamma_w[w]   (factors="chw")
                                         Gamma[o]       = gamma_out[o]                              (factors="c")

Linear layers always use ``gamma_out`` only. Init: ``gamma_out = mean|W_o|`` (XNOR's optimal scale, so the layer
starts as XNOR without K), ``gamma_h = gamma_w = 1``. The FP bias (``bias=True``) is added after scaling.

Backward (STE)::

    dL/dx = dL/dsign(x) . 1_{|x| <= 1},   dL/dW = dL/dsign(W) . 1_{|W| <= 1}     (clip STE; Gamma is learned)

Shape choice: ``gamma_h`` / ``gamma_w`` need the conv's output size, which an nn.Conv2d does not know. They are
created (as ones) at the first forward, with shape [0] until then; loading a state_dict resizes them from the
checkpoint. Run one forward before building the optimizer or an EMA copy (``binarize_(model, "xnorpp",
example_inputs=(x, t))`` does it). After that the layer only accepts inputs giving the same output size (Gamma is
constant at inference, as in the paper); ``factors="c"`` has no spatial factor and no lazy shape.

Reference: Bulat & Tzimiropoulos, "XNOR-Net++: Improved Binary Neural Networks", BMVC 2019, §3 (Eq. 4-6, case 1);
BiDM reference §6 (the paper blames the static Gamma for its collapse, FID 319).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bidm.binarize.core import BinaryConv2d, BinaryLinear, clip_grad, mean_abs_per_out, pick, register, sign_ste
from bidm.errors import BidmError


class _XnorPP:
    method = "xnorpp"

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x, clip_grad)

    def quantize_weight(self) -> torch.Tensor:
        return sign_ste(self.weight, clip_grad(self.weight))

    def weight_scale(self) -> torch.Tensor:
        return self.gamma_out

    def init_gamma(self) -> None:
        self.gamma_out = nn.Parameter(mean_abs_per_out(self.weight).detach().clone())


class XnorPPConv2d(_XnorPP, BinaryConv2d):
    def __init__(self, fp: nn.Conv2d, *, bias: bool, factors: str):
        super().__init__(fp, bias=bias)
        self.init_gamma()
        self.factors = factors
        if factors == "chw":
            self.gamma_h = nn.Parameter(torch.empty(0))  # [Hout], created at the first forward
            self.gamma_w = nn.Parameter(torch.empty(0))  # [Wout]
            self.register_load_state_dict_pre_hook(_resize_from_checkpoint)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y * self.per_out(self.weight_scale())
        if self.factors == "chw":
            h, w = y.shape[-2:]
            if self.gamma_h.numel() == 0:
                self.gamma_h.data = torch.ones(h, device=y.device, dtype=y.dtype)
                self.gamma_w.data = torch.ones(w, device=y.device, dtype=y.dtype)
            if (self.gamma_h.numel(), self.gamma_w.numel()) != (h, w):
                raise BidmError(
                    f"xnorpp Gamma was created for output {self.gamma_h.numel()}x{self.gamma_w.numel()}, "
                    f"got {h}x{w}; use factors='c' for layers that see several sizes"
                )
            y = y * self.gamma_h.reshape(1, 1, h, 1) * self.gamma_w.reshape(1, 1, 1, w)
        return self.add_bias(y)


class XnorPPLinear(_XnorPP, BinaryLinear):
    def __init__(self, fp: nn.Linear, *, bias: bool, factors: str):
        super().__init__(fp, bias=bias)
        self.init_gamma()

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(y * self.weight_scale())


def _resize_from_checkpoint(module, state_dict, prefix, *args) -> None:
    for name in ("gamma_h", "gamma_w"):
        p, v = getattr(module, name), state_dict.get(prefix + name)
        if v is not None and p.numel() == 0 and v.numel():
            p.data = torch.empty_like(v, device=p.device, dtype=p.dtype)


@register("xnorpp")
def xnorpp(fp: nn.Module, *, bias: bool = True, factors: str = "chw"):
    """XNOR-Net++ layer from an FP nn.Conv2d / nn.Linear. ``factors``: "chw" (paper case 1) or "c"."""
    if factors not in ("chw", "c"):
        raise BidmError(f"xnorpp factors must be 'chw' or 'c', got {factors!r}")
    return pick(fp, XnorPPConv2d, XnorPPLinear, bias=bias, factors=factors)

"""ReSTE: sign weights and activations with the rectified straight-through estimator, annealed during training.

Forward::

    y = (sign(x) (*) sign(W)) . alpha [+ FP bias],   alpha = mean|W| over the whole layer (NOT detached,
                                                                            as in the official code)

Backward (ReSTE, the same estimator for weights and activations; interval 0.1)::

    g_o(x) = (1/o) |x|^((1-o)/o)     for 0.1 < |x| <= t
           = 0.1^(1/o) / 0.1         for |x| <= 0.1      (slope of the secant of |x|^(1/o) on [0, 0.1])
           = 0                       for |x| > t
    dL/dx = dL/dsign(x) . g_o(x),    dL/dW = dL/dsign(W) . g_o(W)  (+ the path through alpha)

``t = 1.5``; ``o`` grows from ``o_start = 1`` (where g is the clip STE with bound t) to ``o_end`` (default 3) on a
log-linear schedule ``o = o_start (o_end / o_start)^frac``; the trainer calls
``bidm.binarize.set_progress(model, frac)`` with ``frac`` = fraction of training done. ``o`` is a buffer, so a
resumed run keeps it.

Reference: Wu et al., "Estimator Meets Equilibrium Perspective: A Rectified Straight Through Estimator for Binary
Neural Networks Training", ICCV 2023, §4 (Eq. 11-13) and the official code (DravenALG/ReSTE); BiDM reference §6.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bidm.binarize.core import BinaryConv2d, BinaryLinear, pick, register, sign_ste
from bidm.errors import BidmError

INTERVAL = 0.1


def reste_grad(x: torch.Tensor, o: float | torch.Tensor, t: float) -> torch.Tensor:
    """The ReSTE derivative g_o(x) above (``o`` a float or a 0-dim tensor)."""
    o = torch.as_tensor(o, dtype=x.dtype, device=x.device)
    a = x.abs()
    power = a.clamp_min(INTERVAL) ** ((1 - o) / o) / o
    near_zero = torch.pow(INTERVAL, 1 / o) / INTERVAL
    g = torch.where(a <= INTERVAL, near_zero, power)
    return torch.where(a <= t, g, torch.zeros_like(x))


class _ReSTE:
    method = "reste"

    def init_estimator(self, t: float, o_start: float, o_end: float) -> None:
        if not (o_start >= 1.0 and o_end >= o_start and t > INTERVAL):
            raise BidmError(f"reste needs 1 <= o_start <= o_end and t > {INTERVAL}; got {o_start}, {o_end}, {t}")
        self.t, self.o_start, self.o_end = t, o_start, o_end
        self.register_buffer("o", torch.tensor(float(o_start)))

    def set_progress(self, frac: float) -> None:
        self.o.fill_(self.o_start * (self.o_end / self.o_start) ** frac)

    def estimator_grad(self, x: torch.Tensor) -> torch.Tensor:
        return reste_grad(x, self.o, self.t)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x, self.estimator_grad)

    def quantize_weight(self) -> torch.Tensor:
        return sign_ste(self.weight, reste_grad(self.weight, self.o, self.t))

    def weight_scale(self) -> torch.Tensor:
        return self.weight.abs().mean()  # not detached: the official code backpropagates through it

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(y * self.weight_scale())


class ReSTEConv2d(_ReSTE, BinaryConv2d):
    def __init__(self, fp: nn.Conv2d, *, bias: bool, t: float, o_start: float, o_end: float):
        super().__init__(fp, bias=bias)
        self.init_estimator(t, o_start, o_end)


class ReSTELinear(_ReSTE, BinaryLinear):
    def __init__(self, fp: nn.Linear, *, bias: bool, t: float, o_start: float, o_end: float):
        super().__init__(fp, bias=bias)
        self.init_estimator(t, o_start, o_end)


@register("reste")
def reste(fp: nn.Module, *, bias: bool = True, t: float = 1.5, o_start: float = 1.0, o_end: float = 3.0):
    """ReSTE layer from an FP nn.Conv2d / nn.Linear."""
    return pick(fp, ReSTEConv2d, ReSTELinear, bias=bias, t=t, o_start=o_start, o_end=o_end)

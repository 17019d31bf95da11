"""Shared primitives of every binarizer: exact sign codes with a pseudo-gradient, the binary layer bases, the
ReActNet/BiDM building blocks (RPReLU, per-conv shortcut), the method registry and the timestep context.

Everything here is method-agnostic. A method file (``xnor.py``, ``bidm.py``, ...) combines these pieces into a
subclass of `BinaryConv2d` / `BinaryLinear` whose forward is always the four steps of ``docs/CONTRACTS.md``::

    a = self.quantize_input(x)      # exact codes (+-1, or {0,1} when a_code == "01") as float, STE inside
    w = self.quantize_weight()      # exact +-1 codes, STE inside
    y = self.binary_op(a, w)        # F.conv2d / F.linear on codes only; zero padding
    return self.postprocess(y, x)   # every real-valued factor: scales, K map, bias, RPReLU, shortcut

Conventions (all methods):
- ``sign(0) = +1`` (`sign` below; ``torch.sign`` would give 0, a third code).
- Zero padding of the binarized input: padded taps contribute 0 to the dot product (the packed kernel reproduces it).
- A pseudo-gradient is stated as a derivative ``g(x)``: forward ``value(x)``, backward ``dL/dx = dL/dvalue * g(x)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.errors import BidmError

EPS = 1e-8  # floor of scales that divide gradients (an all-zero weight row has alpha = 0)

# ---------------------------------------------------------------------------------------------------------------
# Pure functions: codes and pseudo-gradients


def sign(x: torch.Tensor) -> torch.Tensor:
    """Exact +-1 codes with sign(0) = +1, in x's dtype (``x + 0.0`` turns -0.0 into +0.0; ~4x faster than a
    bool -> float cast on this CPU)."""
    return torch.ones_like(x).copysign_(x + 0.0)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``value``; backward multiplies the incoming gradient by ``grad`` (both given, detached)."""

    @staticmethod
    def forward(ctx, x, value, grad):
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


def straight_through(x: torch.Tensor, value: torch.Tensor, grad) -> torch.Tensor:
    """Forward: ``value`` exactly. Backward: ``dL/dx = dL/dout * grad`` (``grad`` broadcasts to x).

    ``grad`` is a tensor, or a function of ``x`` evaluated only when a backward can follow (so sampling and packed
    inference never pay for the pseudo-gradient).
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return value.detach()
    grad = grad(x) if callable(grad) else grad
    return _StraightThrough.apply(x, value.detach(), grad.detach().expand_as(x))


def sign_ste(x: torch.Tensor, grad) -> torch.Tensor:
    """Forward ``sign(x)`` (exact +-1); backward ``dL/dx = dL/dout * grad`` (a tensor, or a function of x)."""
    return straight_through(x, sign(x), grad)


def clip_grad(x: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """Clip-STE derivative ``1_{|x| <= bound}`` (Hubara et al. 2016)."""
    return (x.abs() <= bound).to(x.dtype)


def identity_grad(x: torch.Tensor) -> torch.Tensor:
    """Identity-STE derivative: 1 everywhere."""
    return torch.ones_like(x)


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real ApproxSign derivative: ``2 + 2x`` on [-1, 0), ``2 - 2x`` on [0, 1), 0 elsewhere = ``max(0, 2 - 2|x|)``.

    Liu et al., "Bi-Real Net", ECCV 2018, Eq. 6 (derivative of the piecewise quadratic F).
    """
    return (2 - 2 * x.abs()).clamp_min(0)


def grad_wrt_effective_weight(grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Turn a weight STE stated on the *effective* weight ``alpha * sign(W)`` into one on the codes.

    The methods' papers/codes write the weight STE as ``dL/dW = dL/d(alpha*sign(W)) * g(W)`` with alpha detached
    (e.g. BiDM/ReActNet: ``alpha*sign(W)`` forward, ``clamp(W, -1, 1)`` backward). Here alpha is applied after the
    binary op, so ``dL/dcodes = alpha * dL/d(alpha*sign(W))``; dividing ``g`` by alpha gives exactly the same
    ``dL/dW``. ``alpha`` has shape [Cout] (or a scalar) and is floored at `EPS`.
    """
    alpha = alpha.detach().clamp_min(EPS)
    return grad / alpha.reshape(-1, *([1] * (grad.dim() - 1))) if alpha.dim() else grad / alpha


def mean_abs_per_out(w: torch.Tensor) -> torch.Tensor:
    """``alpha_o = mean |W_o|`` over every axis but the first: [Cout, ...] -> [Cout] (XNOR-Net's optimal scale)."""
    return w.abs().mean(dim=tuple(range(1, w.dim())))


# ---------------------------------------------------------------------------------------------------------------
# Quantizers shared by several methods (mixins for the layer classes below)


class MagnitudeAwareWeights:
    """Weights ``alpha_o * sign(W)`` with ``alpha_o = mean|W_o|`` per output channel, detached and recomputed every
    forward; backward: clamp STE ``1_{|W| <= 1}`` on the effective weight (ReActNet, BBCU, BiDM)."""

    def weight_scale(self) -> torch.Tensor:
        return mean_abs_per_out(self.weight).detach()

    def quantize_weight(self) -> torch.Tensor:
        w = self.weight
        return sign_ste(w, grad_wrt_effective_weight(clip_grad(w), self.weight_scale()))


class RSignInput:
    """RSign activations ``sign(x + b_c)`` with a learnable per-input-channel threshold ``act_shift`` (b_c);
    backward: Bi-Real ApproxSign at ``x + b_c`` (ReActNet, BBCU, BiDM convs)."""

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        u = x + self.per_in(self.act_shift)
        return sign_ste(u, approx_sign_grad)


# ---------------------------------------------------------------------------------------------------------------
# Binary layer bases


class BinaryLayer(nn.Module):
    """Common part of `BinaryConv2d` and `BinaryLinear`: latent FP ``weight`` (+ optional ``bias``) copied from the FP
    layer under the same names, precision attributes, and the four-step forward.

    Attributes read by tools: ``w_bits = a_bits = 1``, ``method`` (registry key), ``a_code`` ("pm1" or "01"),
    ``has_fp_bias`` (the FP layer had a bias; it is dropped when ``bias`` is None), ``merged_into_weight`` (names
    of tensors that fold into ``weight`` at export, e.g. LoRA factors; `bidm.summary` does not count them).
    """

    w_bits = 1
    a_bits = 1
    method = "?"
    a_code = "pm1"
    merged_into_weight: tuple[str, ...] = ()

    def __init__(self, fp: nn.Module, *, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(fp.weight.detach().clone())
        self.has_fp_bias = fp.bias is not None
        if bias and fp.bias is not None:
            self.bias = nn.Parameter(fp.bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.quantize_input(x)
        w = self.quantize_weight()
        y = self.binary_op(a, w)
        return self.postprocess(y, x)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_scale(self) -> torch.Tensor:
        """The real-valued weight factor ``postprocess`` applies ([Cout] or a scalar). Every method computes it here
        and only here from the latent weight, so an exporter can freeze it and drop the latent weight."""
        raise NotImplementedError

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.per_out(self.bias)

    def dropped_fp_keys(self) -> tuple[str, ...]:
        """FP state_dict keys (relative to this layer) that this layer intentionally does not keep."""
        return ("bias",) if self.has_fp_bias and self.bias is None else ()


class BinaryConv2d(BinaryLayer):
    """Base of binarized 2-D convolutions. Keeps the FP conv's geometry; ``binary_op`` is ``F.conv2d`` with zero
    padding on the codes (no bias: the bias, if any, is a real-valued factor applied in ``postprocess``)."""

    def __init__(self, fp: nn.Conv2d, *, bias: bool):
        if fp.padding_mode != "zeros":
            raise BidmError(f"binarized convs use zero padding; got padding_mode={fp.padding_mode!r}")
        super().__init__(fp, bias=bias)
        self.in_channels, self.out_channels = fp.in_channels, fp.out_channels
        self.kernel_size, self.stride, self.padding = fp.kernel_size, fp.stride, fp.padding
        self.dilation, self.groups = fp.dilation, fp.groups

    def binary_op(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(a, w, None, self.stride, self.padding, self.dilation, self.groups)

    @staticmethod
    def per_out(v: torch.Tensor) -> torch.Tensor:
        """[C] -> [1, C, 1, 1], to broadcast over a conv output (or input)."""
        return v.reshape(1, -1, 1, 1)

    per_in = per_out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, method={self.method}, bias={self.bias is not None}"
        )


class BinaryLinear(BinaryLayer):
    """Base of binarized linear layers (inputs ``[..., Cin]``); ``binary_op`` is ``F.linear`` on the codes."""

    def __init__(self, fp: nn.Linear, *, bias: bool):
        super().__init__(fp, bias=bias)
        self.in_features, self.out_features = fp.in_features, fp.out_features

    def binary_op(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(a, w)

    @staticmethod
    def per_out(v: torch.Tensor) -> torch.Tensor:
        """[C] -> [C], which broadcasts over the last axis."""
        return v.reshape(-1)

    per_in = per_out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, method={self.method}, bias={self.bias is not None}"


def pick(fp: nn.Module, conv_cls: type, linear_cls: type, **kwargs) -> BinaryLayer:
    """Build ``conv_cls(fp, **kwargs)`` for an nn.Conv2d, ``linear_cls(fp, **kwargs)`` for an nn.Linear."""
    if isinstance(fp, nn.Conv2d):
        return conv_cls(fp, **kwargs)
    if isinstance(fp, nn.Linear):
        return linear_cls(fp, **kwargs)
    raise BidmError(f"cannot binarize {type(fp).__name__}: only nn.Conv2d and nn.Linear are supported")


# ---------------------------------------------------------------------------------------------------------------
# Real-valued building blocks


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``f(y) = PReLU_beta(y - gamma) + zeta`` with per-channel gamma, zeta (init 0) and slope beta.

    Liu et al., "ReActNet", ECCV 2020, Eq. 4. ``channel_dim`` is 1 for conv outputs, -1 for linear outputs.
    """

    def __init__(self, channels: int, *, slope_init: float = 0.25, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        self.shift_in = nn.Parameter(torch.zeros(channels))  # gamma
        self.slope = nn.Parameter(torch.full((channels,), float(slope_init)))  # beta
        self.shift_out = nn.Parameter(torch.zeros(channels))  # zeta

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1) if self.channel_dim == 1 else (-1,)
        u = y - self.shift_in.reshape(shape)
        return torch.where(u >= 0, u, u * self.slope.reshape(shape)) + self.shift_out.reshape(shape)


class Shortcut(nn.Module):
    """ReActNet-style per-conv shortcut of BiDM (reference §2a.5), on the raw (pre-threshold) conv input.

    - Cin == Cout, stride 1: identity;
    - Cin == Cout, stride s > 1: average pool with kernel = stride = s;
    - Cin != Cout: a full-precision 1x1 ``nn.Conv2d(Cin, Cout, stride=s)`` (default init; ``proj``).

    When that shape differs from the conv output (a padding that does not preserve size), an adaptive average pool
    to the output size is used instead (never the case in the DDIM/LDM UNets).
    Output ``scale * shortcut(x)`` where ``scale`` is a learnable scalar (``|scale|`` when ``abs_scale``), or 1 with
    no parameter when ``scale_init`` is None.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, scale_init: float | None, abs_scale: bool = False):
        super().__init__()
        self.stride, self.abs_scale = stride, abs_scale
        if in_ch != out_ch:
            self.proj = nn.Conv2d(in_ch, out_ch, 1, stride=stride)
        if scale_init is None:
            self.register_parameter("scale", None)
        else:
            self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        s = self.unscaled(x, out_hw)
        return s if self.scale is None else self.factor() * s

    def unscaled(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """``shortcut(x)`` before the scale (the packed runtime adds ``factor() * unscaled`` in its epilogue)."""
        proj = self._modules.get("proj")  # not hasattr: a failed module __getattr__ costs ~1 us per call
        if proj is not None:
            s = proj(x)
        elif self.stride > 1:
            s = F.avg_pool2d(x, self.stride)
        else:
            s = x
        if tuple(s.shape[-2:]) != tuple(out_hw):
            s = F.adaptive_avg_pool2d(s, out_hw)
        return s

    def factor(self) -> torch.Tensor | float:
        """The scale: ``scale``, ``|scale|`` with ``abs_scale``, or 1.0 without a scale parameter."""
        if self.scale is None:
            return 1.0
        return self.scale.abs() if self.abs_scale else self.scale


def conv_shortcut(layer: BinaryConv2d, *, scale_init: float | None, abs_scale: bool = False) -> Shortcut:
    if layer.stride[0] != layer.stride[1]:
        raise BidmError(f"per-conv shortcut needs a square stride, got {layer.stride}")
    return Shortcut(layer.in_channels, layer.out_channels, layer.stride[0], scale_init=scale_init, abs_scale=abs_scale)


# ---------------------------------------------------------------------------------------------------------------
# Timestep context (for layers whose quantizer depends on t, e.g. EfficientDM's per-timestep step sizes)


class TimestepContext:
    """The timestep of the forward in progress, shared by the layers of one model.

    Registered as a forward pre-hook (``with_kwargs=True``) on the model given to ``binarize_``, so calling
    ``model(x, t)`` (or ``model(x, t=...)`` / ``timestep=...``) records ``t`` before any layer runs. Layers read
    ``ctx.t``. `bidm.binarize.set_timestep` sets it by hand (e.g. to run a single layer).
    """

    def __init__(self):
        self.t: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("t", kwargs.get("timestep", kwargs.get("timesteps")))
        if t is not None:
            self.t = torch.as_tensor(t)


# ---------------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Method:
    """One registry entry: a layer factory ``factory(fp_layer, **options) -> BinaryConv2d | BinaryLinear``.

    ``options`` are the factory's keyword defaults. ``prepare_model(model)`` runs once after `binarize_` swapped the
    layers (model-level state, e.g. a timestep hook). Per-method training signals (ReActNet's distribution loss,
    EfficientDM's output distillation) are training recipes and live in `bidm.qat.RECIPES`, not here.
    """

    name: str
    factory: Callable[..., BinaryLayer]
    options: dict[str, Any] = field(default_factory=dict)
    prepare_model: Callable[[nn.Module], None] | None = None

    def check_options(self, options: dict) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise BidmError(
                f"unknown option(s) {unknown} for binarization method {self.name!r}; "
                f"valid options (defaults): {self.options}"
            )

    def __call__(self, fp_layer: nn.Module, **options) -> BinaryLayer:
        self.check_options(options)
        w = fp_layer.weight
        with torch.device(w.device):  # new parameters (thresholds, k-convs, ...) live where the weight lives
            layer = self.factory(fp_layer, **options)
        return layer.to(w.dtype) if w.is_floating_point() else layer


METHODS: dict[str, Method] = {}


def register(name: str, *, prepare_model=None):
    """Decorator placing a layer factory in `METHODS` under ``name`` (= its file name = the config/CLI value)."""

    def wrap(factory):
        if name in METHODS:
            raise BidmError(f"binarization method {name!r} registered twice")
        defaults = {
            p.name: p.default
            for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        METHODS[name] = Method(name, factory, defaults, prepare_model)
        return factory

    return wrap

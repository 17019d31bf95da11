"""Fused packed forwards: the layers whose real-valued parts fit the kernel's two fused passes.

A generic packed layer runs ``quantize_input`` (a torch pass writing ±1 floats), packs them (a second read),
runs the popcount GEMM, then ``postprocess`` (several torch passes over the output). For the methods below the
same forward is three steps, each one pass over its tensor:

    words, mean = pack_input(x, b)                      # sign(x + b) bit-packed, and mean_c|x|, one read of x
    s           = shortcut(x)                           # the FP part: identity, a pool or a 1x1 conv
    y           = binary_conv2d(words, W, Epilogue(alpha, k (*) mean, bias, |s|·s))   # written once, channels last

The kernel computes the K map (the 1-channel conv k (*) mean_c|x|) per output tile from ``mean``. On a channels-last
float32 input with the C backend the two kernel calls go through a `bidm.export.kernels.PreparedConv` built once per
layer (and rebuilt when a constant or the weight changes), which skips the per-call argument handling
(``BIDM_PREPARED=0``: the general calls, for an A/B).

| method (conv) | threshold b | K map | shortcut |
|---|---|---|---|
| xnor | none | fixed box filter ``filter_k`` | none |
| bidm | ``act_shift`` | learnable 1->1 conv ``filter_k`` | ``shortcut`` (identity / avg-pool / FP 1x1) x factor |

The output is written channels last (``[B, H, W, C]`` memory, shape ``[B, C, H, W]``): the norms and element-wise
ops that follow keep that layout, so the next binary layer packs its input per pixel without a transpose (`pack_`
makes the model's FP convs read channels last too, so no op mixes layouts). Values
are the fake-binary layer's up to float rounding (the codes are exact; the reference twin, ``BIDM_KERNEL=ref``, is
the same three steps in torch). ``BIDM_FUSED=0`` turns the fused forwards off (the generic packed path runs).
XNOR and BiDM linear layers (float32 ``[B, Cin]`` inputs, C backend, ``BIDM_PREPARED``) run as a 1x1 conv on a 1x1
image through the same two prepared calls: ``y = dots . alpha . K + bias`` with K = mean_c|x| for XNOR (a 1x1 K
conv of weight 1) and no K for BiDM. Every other method and input takes the generic path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from bidm.binarize.bidm import BiDMConv2d, BiDMLinear
from bidm.binarize.xnor import XnorConv2d, XnorLinear
from bidm.export import kernels
from bidm.export import norm as packed_norm


def enabled() -> bool:
    return kernels.switch("BIDM_FUSED")


def k_params(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The K map's 1-channel conv: (weight [1, 1, kh, kw], bias [1] or None); a buffer for XNOR, a module for BiDM."""
    if isinstance(layer.filter_k, nn.Module):
        return layer.filter_k.weight, layer.filter_k.bias
    return layer.filter_k, None


def shortcut(layer: nn.Module, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The unscaled shortcut of x (identity, avg-pool or the FP 1x1 conv); its scale goes to the epilogue."""
    return layer.shortcut.unscaled(x, out_hw)


def _as_f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _holder(module: nn.Module, name: str | None) -> tuple[dict, str] | None:
    """The dict (``_parameters`` / ``_buffers``) and key under which ``module.name`` is registered, or None."""
    for d in (module._parameters, module._buffers):
        if name in d:
            return d, name
    return None


def _slots(layer: nn.Module, shift: str | None, with_shortcut: bool, sources: tuple) -> tuple | None:
    """Where each constant's tensor is registered, to check the cache without module attribute lookups (a batch-1
    step runs ~75 fused layers: ~5 us each of ``__getattr__``); None when one cannot be located."""
    fk, sc = layer._modules.get("filter_k"), layer._modules.get("shortcut")
    holders = (
        _holder(layer, "weight_alpha"),
        _holder(layer, "bias"),
        _holder(layer, shift) if shift else None,
        _holder(fk, "weight") if fk is not None else _holder(layer, "filter_k"),
        _holder(fk, "bias") if fk is not None else None,
        _holder(sc, "scale") if with_shortcut and sc is not None else None,
    )
    slots = []
    for holder, t in zip(holders, sources):
        if holder is None:
            if t is not None:
                return None
            continue
        if holder[0][holder[1]] is not t:
            return None
        slots.append((*holder, t, None if t is None else t._version))
    return tuple(slots)


def _cache_valid(cache: dict) -> bool:
    slots = cache.get("slots")
    return slots is not None and all(d.get(n) is t and (t is None or t._version == v) for d, n, t, v in slots)


def constants(layer: nn.Module, shift: str | None, with_shortcut: bool) -> dict:
    """The layer's real-valued constants as float32 tensors / floats, cached until one of them changes
    (``load_state_dict``, an in-place update, a replaced parameter), so a forward does no per-call conversions."""
    cache = layer.__dict__.get("_fused_constants")
    if cache is not None and cache.get("shape") == (shift, with_shortcut) and _cache_valid(cache):
        return cache
    k_weight, k_bias = k_params(layer)
    scale = layer.shortcut.scale if with_shortcut else None
    sources = (layer.weight_scale(), layer.bias, getattr(layer, shift) if shift else None, k_weight, k_bias, scale)
    key = tuple(None if t is None else (t.data_ptr(), t._version) for t in sources)
    cache = layer.__dict__.get("_fused_constants")
    if cache is None or cache["key"] != key:
        with torch.no_grad():
            factor = layer.shortcut.factor() if with_shortcut else 1.0
            cache = {
                "key": key,
                "alpha": _as_f32(sources[0]),
                "bias": _as_f32(layer.bias),
                "shift": _as_f32(sources[2]),
                "k_weight": _as_f32(k_weight),
                "k_bias": 0.0 if k_bias is None else float(k_bias.detach().float()),
                "scale": float(factor.detach().float()) if torch.is_tensor(factor) else float(factor),
                "shape": (shift, with_shortcut),
                "slots": _slots(layer, shift, with_shortcut, sources),
            }
        layer.__dict__["_fused_constants"] = cache
    return cache


def _prepared(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the prepared C calls (`bidm.export.kernels.PreparedConv`)."""
    return (
        kernels.backend() == "c"
        and x.dtype == torch.float32
        and kernels.is_channels_last(x)
        and kernels.switch("BIDM_PREPARED")
    )


def _plan(layer: nn.Module, c: dict) -> kernels.PreparedConv:
    weight, plan = layer.kernel_weight(), c.get("plan")
    if plan is None or plan.weight is not weight:
        plan = c["plan"] = kernels.PreparedConv(weight, layer.stride, layer.packed_padding, layer.a_code,
                                                c["alpha"], c["bias"], c["shift"], c["k_weight"], c["k_bias"],
                                                c["scale"])  # fmt: skip
    return plan


def _fused_plan(layer: nn.Module) -> tuple[kernels.PreparedConv, bool]:
    """A fused XNOR / BiDM conv's prepared calls and whether it has BiDM's shortcut (as `xnor_conv` / `bidm_conv`)."""
    with_shortcut = layer.fake_class is BiDMConv2d
    return _plan(layer, constants(layer, "act_shift" if with_shortcut else None, with_shortcut)), with_shortcut


def _conv(layer: nn.Module, x: torch.Tensor, shift: str | None, with_shortcut: bool, row_bias=None):
    c = constants(layer, shift, with_shortcut)
    if _prepared(x):
        plan = _plan(layer, c)
        words, mean = plan.pack(x)
        res = shortcut(layer, x, plan.output_size(*x.shape[2:])) if with_shortcut else None
        return plan.gemm(words, mean, res, row_bias)
    weight, stride, padding = layer.kernel_weight(), layer.stride, layer.packed_padding
    words, mean = kernels.pack_input(x, c["shift"], layer.a_code, absmean=True)
    out_hw = kernels.conv_output_size(*x.shape[2:], layer.kernel_size, stride, padding)
    res = shortcut(layer, x, out_hw) if with_shortcut else None
    epi = kernels.Epilogue(c["alpha"], None, c["bias"], res, c["scale"], mean, c["k_weight"], c["k_bias"],
                           row_bias)  # fmt: skip
    return kernels.binary_conv2d(words, weight, stride, padding, layer.a_code, epilogue=epi, channels_last=True)


def upsampled_conv(layer: nn.Module, x: torch.Tensor, u: int) -> torch.Tensor | None:
    """``layer(nearest_upsample(x, u))`` for a fused XNOR / BiDM conv, without making the upsampled float tensor: the
    input pass packs ``x`` (u^2 times fewer pixels), its words and mean_c|x| are upsampled (1/32 of the floats'
    bytes), and the kernel reads BiDM's identity shortcut from ``x`` itself (``res_up``). Same codes, same floats as
    the upsample-then-conv path. None where that does not apply (another layer or input, a shortcut that is not
    the identity): the caller upsamples."""
    fake = getattr(layer, "fake_class", None)
    if fake not in FUSED or not _prepared(x) or layer.stride != (1, 1):
        return None
    sc = layer._modules.get("shortcut") if fake is BiDMConv2d else None
    if fake is BiDMConv2d and (sc is None or sc._modules.get("proj") is not None or sc.stride != 1):
        return None
    plan, with_shortcut = _fused_plan(layer)
    h, w = x.shape[2:]
    if plan.output_size(h * u, w * u) != (h * u, w * u):
        return None
    words, mean = plan.pack(x)
    words = kernels.upsample_nearest(words.permute(0, 3, 1, 2), u).permute(0, 2, 3, 1)  # [B, uH, uW, Wc] contiguous
    mean = kernels.upsample_nearest(mean, u)
    return plan.gemm(words, mean, x, res_up=u) if with_shortcut else plan.gemm(words, mean, None)


def norm_conv(layer: nn.Module, norm: nn.Module, x, row_bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``layer(silu(norm(x)))`` (then ``+ row_bias[:, :, None, None]``) for a fused XNOR / BiDM conv after a packed
    GroupNorm, its input pass made inside the norm's pass (`bidm.export.norm.group_norm_packed`): the same codes and
    floats as the norm, then the conv, with one read of the norm's output less. ``x``: a tensor or a
    `bidm.export.skip_concat.ChannelPair`. None where that does not apply (the caller runs the two)."""
    fake = getattr(layer, "fake_class", None)
    parts = (x,) if torch.is_tensor(x) else tuple(x)
    if fake not in FUSED or not getattr(norm, "takes_pairs", False) or not enabled() or not all(map(_prepared, parts)):
        return None
    plan, with_shortcut = _fused_plan(layer)
    out = packed_norm.group_norm_packed(x, norm, True, plan)
    if out is None:
        return None
    a, words, mean = out
    res = shortcut(layer, a, plan.output_size(*a.shape[2:])) if with_shortcut else None
    return plan.gemm(words, mean, res, row_bias)


def xnor_conv(layer: XnorConv2d, x: torch.Tensor, row_bias=None) -> torch.Tensor:
    """``(sign(x) (*) sign(W)) . K . alpha + bias`` (then ``+ row_bias[:, :, None, None]``)."""
    return _conv(layer, x, None, False, row_bias)


def bidm_conv(layer: BiDMConv2d, x: torch.Tensor, row_bias=None) -> torch.Tensor:
    """``(sign(x + b) (*) sign(W)) . alpha . K + bias + |s| . shortcut(x)`` (then ``+ row_bias[:, :, None, None]``)."""
    return _conv(layer, x, "act_shift", True, row_bias)


_UNIT_K = torch.ones(1, 1, 1, 1)  # XNOR linear's K is mean_c|x| itself: a 1x1 "K conv" of weight 1, bias 0


def _linear(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor | None, with_k: bool) -> torch.Tensor:
    """A linear layer as a 1x1 conv on a 1x1 image, through the prepared C calls (input [B, Cin] -> [B, Cout])."""
    sources = (layer.weight_scale(), layer.bias, shift)
    key = (with_k, *(None if t is None else (t.data_ptr(), t._version) for t in sources))
    weight, cache = layer.kernel_weight(), layer.__dict__.get("_fused_constants")
    if cache is None or cache["key"] != key or cache["plan"].weight is not weight:
        alpha, bias, shift32 = (_as_f32(t) for t in sources)
        plan = kernels.PreparedConv(weight, (1, 1), (0, 0), layer.a_code, alpha, bias, shift32,
                                    _UNIT_K if with_k else None, 0.0, 1.0)  # fmt: skip
        cache = layer.__dict__["_fused_constants"] = {"key": key, "plan": plan}
    b, c = x.shape
    words, mean = cache["plan"].pack(x.contiguous().view(b, c, 1, 1))
    return cache["plan"].gemm(words, mean, None).reshape(b, -1)


def xnor_linear(layer: XnorLinear, x: torch.Tensor) -> torch.Tensor:
    """``(sign(x) . sign(W)) . mean_c|x| . alpha + bias``."""
    return _linear(layer, x, None, with_k=True)


def bidm_linear(layer: BiDMLinear, x: torch.Tensor) -> torch.Tensor:
    """``(sign(x + b) . sign(W)) . alpha + bias`` (threshold ``b`` only with ``threshold_in_forward``)."""
    return _linear(layer, x, layer.act_shift if layer.threshold_in_forward else None, with_k=False)


FUSED: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {XnorConv2d: xnor_conv, BiDMConv2d: bidm_conv}
FUSED_LINEAR: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    XnorLinear: xnor_linear,
    BiDMLinear: bidm_linear,
}


def fused_forward(layer: nn.Module, x: torch.Tensor) -> Callable | None:
    """The fused forward of ``layer`` for input ``x``, or None (generic path)."""
    cls = getattr(layer, "fake_class", None)
    if x.device.type != "cpu" or not enabled():
        return None
    if x.dim() == 4:
        return FUSED.get(cls)
    if x.dim() == 2 and cls in FUSED_LINEAR and x.dtype == torch.float32 and kernels.backend() == "c":
        if kernels.switch("BIDM_PREPARED"):
            return FUSED_LINEAR[cls]
    return None

"""The FP 1x1 convs a packed model keeps, as GEMMs on its channels-last activations where that is faster.

A packed model runs channels last (`bidm.export.fused`), so a 1x1, stride-1 conv of ``x`` [B, C, H, W] is one matrix
product of ``x``'s memory [B*H*W, Cin] with the weight [Cin, Cout]. `PackedConv1x1` (same parameters and state
dict as the ``nn.Conv2d`` it replaces) computes it so:

- on a `bidm.export.skip_concat.ChannelPair` (the UNet's skip concatenation, not made): two GEMMs into one output,
  ``y = h W[:, :C1]^T + skip W[:, C1:]^T + b``, always;
- on a tensor with at most ``GEMM_MAX_ROWS`` pixels (batch 1, small images), where torch's mkldnn conv costs more
  than the GEMM: 132 vs 164 us at 1x384x16x16 -> 256, 18 vs 32 us at 1x512x4x4 -> 256 (2 threads, AVX-512 Xeon);
  at batch 64 the conv is ~10% faster, so larger inputs keep it.

The weight is transposed once (``[Cin, Cout]``, contiguous) and cached until it changes. Same values as the conv up
to float rounding (another summation order). Autograd, other dtypes or devices and NCHW inputs take the conv.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.export import kernels
from bidm.export.skip_concat import ChannelPair

GEMM_MAX_ROWS = 1024


def _applies(conv: nn.Conv2d, tensors) -> bool:
    return (
        not torch.is_grad_enabled()
        and conv.weight.dtype == torch.float32
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and kernels.is_channels_last(t) for t in tensors)
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last [B, C, H, W] tensor's memory as [B*H*W, C] (no copy)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class PackedConv1x1(nn.Conv2d):
    """A 1x1, stride-1, unpadded ``nn.Conv2d`` that runs as a GEMM where it pays, and takes a `ChannelPair`."""

    takes_pairs = True

    def _weight_t(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        cache = self.__dict__.get("_gemm_weight")
        if cache is None or cache[0] != key:
            wt = self.weight.detach().reshape(self.out_channels, self.in_channels).t().contiguous()
            cache = self.__dict__["_gemm_weight"] = (key, wt)
        return cache[1]

    def _gemm(self, parts: tuple[torch.Tensor, ...], into: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(cat(parts))``, or with ``into`` (channels last): ``into += conv(cat(parts)) - bias`` in place."""
        b, _, h, w = parts[0].shape
        y = torch.empty(b, h, w, self.out_channels) if into is None else into.permute(0, 2, 3, 1)
        out, wt, c0 = y.view(-1, self.out_channels), self._weight_t(), 0
        for i, part in enumerate(parts):
            rows, w_part = _rows(part), wt[c0 : c0 + part.shape[1]]
            if i > 0 or into is not None:
                out.addmm_(rows, w_part)
            elif self.bias is None:
                torch.mm(rows, w_part, out=out)
            else:
                torch.addmm(self.bias, rows, w_part, out=out)
            c0 += part.shape[1]
        return y.permute(0, 3, 1, 2)

    def forward(self, x):
        if isinstance(x, ChannelPair):
            return self._gemm(tuple(x)) if _applies(self, x) else super().forward(x.cat())
        if x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] <= GEMM_MAX_ROWS and _applies(self, (x,)):
            return self._gemm((x,))
        return super().forward(x)

    def can_accumulate(self, x) -> bool:
        """Whether `accumulate_` runs its GEMM on ``x`` (channels-last float32, no autograd)."""
        return _applies(self, tuple(x) if isinstance(x, ChannelPair) else (x,))

    def accumulate_(self, y: torch.Tensor, x) -> torch.Tensor:
        """``y += conv(x) - bias`` in place and returns ``y``: with `can_accumulate` and a channels-last ``y`` the GEMM
        adds into ``y`` as it goes (a ResBlock's skip added to its output with no skip tensor and no add pass), else
        torch's conv and an add."""
        parts = tuple(x) if isinstance(x, ChannelPair) else (x,)
        if _applies(self, (y, *parts)) and y.shape[1] == self.out_channels and y.shape[2:] == parts[0].shape[2:]:
            self._gemm(parts, into=y)
            return y
        return y.add_(F.conv2d(x.cat() if isinstance(x, ChannelPair) else x, self.weight))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_gemm_weight", None)
        return state


def convert_(model: nn.Module) -> nn.Module:
    """Make every plain 1x1, stride-1, unpadded, ungrouped ``nn.Conv2d`` of ``model`` a `PackedConv1x1` (in place)."""
    for m in model.modules():
        if (
            type(m) is nn.Conv2d
            and m.kernel_size == (1, 1)
            and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid")
            and m.groups == 1
            and m.dilation == (1, 1)
        ):
            m.__class__ = PackedConv1x1
    return model

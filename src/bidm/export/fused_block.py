"""UNet blocks of a packed model that fuse the work around their binary convs.

`PackedResnetBlock`. Without autograd `bidm.unet.ResnetBlock` runs

    h = conv1(silu(norm1(x)));  h += temb_proj(silu(temb))[:, :, None, None]
    h = conv2(silu(norm2(h)));  h += skip                        (skip = nin_shortcut(x), or x)

and each ``+=`` is one more read and write of the block's output. When its convs take a fused packed forward
(`bidm.export.fused`: XNOR, BiDM), conv1's kernel adds the time embedding as a per-sample row bias
(`bidm.export.kernels.Epilogue.row_bias`) after the layer's own terms, in the block's order (the same floats), and a
1x1 ``nin_shortcut`` (`bidm.export.conv1x1.PackedConv1x1`) adds its GEMM straight into conv2's output, its bias
given to conv2's kernel as a row bias: no skip tensor, no add pass (float rounding differs: another summation
order). An identity skip stays a torch add: added in conv2's epilogue too (tried, the kernel reading the skip 8
channels at a time while it sweeps a weight panel), the BiDM step at batch 64 got 2% slower (`bench/ab_step.py
--switch BIDM_FUSED_BLOCK`, 12 rounds: 0.98x).

`PackedUpsample`. ``conv(nearest_upsample(x))`` writes and reads a tensor 4x the size of ``x``; with a fused conv
it packs ``x`` and upsamples the packed words instead (`bidm.export.fused.upsampled_conv`), the same codes and
floats.

Anything else (autograd, dropout in training, another method, ``BIDM_FUSED_BLOCK=0``) runs the plain forwards.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.export import fused, kernels
from bidm.unet import ResnetBlock, Upsample, norm_silu


def enabled() -> bool:
    return kernels.switch("BIDM_FUSED_BLOCK")


class PackedResnetBlock(ResnetBlock):
    """`bidm.unet.ResnetBlock` (same modules, same state dict) with the time-embedding add fused into conv1."""

    def forward(self, x, temb: torch.Tensor) -> torch.Tensor:
        dropout_live = self.dropout.training and self.dropout.p > 0
        if torch.is_grad_enabled() or dropout_live or not enabled():
            return super().forward(x, temb)
        t = self.temb_proj(F.silu(temb))
        h = fused.norm_conv(self.conv1, self.norm1, x, row_bias=t.to(torch.float32).contiguous())
        if h is None:
            h = self.conv1(norm_silu(self.norm1, x)) + t[:, :, None, None]
        nin = self._modules.get("nin_shortcut")
        if nin is None:
            return self._conv2(h).add_(x)
        if not (getattr(nin, "can_accumulate", None) and nin.bias is not None and nin.can_accumulate(x)):
            return self._conv2(h).add_(nin(x))  # the plain block's floats (the generic NCHW path, autograd)
        y = self._conv2(h, row_bias=nin.bias.detach().float().expand(h.shape[0], -1).contiguous())
        return nin.accumulate_(y, x)

    def _conv2(self, h: torch.Tensor, row_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``conv2(silu(norm2(h)))`` (then ``+ row_bias``), fused where it can be."""
        y = fused.norm_conv(self.conv2, self.norm2, h, row_bias=row_bias)
        if y is not None:
            return y
        y = self.conv2(norm_silu(self.norm2, h))
        return y if row_bias is None else y + row_bias[:, :, None, None]


class PackedUpsample(Upsample):
    """`bidm.unet.Upsample` (same modules, same state dict) whose conv reads the un-upsampled input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self._modules.get("conv")
        if conv is not None and not torch.is_grad_enabled() and enabled():
            y = fused.upsampled_conv(conv, x, 2)
            if y is not None:
                return y
        return super().forward(x)


def _has_fused_conv(m: nn.Module, name: str) -> bool:
    return getattr(m._modules.get(name), "fake_class", None) in fused.FUSED


def convert_(model: nn.Module) -> nn.Module:
    """Make every plain `bidm.unet.ResnetBlock` / `bidm.unet.Upsample` of ``model`` whose (first) conv has a fused
    forward a `PackedResnetBlock` / `PackedUpsample` (in place). Returns ``model``."""
    for m in model.modules():
        if type(m) is ResnetBlock and _has_fused_conv(m, "conv1"):
            m.__class__ = PackedResnetBlock
        elif type(m) is Upsample and _has_fused_conv(m, "conv"):
            m.__class__ = PackedUpsample
    return model

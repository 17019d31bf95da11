"""A packed UNet ResnetBlock whose time-embedding add goes into its first binary conv's epilogue.

Without autograd `bidm.unet.ResnetBlock` runs

    h = conv1(silu(norm1(x)));  h += temb_proj(silu(temb))[:, :, None, None]
    h = conv2(silu(norm2(h)));  h += skip                        (skip = nin_shortcut(x), or x)

and each ``+=`` is one more read and write of the block's output. When conv1 takes a fused packed forward
(`bidm.export.fused`: XNOR, BiDM), `PackedResnetBlock` hands it the time embedding as a per-sample row bias
(`bidm.export.kernels.Epilogue.row_bias`), added while each tile is written, after the layer's own terms: the
output is the unfused block's to the bit. The skip add stays a torch pass: added in conv2's epilogue too (tried,
the kernel reading the skip 8 channels at a time while it sweeps a weight panel) the BiDM step at batch 64 got 2%
slower (`bench/ab_step.py --switch BIDM_FUSED_BLOCK`, 12 rounds: 0.98x; the row bias alone: 1.03x). Anything else
(autograd, dropout in training, another method, ``BIDM_FUSED_BLOCK=0``) runs the plain block forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.export import fused, kernels
from bidm.unet import ResnetBlock, norm_silu


def enabled() -> bool:
    return kernels.switch("BIDM_FUSED_BLOCK")


class PackedResnetBlock(ResnetBlock):
    """`bidm.unet.ResnetBlock` (same modules, same state dict) with the time-embedding add fused into conv1."""

    def forward(self, x, temb: torch.Tensor) -> torch.Tensor:
        dropout_live = self.dropout.training and self.dropout.p > 0
        if torch.is_grad_enabled() or dropout_live or not enabled():
            return super().forward(x, temb)
        a = norm_silu(self.norm1, x)
        t = self.temb_proj(F.silu(temb))
        conv1 = fused.fused_forward(self.conv1, a)
        if conv1 in fused.FUSED.values() and a.dtype == torch.float32:
            h = conv1(self.conv1, a, row_bias=t.to(torch.float32).contiguous())
        else:
            h = self.conv1(a) + t[:, :, None, None]
        h = self.conv2(norm_silu(self.norm2, h))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


def convert_(model: nn.Module) -> nn.Module:
    """Make every plain `bidm.unet.ResnetBlock` of ``model`` whose conv1 has a fused forward a `PackedResnetBlock`
    (in place). Returns ``model``."""
    for m in model.modules():
        if type(m) is ResnetBlock and getattr(m.conv1, "fake_class", None) in fused.FUSED:
            m.__class__ = PackedResnetBlock
    return model

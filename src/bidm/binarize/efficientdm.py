"""EfficientDM pushed to W1A1: frozen FP weights + a trainable low-rank adapter (QALoRA), LSQ step sizes, and
per-timestep activation step sizes (TALSQ).

Notation: W0 frozen FP weight (``weight``), A [r, fan_in] / B [Cout, r] LoRA factors (``lora_A``, ``lora_B``),
s_w [Cout] weight step sizes (``weight_step``), s_a [n_steps] activation step sizes (``act_step``), one per
timestep bucket k = floor(t * n_steps / num_timesteps).

Forward::

    W   = W0 + (B A).reshape(W0.shape)                          (B = 0 at init: the layer starts at W0)
    y   = (sign(x / s_a[k_b]) (*) sign(W / s_w)) . s_w[o] . s_a[k_b]  [+ FP bias (frozen)]

i.e. LSQ with the two levels {-s, +s} (Qn = Qp = 1); the codes at the binary op are exactly +-1.

Backward (LSQ on the two-level quantizer q = s . sign(v / s))::

    dq/dv = 1_{|v| <= s}
    dq/ds = (sign(v/s) - v/s) . 1_{|v| <= s} + sign(v/s) . 1_{|v| > s}      times g = 1 / sqrt(N . Qp)

with N the weights per output channel (s_w) or the features per sample (s_a); W0 gets no gradient, A and B do.
The timestep comes from the model: ``binarize_`` puts a `TimestepContext` pre-hook on the model, so ``model(x, t)``
sets it; `bidm.binarize.set_timestep` sets it by hand. Init: s_w = mean|W0_o| (the L2-optimal two-level scale);
s_a[k] = mean|x| of the first training-mode batch seen at bucket k, 1 until then (``act_step_ready`` marks the
calibrated buckets; it is a buffer, so a loaded checkpoint keeps its calibration); A ~ kaiming-uniform, B = 0.
``lora_A`` / ``lora_B`` fold into the weight at export (``merged_into_weight``).

Reference: He et al., "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models",
ICLR 2024, §3.2 (QALoRA) and §3.3 (TALSQ); Esser et al., "Learned Step Size Quantization", ICLR 2020 (Eq. 3-5);
BiDM reference §6 (FID 194 at W1A1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from bidm.binarize.core import (
    EPS,
    BinaryConv2d,
    BinaryLinear,
    TimestepContext,
    clip_grad,
    mean_abs_per_out,
    pick,
    register,
    sign_ste,
)
from bidm.errors import BidmError


def scale_grad(s: torch.Tensor, g: float) -> torch.Tensor:
    """LSQ gradient scaling: forward ``s``, backward ``g * dL/ds``."""
    return (s - s * g).detach() + s * g


class _EfficientDM:
    method = "efficientdm"
    merged_into_weight = ("lora_A", "lora_B")

    def init_efficientdm(self, rank: int, n_steps: int, num_timesteps: int) -> None:
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        cout, fan_in = self.weight.shape[0], self.weight[0].numel()
        r = max(1, min(rank, cout, fan_in))
        self.lora_A = nn.Parameter(torch.empty(r, fan_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(cout, r))
        self.weight_step = nn.Parameter(mean_abs_per_out(self.weight).detach().clamp_min(EPS).clone())
        self.act_step = nn.Parameter(torch.ones(n_steps))
        self.register_buffer("act_step_ready", torch.zeros(n_steps, dtype=torch.bool))
        self.n_steps, self.num_timesteps = n_steps, num_timesteps
        self.timestep_ctx = TimestepContext()  # replaced by the model's shared context in `attach_timestep`

    def latent_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A).reshape(self.weight.shape)

    def step_sizes(self, x: torch.Tensor) -> torch.Tensor:
        """s_a of each sample, [B], from the timestep of the forward in progress (initialised on first sight)."""
        t = self.timestep_ctx.t
        if t is None:
            raise BidmError(
                "efficientdm layers need the timestep: call the binarized model as model(x, t), or "
                "bidm.binarize.set_timestep(model, t) before the forward"
            )
        t = t.to(x.device).long().reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.to(x.device).long()
        if t.shape[0] != x.shape[0]:
            raise BidmError(f"efficientdm: {t.shape[0]} timesteps for a batch of {x.shape[0]}")
        k = (t * self.n_steps // self.num_timesteps).clamp(0, self.n_steps - 1)
        if self.training and not x.is_meta:
            self._calibrate(x, k)
        g = 1.0 / math.sqrt(x[0].numel())
        return scale_grad(self.act_step, g)[k].clamp_min(EPS)

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor, k: torch.Tensor) -> None:
        new = ~self.act_step_ready[k]
        if new.any():
            self.act_step[k[new]] = x[new].abs().flatten(1).mean(1).clamp_min(EPS).to(self.act_step.dtype)
            self.act_step_ready[k[new]] = True

    def weight_scale(self) -> torch.Tensor:
        """s_w, [Cout], with LSQ gradient scaling."""
        return scale_grad(self.weight_step, 1.0 / math.sqrt(self.weight[0].numel())).clamp_min(EPS)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        v = x / self.step_sizes(x).reshape(-1, *([1] * (x.dim() - 1)))
        return sign_ste(v, clip_grad)

    def quantize_weight(self) -> torch.Tensor:
        w = self.latent_weight()
        v = w / self.weight_scale().reshape(-1, *([1] * (w.dim() - 1)))
        return sign_ste(v, clip_grad)

    def postprocess(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s_a = self.step_sizes(x).reshape(-1, *([1] * (y.dim() - 1)))
        return self.add_bias(y * self.per_out(self.weight_scale()) * s_a)


class EfficientDMConv2d(_EfficientDM, BinaryConv2d):
    def __init__(self, fp: nn.Conv2d, *, bias: bool, rank: int, n_steps: int, num_timesteps: int):
        super().__init__(fp, bias=bias)
        self.init_efficientdm(rank, n_steps, num_timesteps)


class EfficientDMLinear(_EfficientDM, BinaryLinear):
    def __init__(self, fp: nn.Linear, *, bias: bool, rank: int, n_steps: int, num_timesteps: int):
        super().__init__(fp, bias=bias)
        self.init_efficientdm(rank, n_steps, num_timesteps)


def attach_timestep(model: nn.Module) -> None:
    """Share one `TimestepContext` among the model's EfficientDM layers; the model's pre-hook fills it."""
    layers = [m for m in model.modules() if isinstance(m, _EfficientDM)]
    hooked = [h for h in model._forward_pre_hooks.values() if isinstance(h, TimestepContext)]
    ctx = hooked[0] if hooked else TimestepContext()
    for m in layers:
        m.timestep_ctx = ctx
    if layers and not hooked:
        model.register_forward_pre_hook(ctx, with_kwargs=True)


@register("efficientdm", prepare_model=attach_timestep)
def efficientdm(fp: nn.Module, *, bias: bool = True, rank: int = 32, n_steps: int = 100, num_timesteps: int = 1000):
    """EfficientDM (QALoRA + LSQ + TALSQ) W1A1 layer from an FP nn.Conv2d / nn.Linear."""
    if rank < 1 or n_steps < 1 or num_timesteps < n_steps:
        raise BidmError(f"efficientdm needs rank >= 1 and 1 <= n_steps <= num_timesteps; got {rank}, {n_steps}")
    return pick(
        fp, EfficientDMConv2d, EfficientDMLinear, bias=bias, rank=rank, n_steps=n_steps, num_timesteps=num_timesteps
    )

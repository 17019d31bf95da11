"""The latent-diffusion UNet (CompVis/latent-diffusion ``ldm/modules/diffusionmodules/openaimodel.py``), full
precision, with module names equal to the official checkpoint's keys under ``model.diffusion_model.``.

Architecture (unconditional, 2-D; Dhariwal & Nichol 2021 via Rombach et al. 2022):

    time_embed.{0,2}           Linear(ch, 4ch), SiLU, Linear(4ch, 4ch) on the sinusoidal embedding [cos, sin]
    input_blocks.0.0           3x3 conv in -> ch
    input_blocks.i             ResBlock (+ AttentionBlock at the attention resolutions) per res block; between
                               levels a Downsample (``.op``: 3x3 stride-2 conv) or, with ``resblock_updown``, a
                               ResBlock with ``down=True`` (avg-pool inside)
    middle_block               ResBlock, AttentionBlock, ResBlock
    output_blocks.i            ResBlock on concat(h, skip) (+ AttentionBlock); the last unit of a level ends with
                               an Upsample (``.conv``) or a ResBlock with ``up=True``
    out.{0,2}                  GroupNorm, SiLU, 3x3 conv ch -> out (zero-initialised)

ResBlock: ``in_layers`` (GN, SiLU, 3x3 conv), ``emb_layers`` (SiLU, Linear to C or 2C), ``out_layers`` (GN, SiLU,
Dropout, zero-initialised 3x3 conv), ``skip_connection`` (identity or 1x1 conv). With ``use_scale_shift_norm`` the
embedding gives (scale, shift): ``h = GN(h) * (1 + scale) + shift`` before the rest of ``out_layers``.

One departure from the official module types, for the binarizers: the attention's ``qkv`` and ``proj_out`` are
1x1 ``nn.Conv1d`` there and ``nn.Linear`` (over channels) here -- the same weights with the trailing kernel axis
squeezed (`bidm.ldm.official.convert_unet_state_dict` does that when loading), the same MACs. A binarized Linear
is exactly the reference's BNNConv1d: sign activations and alpha * sign(W), no K map, no shortcut, no bias.

Modules that LDM wraps in ``zero_module`` (each ResBlock's last conv, each attention ``proj_out``, the last conv)
carry ``zero_init = True``; binarizers read it to zero their own new parameters as ``zero_module`` does to the
official BNN layers (BiDM's shortcut scale stays 0, reference §2a.5). No binarization code lives here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.errors import ConfigError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """LDM/ADM sinusoidal embedding: [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """LDM's ``normalization``: 32 groups, eps 1e-5, computed in float32."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """LDM's ``zero_module``: zero the parameters and mark the module (``zero_init = True``) for the binarizers."""
    for p in module.parameters():
        nn.init.zeros_(p)
    module.zero_init = True
    return module


class Upsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, dropout: float, out_ch: int, scale_shift: bool, up=False, down=False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(ch, False), Upsample(ch, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(ch, False), Downsample(ch, False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_ch), nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with LDM's legacy head order (``QKVAttentionLegacy``); the QK^T and AV matmuls are
    not modules (they stay FP)."""

    def __init__(self, ch: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(ch)
        self.qkv = nn.Linear(ch, 3 * ch)  # official: Conv1d(ch, 3ch, 1)
        self.proj_out = zero_init(nn.Linear(ch, ch))  # official: zero_module(Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(x).transpose(1, 2)).transpose(1, 2)  # [B, 3C, T]
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, hh * ww).split(ch, dim=1)  # each [B*heads, ch, T]
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, hh * ww)
        h = self.proj_out(h.transpose(1, 2)).transpose(1, 2)
        return (x + h).reshape(b, c, hh, ww)


class TimestepEmbedSequential(nn.Sequential):
    """LDM's block: layers run in order, ResBlocks get the embedding too. Its output is one feature block."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _heads(ch: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention block at width ``ch`` (openaimodel: num_head_channels wins when given)."""
    if num_head_channels != -1:
        if ch % num_head_channels:
            raise ConfigError(f"attention width {ch} is not a multiple of model.num_head_channels={num_head_channels}")
        return ch // num_head_channels
    if num_heads < 1 or ch % num_heads:
        raise ConfigError(f"attention width {ch} is not divisible by model.num_heads={num_heads}")
    return num_heads


class LDMUNet(nn.Module):
    """The LDM UNet from a `bidm.unet.UNetConfig` with ``arch="ldm"``: ``forward(x [B,C,H,W], t [B]) -> eps``.

    Config fields: ``ch`` = model_channels, ``ch_mult`` = channel_mult, ``num_res_blocks``, ``attn_resolutions``
    = the *feature resolutions* with attention (LDM's yaml gives downsample factors ``ds``: resolution =
    ``resolution / ds``, e.g. bedrooms [8, 4, 2] at 64 -> [8, 16, 32]), ``dropout``, ``in_channels``, ``out_ch``,
    ``resolution`` = the latent size, ``resamp_with_conv`` = conv_resample, ``num_heads`` / ``num_head_channels``,
    ``use_scale_shift_norm``, ``resblock_updown``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        ch, emb_ch = cfg.ch, cfg.ch * 4
        heads = lambda c: _heads(c, cfg.num_heads, cfg.num_head_channels)  # noqa: E731
        block = lambda c, o, **kw: ResBlock(c, emb_ch, cfg.dropout, o, cfg.use_scale_shift_norm, **kw)  # noqa: E731
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        chans, cur, res = [ch], ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [block(cur, ch * mult)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(AttentionBlock(cur, heads(cur)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(cur)
            if level != len(cfg.ch_mult) - 1:
                down = block(cur, cur, down=True) if cfg.resblock_updown else Downsample(cur, cfg.resamp_with_conv)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(cur)
                res //= 2
        self.middle_block = TimestepEmbedSequential(block(cur, cur), AttentionBlock(cur, heads(cur)), block(cur, cur))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [block(cur + chans.pop(), ch * mult)]
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(AttentionBlock(cur, heads(cur)))
                if level and i == cfg.num_res_blocks:
                    layers.append(
                        block(cur, cur, up=True) if cfg.resblock_updown else Upsample(cur, cfg.resamp_with_conv)
                    )
                    res *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(cur), nn.SiLU(), zero_init(nn.Conv2d(ch, cfg.out_ch, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        down = 2 ** (len(self.config.ch_mult) - 1)
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[-1] % down or x.shape[-2] % down:
            raise ConfigError(
                f"LDMUNet expects [B, {self.config.in_channels}, H, W] with H, W divisible by {down}, "
                f"got {tuple(x.shape)}"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.ch))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def feature_blocks(self) -> list[str]:
        """Every TimestepEmbedSequential in execution order (inputs, middle, outputs): LDM's TBS/SPD features."""
        names = [f"input_blocks.{i}" for i in range(len(self.input_blocks))] + ["middle_block"]
        return names + [f"output_blocks.{i}" for i in range(len(self.output_blocks))]

    def num_output_blocks(self) -> int:
        return len(self.output_blocks)

"""Full-precision diffusion UNets used as teachers (and, after `binarize_`, as students).

`DDIMUNet` is the DDPM/DDIM CIFAR-10 architecture (Ho et al. 2020; Song et al. 2021) with module names equal to the
keys of the official checkpoint (pesser/pytorch_diffusion ``model-790000.ckpt``, ermongroup/ddim ``ckpt.pth``), so
weights load by key. `DiffusersUNet` adapts a diffusers ``UNet2DModel`` to the same ``forward(x, t) -> eps`` and
``feature_blocks()`` interface. No binarization code lives here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.errors import CheckpointError, ConfigError
from bidm.fields import num


@dataclass
class UNetConfig:
    """Architecture of the FP UNet. Defaults are the DDIM CIFAR-10 model (35.7 M params)."""

    arch: str = "ddim"  # "ddim" (DDIMUNet), "ldm" (bidm.ldm.unet.LDMUNet) or "diffusers" (from `diffusers_config`)
    ch: int = num(128, gt=0)
    ch_mult: tuple[int, ...] = num((1, 2, 2, 2), gt=0)
    num_res_blocks: int = num(2, gt=0)
    attn_resolutions: tuple[int, ...] = num((16,), gt=0)
    dropout: float = num(0.1, ge=0, lt=1)
    in_channels: int = num(3, gt=0)
    out_ch: int = num(3, gt=0)
    resolution: int = num(32, gt=0)
    resamp_with_conv: bool = True
    diffusers_config: dict = field(default_factory=dict)
    # arch="ldm" only (openaimodel options; attn_resolutions are feature resolutions there too, see LDMUNet)
    num_heads: int = -1  # heads per attention block, used when num_head_channels = -1
    num_head_channels: int = -1  # channels per head (bedrooms/FFHQ: 32); -1 = use num_heads
    use_scale_shift_norm: bool = False  # ResBlocks apply the embedding as GN(h) * (1 + scale) + shift
    resblock_updown: bool = False  # resample with ResBlocks (avg-pool / nearest inside) instead of (de)convs

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if self.arch not in ("ddim", "ldm", "diffusers"):
            raise ConfigError(f"model.arch must be 'ddim', 'ldm' or 'diffusers', got {self.arch!r}")
        if self.arch == "ldm" and self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("model.arch=ldm needs model.num_heads or model.num_head_channels")
        if self.arch in ("ddim", "ldm"):
            if self.ch % 32 or any(self.ch * m % 32 for m in self.ch_mult):
                raise ConfigError(f"model.ch * ch_mult must be multiples of 32 (GroupNorm groups), got {self.ch}")
            if self.resolution % 2 ** (len(self.ch_mult) - 1):
                raise ConfigError(f"resolution {self.resolution} not divisible by 2^(levels-1)")


def tiny_unet_config(resolution: int = 16, in_channels: int = 3) -> UNetConfig:
    """A ~0.2 M-parameter UNet with the same block structure, for tests."""
    return UNetConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(resolution // 2,),
        dropout=0.0,
        in_channels=in_channels,
        out_ch=in_channels,
        resolution=resolution,
    )


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the DDPM code: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(half-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``. A norm that can apply the SiLU itself (``fuses_silu``: the packed runtime's
    `bidm.export.norm.PackedGroupNorm`) is asked to, saving a pass over memory; otherwise the SiLU runs in place
    when autograd is off."""
    if getattr(norm, "fuses_silu", False):
        return norm(x, silu=True)
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def _add_to_fresh(h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``h + other``, written into ``h`` (a tensor the caller just made) when autograd is off and the sum keeps
    ``h``'s dtype (under autocast ``other`` may be wider): the same values either way. Under ``torch.compile`` the
    plain sum (Inductor fuses it; ``result_type`` would break the graph)."""
    if torch.compiler.is_compiling():
        return h + other
    if not torch.is_grad_enabled() and torch.result_type(h, other) == h.dtype:
        return h.add_(other)
    return h + other


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], dim=1)


class ResnetBlock(nn.Module):
    # How the up path hands this block ``[h, skip]``. The packed runtime may set a block's ``concat`` to one that
    # leaves the pair unconcatenated for a norm and a 1x1 conv that read it as such (bidm.export.skip_concat).
    concat = staticmethod(cat_channels)

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # Without autograd (sampling, the teacher, TBS cache passes) the SiLU and the adds run in place on tensors
        # this block just made: the same values, fewer passes over memory (bench/kernel.py's full step).
        h = self.conv1(norm_silu(self.norm1, x))
        h = _add_to_fresh(h, self.temb_proj(F.silu(temb))[:, :, None, None])
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return _add_to_fresh(h, skip)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; the QK^T and AV matmuls are not modules (they stay FP)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [B, HW, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, HW]
        v = self.v(h).reshape(b, c, hh * ww)  # [B, C, HW]
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # [B, HW(query), HW(key)]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # keep the input's layout (the packed runtime's): the same sums, written [B, HW, C]
            h = torch.bmm(w, v.permute(0, 2, 1)).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        else:
            h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad of the DDPM code
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class DDIMUNet(nn.Module):
    """The DDPM/DDIM UNet. ``forward(x [B,C,H,W], t [B] int64) -> eps [B,out_ch,H,W]``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, temb_ch, levels = cfg.ch, cfg.ch * 4, len(cfg.ch_mult)
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i in range(levels):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, temb_ch, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != levels - 1:
                level.downsample = Downsample(block_in, cfg.resamp_with_conv)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg.dropout)

        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * cfg.ch_mult[i]
            for j in range(cfg.num_res_blocks + 1):
                skip_in = ch * in_mult[i] if j == cfg.num_res_blocks else ch * cfg.ch_mult[i]
                level.block.append(ResnetBlock(block_in + skip_in, block_out, temb_ch, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            self.up.insert(0, level)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[-1] % 2 ** (len(self.down) - 1):
            raise ConfigError(
                f"DDIMUNet expects [B, {self.config.in_channels}, H, W] with H, W divisible by "
                f"{2 ** (len(self.down) - 1)}, got {tuple(x.shape)}"
            )
        temb = timestep_embedding(t, self.config.ch)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
                hs.append(h)
            if i != len(self.down) - 1:
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(block.concat(h, hs.pop()), temb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(norm_silu(self.norm_out, h))

    def feature_blocks(self) -> list[str]:
        """Module names whose outputs are the UNet's "blocks" (LDM's TimestepEmbedSequential), in execution order.

        Input blocks: conv_in, each res(+attn) unit, each downsample. Middle: mid.block_2. Output blocks: each
        res(+attn) unit of the decoder, where a level's last unit ends with (and is named by) its upsample.
        For the CIFAR-10 UNet this gives 12 + 1 + 12 blocks, the same count as LDM-4 bedrooms.
        """
        names = ["conv_in"]
        for i, level in enumerate(self.down):
            for j in range(len(level.block)):
                names.append(f"down.{i}.attn.{j}" if len(level.attn) else f"down.{i}.block.{j}")
            if hasattr(level, "downsample"):
                names.append(f"down.{i}.downsample")
        names.append("mid.block_2")
        names += self._output_block_names()
        return names

    def _output_block_names(self) -> list[str]:
        names = []
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j in range(len(level.block)):
                last = j == len(level.block) - 1
                if last and hasattr(level, "upsample"):
                    names.append(f"up.{i}.upsample")
                else:
                    names.append(f"up.{i}.attn.{j}" if len(level.attn) else f"up.{i}.block.{j}")
        return names

    def num_output_blocks(self) -> int:
        return len(self._output_block_names())


def json_config(config) -> dict:
    """A diffusers model config as plain JSON: its architecture keys only. The ``_name_or_path`` (a Path after
    ``from_pretrained``), ``_class_name`` and ``_diffusers_version`` entries are bookkeeping, not architecture, and
    tuples become lists, so the dict survives the JSON of a checkpoint and rebuilds the same model."""
    import json

    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` behind the bidm interface: ``forward(x, t) -> eps`` and ``feature_blocks()``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        c = unet.config
        self.config = UNetConfig(
            arch="diffusers",
            in_channels=c.in_channels,
            out_ch=c.out_channels,
            resolution=c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0],
            diffusers_config=json_config(c),
        )

    @classmethod
    def from_config_dict(cls, config: dict) -> DiffusersUNet:
        from diffusers import UNet2DModel

        return cls(UNet2DModel.from_config(config))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DiffusersUNet:
        """Load a local ``save_pretrained`` directory (never downloads)."""
        from diffusers import UNet2DModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is not a diffusers UNet2DModel directory (no config.json); "
                "create one with UNet2DModel.save_pretrained(DIR)"
            )
        return cls(UNet2DModel.from_pretrained(path, local_files_only=True))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample

    def feature_blocks(self) -> list[str]:
        return self._input_block_names() + ["unet.mid_block"] + self._output_block_names()

    def _input_block_names(self) -> list[str]:
        names = ["unet.conv_in"]
        for i, block in enumerate(self.unet.down_blocks):
            units = getattr(block, "attentions", None) or block.resnets
            kind = "attentions" if getattr(block, "attentions", None) else "resnets"
            names += [f"unet.down_blocks.{i}.{kind}.{j}" for j in range(len(units))]
            if getattr(block, "downsamplers", None):
                names.append(f"unet.down_blocks.{i}.downsamplers.0")
        return names

    def _output_block_names(self) -> list[str]:
        names = []
        for i, block in enumerate(self.unet.up_blocks):
            kind = "attentions" if getattr(block, "attentions", None) else "resnets"
            n = len(block.resnets)
            for j in range(n):
                if j == n - 1 and getattr(block, "upsamplers", None):
                    names.append(f"unet.up_blocks.{i}.upsamplers.0")
                else:
                    names.append(f"unet.up_blocks.{i}.{kind}.{j}")
        return names

    def num_output_blocks(self) -> int:
        return len(self._output_block_names())


def build_unet(cfg: UNetConfig) -> nn.Module:
    if cfg.arch == "diffusers":
        if not cfg.diffusers_config:
            raise ConfigError("model.arch=diffusers needs model.diffusers_config (or a --teacher directory)")
        return DiffusersUNet.from_config_dict(cfg.diffusers_config)
    if cfg.arch == "ldm":
        from bidm.ldm.unet import LDMUNet

        return LDMUNet(cfg)
    return DDIMUNet(cfg)


def config_dict(cfg: UNetConfig) -> dict:
    return asdict(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints


def read_official_state_dict(path: str | Path, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read an official DDIM/pytorch_diffusion CIFAR-10 checkpoint without unpickling arbitrary objects.

    Accepts a plain state dict (pytorch_diffusion ``model-790000.ckpt``), a ``{"state_dict": ...}`` dict, or the
    DDIM repo's ``[model, optimizer, epoch, step, ema]`` list (the EMA entry is taken when ``prefer_ema``).
    The ``module.`` prefix of DataParallel is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found. The EMA DDIM CIFAR-10 weights are `model-790000.ckpt` from "
            "pesser/pytorch_diffusion (ema_diffusion_cifar10_model); download it and pass its path."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled code; a truncated file also lands here
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from err
    if isinstance(obj, (list, tuple)):
        obj = obj[-1] if prefer_ema and len(obj) >= 5 else obj[0]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_reporting(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load by key; any missing, unexpected or mis-shaped key is an error that names the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:5]})")
        if shapes:
            parts.append(f"shape mismatch for {sorted(shapes)[:5]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state)


def load_official_ddim(path: str | Path, cfg: UNetConfig | None = None) -> DDIMUNet:
    """Build the DDIM CIFAR-10 UNet and load the official (EMA) checkpoint by key."""
    model = DDIMUNet(cfg or UNetConfig())
    load_state_dict_reporting(model, read_official_state_dict(path), source=str(path))
    return model

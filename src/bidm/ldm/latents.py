"""Training on first-stage latents: the frozen autoencoder turns each image batch into z (LatentDiffusion's
``get_input``), either on the fly from streamed images or from moments cached on disk once.

`prepare_latents(cfg, images)` returns (cfg with the resolved ``first_stage.scale_factor``, the data the trainer
indexes -- images, or the cached moments -- and a wrapper for the training objective). The objective then sees
latents z as its ``x0``; the KL draw (``FirstStage.latents``) uses the step's generator, so a resumed run draws
the same z.

Latent cache (``first_stage.latent_cache`` = a directory): ``moments.npy`` (float32 [N, C, h, w]; VQ: h, KL: mean
and logvar) and ``moments.json`` (what was encoded: data path, size, count, limit, seed, first stage). A cache whose
``moments.json`` does not match the config is an error, never silently reused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from bidm.errors import DataError
from bidm.ldm.first_stage import FirstStage, load_autoencoder, resolve_scale_factor


class LatentObjective(nn.Module):
    """``objective(model, z, generator, shard)`` on the latents of the batch: images (or cached moments) -> z."""

    def __init__(self, inner: nn.Module, first_stage: FirstStage, *, from_moments: bool):
        super().__init__()
        self.inner, self.first_stage, self.from_moments = inner, first_stage, from_moments

    def before_step(self, model: nn.Module, step: int, total: int) -> None:
        if hasattr(self.inner, "before_step"):
            self.inner.before_step(model, step, total)

    def forward(self, model, x, generator, shard=None):
        moments = x if self.from_moments else self.first_stage.moments(x)
        return self.inner(model, self.first_stage.latents(moments, generator, shard), generator, shard)


class Moments(Dataset):
    """Rows of a cached ``moments.npy`` (memory-mapped), as float tensors."""

    def __init__(self, file: Path):
        self.array = np.load(file, mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i]))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stack(images, idx: torch.Tensor) -> torch.Tensor:
    return images[idx] if isinstance(images, torch.Tensor) else torch.stack([images[int(i)] for i in idx])


def encode_dataset(first_stage: FirstStage, images, file: Path, *, batch_size: int = 32, workers: int = 0) -> None:
    """Write the moments of every item of ``images`` (tensor or dataset), in order, to ``file`` (``.npy``)."""
    from bidm.fileio import atomic_write

    device = _device()
    fs = first_stage.to(device)
    n = len(images)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers)
    first = fs.moments(_stack(images, torch.arange(1)).to(device))

    def write(tmp):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *first.shape[1:]))
        start = 0
        for batch in loader:
            m = fs.moments(batch.to(device)).float().cpu().numpy()
            out[start : start + len(m)] = m
            start += len(m)
        out.flush()
        del out

    atomic_write(file, write)


def _cache(cfg, first_stage: FirstStage, images) -> Moments:
    d, fs = cfg.data, cfg.first_stage
    directory = Path(fs.latent_cache)
    meta = {
        "data": {"name": d.name, "path": d.path, "split": d.split, "size": d.size, "limit": d.limit},
        "seed": cfg.train.seed if d.limit else None,  # the seeded subset of data.limit
        "n": len(images),
        "first_stage": {k: v for k, v in dataclasses.asdict(fs).items() if k not in ("scale_factor", "latent_cache")},
    }
    meta = json.loads(json.dumps(meta))
    meta_file, file = directory / "moments.json", directory / "moments.npy"
    if meta_file.is_file() and file.is_file():
        stored = json.loads(meta_file.read_text())
        if stored != meta:
            raise DataError(
                f"latent cache {directory} holds other latents ({stored}); not those of this config ({meta}): "
                "choose another first_stage.latent_cache"
            )
        return Moments(file)
    directory.mkdir(parents=True, exist_ok=True)
    encode_dataset(first_stage, images, file, workers=d.workers)
    from bidm.fileio import atomic_write_text

    atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")
    return Moments(file)


def check_latent_shape(cfg) -> None:
    """The UNet must take the first stage's latents: channels = embed_dim, size = data.size / f."""
    from bidm.errors import ConfigError

    fs, m = cfg.first_stage, cfg.model
    size = cfg.data.size // fs.factor
    if cfg.data.size % fs.factor or (m.in_channels, m.resolution) != (fs.embed_dim, size):
        raise ConfigError(
            f"the first stage turns {cfg.data.size}x{cfg.data.size} images into [{fs.embed_dim}, {size}, {size}] "
            f"latents but the model expects in_channels={m.in_channels}, resolution={m.resolution}"
        )


def prepare_latents(cfg, images):
    """(cfg with ``first_stage.scale_factor`` resolved, the training data, objective -> `LatentObjective`)."""
    from bidm.ldm.first_stage import estimate_scale_factor
    from bidm.train import BatchOrder

    check_latent_shape(cfg)
    fs = cfg.first_stage
    autoencoder, from_file = load_autoencoder(fs)
    scale = resolve_scale_factor(fs, from_file)
    if scale is None:  # LDM's scale_by_std: 1/std of the latents of the first training batch
        batch = _stack(images, BatchOrder(len(images), cfg.train.batch_size, cfg.train.seed).indices(0))
        g = torch.Generator().manual_seed(cfg.train.seed)
        scale = estimate_scale_factor(FirstStage(autoencoder, fs.kind, 1.0), batch, g)
    first_stage = FirstStage(autoencoder, fs.kind, scale)
    cfg = dataclasses.replace(cfg, first_stage=dataclasses.replace(fs, scale_factor=scale))
    data = _cache(cfg, first_stage, images) if fs.latent_cache else images

    def wrap(objective: nn.Module) -> nn.Module:
        return LatentObjective(objective, first_stage, from_moments=bool(fs.latent_cache))

    return cfg, data, wrap

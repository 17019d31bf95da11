"""Generate samples from any model (FP, fake-binary or packed) with the DDIM sampler from a fixed x_T."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bidm.config import Config
from bidm.diffusion import ddim_sample, initial_noise
from bidm.npz_io import images_to_uint8
from bidm.train import schedule


@torch.no_grad()
def generate(
    model: nn.Module,
    cfg: Config,
    *,
    n: int | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    eta: float | None = None,
    skip: str | None = None,
    seed: int | None = None,
    clip_x0: bool | None = None,
    progress: bool = True,
) -> np.ndarray:
    """``n`` images as uint8 NHWC. Image i always starts from the same x_T for a seed (`initial_noise`), so every
    model sampled with the same seed is compared from the same noise. Unset arguments come from ``cfg.sample``."""
    s = cfg.sample
    n, batch_size = n or s.n, batch_size or s.batch_size
    steps, skip = steps or s.steps, skip or s.skip
    eta = s.eta if eta is None else eta
    seed = s.seed if seed is None else seed
    clip_x0 = s.clip_x0 if clip_x0 is None else clip_x0
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    device = next(model.parameters()).device
    acp = schedule(cfg).to(device)
    x_T = initial_noise(n, shape, seed)
    model.eval()
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sample", disable=not progress):
        generator = torch.Generator().manual_seed(seed * 7_919 + start)
        x0 = ddim_sample(
            model,
            x_T[start : start + batch_size].to(device),
            acp,
            steps=steps,
            eta=eta,
            skip=skip,
            generator=generator,
            clip_x0=clip_x0,
        )
        out.append(images_to_uint8(x0))
    return np.concatenate(out)

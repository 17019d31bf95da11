"""Generate samples from any model (FP, fake-binary or packed) with the DDIM sampler from a fixed x_T."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from bidm.config import Config, updated
from bidm.diffusion import ddim_sample, initial_noise
from bidm.errors import BidmError
from bidm.npz_io import images_to_uint8
from bidm.shard import chunks
from bidm.train import schedule


class NonFiniteSamples(BidmError):
    """The model produced NaN or inf: its weights diverged, the samples would be meaningless."""


def check_finite_model(model: nn.Module) -> None:
    """Refuse to sample a model whose weights or buffers hold NaN/inf (a diverged checkpoint)."""
    from bidm.checkpoint import first_nonfinite

    bad = first_nonfinite(dict(model.state_dict()))
    if bad is not None:
        raise NonFiniteSamples(f"the model's tensor {bad!r} holds NaN/inf (diverged weights): refusing to sample it")


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
    rank: int = 0,
    world: int = 1,
) -> np.ndarray:
    """``n`` images as uint8 NHWC. Image i always starts from the same x_T for a seed (`initial_noise`), so every
    model sampled with the same seed is compared from the same noise. Unset (None) arguments come from
    ``cfg.sample``; given ones are checked against its ranges (``n=0`` is an error, not "the default").

    Raises `NonFiniteSamples` when the weights or any generated image hold NaN/inf, instead of writing them as
    black or white images.

    ``rank`` / ``world`` (data-parallel sampling): this process generates only the chunks `bidm.shard.chunks` gives
    it, and returns them in order (an empty array if none); chunk k and its noise are those of a single process, so
    gathering every process's chunks in chunk order gives exactly the single-process images.
    """
    s = updated(cfg.sample, "sample", n=n, batch_size=batch_size, steps=steps, eta=eta, skip=skip, seed=seed,
                clip_x0=clip_x0)  # fmt: skip
    n, batch_size, steps, skip, eta, seed, clip_x0 = s.n, s.batch_size, s.steps, s.skip, s.eta, s.seed, s.clip_x0
    check_finite_model(model)
    shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    device = next(model.parameters()).device
    acp = schedule(cfg).to(device)
    x_T = initial_noise(n, shape, seed)
    model.eval()
    decoder = None
    if cfg.first_stage.kind != "none":  # latent diffusion: DDIM runs on latents, the first stage decodes them
        from bidm.ldm.first_stage import load_first_stage

        decoder = load_first_stage(cfg.first_stage).to(device)
    out = []
    for start in tqdm(chunks(n, batch_size, rank, world), desc="sample", disable=not progress):
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
        bad = int((~torch.isfinite(x0)).sum())
        if bad:
            raise NonFiniteSamples(
                f"sampling produced {bad} NaN/inf values in images {start}..{start + len(x0) - 1} (the model "
                "diverged or overflows); no samples written"
            )
        out.append(images_to_uint8(x0 if decoder is None else decoder.decode(x0)))
    if not out:  # a process of a large group may get no chunk
        return np.zeros((0, 0, 0, 0), dtype=np.uint8)
    return np.concatenate(out)

"""Diffusion math as pure functions: beta schedules, forward noising, the epsilon loss and the DDIM sampler.

Notation (code name -> paper symbol, Song et al. 2021 "DDIM"):
    acp[t]   -> alpha_t (cumulative product of 1 - beta, the DDIM paper's alpha, DDPM's alpha-bar)
    x_t      -> noisy image at step t, eps -> the Gaussian noise, eta -> the DDIM stochasticity knob

The sampler is apart from any model: it takes a *denoiser* ``denoiser(x, t, state) -> (eps, state)``. A plain UNet
is adapted by `as_denoiser`; models with cross-timestep state (BiDM's TBS cache) expose ``model.denoise`` with that
signature and receive back at step k the state they returned at step k-1 (``None`` at the first step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bidm.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


def make_betas(
    schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Beta schedule in float64.

    ``linear``: DDPM/DDIM, evenly spaced betas (CIFAR-10: 1e-4 .. 0.02, T=1000).
    ``sqrt_linear``: LDM's "linear", evenly spaced sqrt(beta), squared (LDM: 0.0015 .. 0.0195).
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "sqrt_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    raise ConfigError(f"unknown beta schedule {schedule!r}; expected one of ['linear', 'sqrt_linear']")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_t = prod_{s<=t} (1 - beta_s), float64, shape [T]."""
    return torch.cumprod(1.0 - betas, dim=0)


def _gather(acp: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """acp[t] as a [B, 1, 1, 1] tensor in the dtype/device of ``like``."""
    values = acp.to(like.device)[t.to(like.device)].to(like.dtype)
    return values.view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_t) * x0 + sqrt(1 - alpha_t) * eps (closed-form forward process)."""
    a = _gather(acp, t, x0)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def eps_loss(eps_hat: torch.Tensor, eps: torch.Tensor, reduction: str = "mean", kind: str = "l2") -> torch.Tensor:
    """Epsilon-prediction loss.

    ``reduction="mean"``: mean over every element (LDM, diffusers). ``"sum"``: sum over C,H,W then mean over the
    batch (the DDIM repo's ``noise_estimation_loss`` and the BiDM CIFAR code). ``kind`` is ``l2`` or ``l1``
    (LSUN-Churches LDM uses L1).
    """
    if kind == "l2":
        err = (eps - eps_hat).square()
    elif kind == "l1":
        err = (eps - eps_hat).abs()
    else:
        raise ConfigError(f"unknown loss kind {kind!r}; expected 'l2' or 'l1'")
    if reduction == "mean":
        return err.mean()
    if reduction == "sum":
        return err.flatten(1).sum(dim=1).mean()
    raise ConfigError(f"unknown loss reduction {reduction!r}; expected 'mean' or 'sum'")


def ddim_timesteps(steps: int, num_timesteps: int = 1000, skip: str = "uniform") -> list[int]:
    """The DDIM timestep sequence, increasing (the sampler walks it backwards).

    ``uniform``: t_i = floor(i * T / S) for i = 0 .. S-1: exactly S distinct increasing steps, the last within T/S
    of T-1. Where S divides T this is the DDIM repo's ``range(0, T, T // S)``; elsewhere that list truncated to S
    entries would start far from T (S = 150: t = 894), so the spacing is spread evenly instead.
    ``quad``: (linspace(0, sqrt(0.8 T), steps) ** 2) as ints (the DDIM repo's).
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    if skip == "uniform":
        return [i * num_timesteps // steps for i in range(steps)]
    if skip == "quad":
        seq = np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2
        return [int(s) for s in seq]
    raise ConfigError(f"unknown DDIM skip {skip!r}; expected 'uniform' or 'quad'")


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (Song et al. 2021, Eq. 12). Returns (x_prev, x0_pred).

    1. x0_pred = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
       with ``clip_x0``: x0_pred <- clamp(x0_pred, -1, 1), eps <- (x_t - sqrt(a_t) x0_pred) / sqrt(1 - a_t)
       (improved-diffusion's ``clip_denoised``; the DDIM and LDM samplers do not clip)
    2. sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    3. x_prev = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev - sigma^2) * eps + sigma * z
    """
    x0_pred = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip_x0:
        x0_pred = x0_pred.clamp(-1, 1)
        eps = (x_t - a_t.sqrt() * x0_pred) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    x_prev = a_prev.sqrt() * x0_pred + (1 - a_prev - sigma**2).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, x0_pred


def as_denoiser(model: Callable) -> Denoiser:
    """Adapt a model to the sampler's ``denoiser(x, t, state) -> (eps, state)`` signature."""
    if hasattr(model, "denoise"):
        return model.denoise

    def denoise(x: torch.Tensor, t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return model(x, t), state

    return denoise


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser | torch.nn.Module,
    x_T: torch.Tensor,
    acp: torch.Tensor,
    *,
    steps: int = 100,
    eta: float = 0.0,
    skip: str = "uniform",
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_x0: bool = False,
) -> torch.Tensor:
    """DDIM sampling from x_T, following the DDIM repo's ``generalized_steps`` (a_prev = 1 after t = 0).

    ``denoiser`` is a model (adapted with `as_denoiser`) or a ``(x, t, state) -> (eps, state)`` callable; the state
    returned at one step is handed to the next. ``clip_x0`` clamps each step's x0 prediction to [-1, 1] (off in the
    DDIM/LDM code; small, briefly trained models need it, see `ddim_step`). Returns x_0 (callers clip to [-1, 1]).
    """
    if isinstance(denoiser, torch.nn.Module):
        denoiser = as_denoiser(denoiser)
    seq = ddim_timesteps(steps, len(acp), skip)
    seq_prev = [-1] + seq[:-1]
    acp = acp.to(x_T.device)
    x, state = x_T, None
    pairs = list(zip(reversed(seq), reversed(seq_prev)))
    for t, t_prev in tqdm(pairs, desc="ddim", disable=not progress, leave=False):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps, state = denoiser(x, t_batch, state)
        a_t = acp[t].to(x.dtype)
        a_prev = acp[t_prev].to(x.dtype) if t_prev >= 0 else torch.ones((), dtype=x.dtype, device=x.device)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        x, _ = ddim_step(x, eps, a_t, a_prev, eta, noise, clip_x0=clip_x0)
    return x


def initial_noise(n: int, shape: tuple[int, ...], seed: int, batch_size: int | None = None) -> torch.Tensor:
    """Fixed x_T for a seed: image i's noise depends only on (seed, i), so every model (and any batch size)
    is sampled from the same x_T. Shape [n, *shape], float32, CPU."""
    out = torch.empty((n, *shape))
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out[i] = torch.randn(shape, generator=g)
    return out


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of an NCHW batch to size x size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

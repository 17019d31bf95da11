import math

import numpy as np
import pytest
import torch

from bidm.diffusion import (
    alphas_cumprod,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    eps_loss,
    initial_noise,
    make_betas,
    q_sample,
)
from bidm.errors import ConfigError


def test_linear_schedule_closed_form():
    betas = make_betas("linear", 1000, 1e-4, 0.02)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert betas[500].item() == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999)
    acp = alphas_cumprod(betas)
    expected = np.prod([1 - (1e-4 + s * (0.02 - 1e-4) / 999) for s in range(11)])
    assert acp[10].item() == pytest.approx(expected, rel=1e-12)


def test_sqrt_linear_schedule_is_ldm_linear():
    betas = make_betas("sqrt_linear", 1000, 0.0015, 0.0195)
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0195)
    mid = (math.sqrt(0.0015) + (math.sqrt(0.0195) - math.sqrt(0.0015)) * 300 / 999) ** 2
    assert betas[300].item() == pytest.approx(mid)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ConfigError, match="linear"):
        make_betas("cosine")


def test_q_sample_closed_form():
    acp = alphas_cumprod(make_betas())
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 10, 999])
    out = q_sample(x0, t, eps, acp)
    for i in range(3):
        a = acp[t[i]].item()
        torch.testing.assert_close(out[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i])


def test_eps_loss_mean_and_pixel_sum():
    a, b = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    b[1] *= 2
    assert eps_loss(a, b, "mean").item() == pytest.approx((4 * 1 + 4 * 4) / 8)
    assert eps_loss(a, b, "sum").item() == pytest.approx((4 + 16) / 2)
    assert eps_loss(a, b, "mean", kind="l1").item() == pytest.approx(1.5)


def test_ddim_timesteps_uniform_and_quad():
    assert ddim_timesteps(100, 1000, "uniform") == list(range(0, 1000, 10))
    assert ddim_timesteps(4, 1000, "uniform") == [0, 250, 500, 750]
    quad = ddim_timesteps(5, 1000, "quad")
    assert quad == [int(x) for x in np.linspace(0, np.sqrt(800), 5) ** 2]
    assert quad[0] == 0 and quad[-1] == 800
    with pytest.raises(ConfigError):
        ddim_timesteps(0, 1000)


@pytest.mark.parametrize("steps", [30, 100, 150, 300, 1000, 7, 999])
def test_ddim_timesteps_any_step_count(steps):
    T = 1000
    seq = ddim_timesteps(steps, T, "uniform")
    assert len(seq) == steps and len(set(seq)) == steps  # exactly S distinct steps
    assert seq == sorted(seq) and seq[0] == 0
    assert (T - 1) - seq[-1] < T / steps  # the first sampler step is within T/S of T-1
    gaps = np.diff(seq)
    assert gaps.min() >= np.floor(T / steps) and gaps.max() <= np.ceil(T / steps)
    if T % steps == 0:
        assert seq == list(range(0, T, T // steps))  # the official list where S divides T


def test_ddim_timesteps_150_does_not_start_at_894():
    assert ddim_timesteps(150, 1000)[-1] == 993  # range(0, 1000, 6)[:150] would end at 894


def test_ddim_step_matches_hand_written_update():
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a_t, a_prev = torch.tensor(0.5), torch.tensor(0.8)
    noise = torch.randn_like(x)
    eta = 0.7
    x0 = (x - math.sqrt(0.5) * eps) / math.sqrt(0.5)
    sigma = eta * math.sqrt((1 - 0.8) / (1 - 0.5)) * math.sqrt(1 - 0.5 / 0.8)
    expected = math.sqrt(0.8) * x0 + math.sqrt(1 - 0.8 - sigma**2) * eps + sigma * noise
    out, x0_pred = ddim_step(x, eps, a_t, a_prev, eta, noise)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x0_pred, x0)


def test_ddim_sample_carries_state_and_walks_timesteps_backwards():
    acp = alphas_cumprod(make_betas())
    seen = []

    def denoiser(x, t, state):
        seen.append((int(t[0]), state))
        return torch.zeros_like(x), int(t[0])

    ddim_sample(denoiser, torch.randn(2, 1, 4, 4), acp, steps=4)
    assert [t for t, _ in seen] == [750, 500, 250, 0]
    assert [s for _, s in seen] == [None, 750, 500, 250]


def test_ddim_with_exact_eps_recovers_x0():
    # A denoiser that knows x0 returns the exact eps; deterministic DDIM then lands on x0.
    acp = alphas_cumprod(make_betas())
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    x_T = torch.randn(2, 1, 4, 4)

    def oracle(x, t, state):
        a = acp[t[0]].float()
        return (x - a.sqrt() * x0) / (1 - a).sqrt(), state

    a_T = acp[980].float()  # the first of 20 uniform steps
    out = ddim_sample(oracle, a_T.sqrt() * x0 + (1 - a_T).sqrt() * x_T, acp, steps=20)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_initial_noise_is_fixed_per_image_and_seed():
    a = initial_noise(5, (1, 4, 4), seed=3)
    b = initial_noise(3, (1, 4, 4), seed=3)
    torch.testing.assert_close(a[:3], b)
    assert not torch.equal(initial_noise(1, (1, 4, 4), seed=4)[0], a[0])


def test_ddim_step_clip_x0_recomputes_eps():
    x, eps = torch.full((1, 1, 2, 2), 3.0), torch.zeros(1, 1, 2, 2)
    a_t, a_prev = torch.tensor(0.25), torch.tensor(0.5)
    out, x0 = ddim_step(x, eps, a_t, a_prev, clip_x0=True)
    assert torch.equal(x0, torch.ones_like(x0))  # unclipped x0 would be 6
    eps_clipped = (3.0 - 0.5 * 1.0) / math.sqrt(0.75)
    torch.testing.assert_close(out, math.sqrt(0.5) * x0 + math.sqrt(0.5) * eps_clipped * torch.ones_like(x0))

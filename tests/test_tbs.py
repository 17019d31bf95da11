"""BiDM cross-timestep connection (`bidm.tbs`): mix formula, alpha buckets, where the cache comes from."""

import copy

import pytest
import torch
import torch.nn as nn

from bidm.diffusion import alphas_cumprod, ddim_sample, ddim_timesteps, make_betas, q_sample
from bidm.distill import DistillObjective, sample_timesteps
from bidm.errors import ConfigError
from bidm.tbs import CrossTimestep, cross_timestep_mix, parse_train_cache, timestep_bucket
from bidm.unet import DDIMUNet, tiny_unet_config


class Toy(nn.Module):
    """Two "blocks": a (input block) then b (the one output block); eps = b(a(x))."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 1, 1, bias=False)
        self.b = nn.Identity()

    def forward(self, x, t):
        return self.b(self.a(x))

    def feature_blocks(self):
        return ["a", "b"]

    def num_output_blocks(self):
        return 1


def tiny_tbs(n_blocks=3, **kw):
    torch.manual_seed(0)
    return CrossTimestep(DDIMUNet(tiny_unet_config(resolution=8)), n_blocks=n_blocks, **kw)


def test_mix_formula_and_gradients():
    h = torch.tensor([[1.0, 2.0]], requires_grad=True)
    cache = torch.tensor([[5.0, -1.0]], requires_grad=True)
    alpha = torch.tensor([[0.25]], requires_grad=True)
    out = cross_timestep_mix(h, cache, alpha)
    torch.testing.assert_close(out, torch.tensor([[0.75 * 1 + 0.25 * 5, 0.75 * 2 - 0.25]]))
    out.sum().backward()
    torch.testing.assert_close(alpha.grad, torch.tensor([[(5 - 1) + (-1 - 2.0)]]))  # sum(cache - h): both terms
    torch.testing.assert_close(h.grad, torch.full((1, 2), 0.75))
    assert cache.grad is None  # stop-gradient into the cache


def test_wrapper_mixes_per_sample_alpha_and_blocks_cache_gradient():
    toy = Toy()
    toy.a.weight.data.fill_(2.0)
    w = CrossTimestep(toy, n_blocks=1)
    assert w.mixed_names == ["b"] and w.alpha.shape == (100, 1)
    with torch.no_grad():
        w.alpha[3, 0], w.alpha[99, 0] = 0.5, 0.1
    x = torch.ones(2, 1, 2, 2)
    t = torch.tensor([35, 999])  # buckets 3 and 99
    cache = {"b": torch.full((2, 1, 2, 2), 10.0, requires_grad=True)}
    eps = w(x, t, cache=cache)
    torch.testing.assert_close(eps[0], torch.full((1, 2, 2), 0.5 * 2 + 0.5 * 10))
    torch.testing.assert_close(eps[1], torch.full((1, 2, 2), 0.9 * 2 + 0.1 * 10))
    eps.sum().backward()
    expected = torch.zeros(100, 1)
    expected[3, 0] = expected[99, 0] = 4 * (10 - 2)
    torch.testing.assert_close(w.alpha.grad, expected)
    assert cache["b"].grad is None
    assert toy.a.weight.grad is not None  # the block's own output keeps its gradient
    assert w(x, t).equal(torch.full((2, 1, 2, 2), 2.0))  # no cache: no mixing


@pytest.mark.parametrize(("steps", "rows"), [(100, 100), (50, 50), (200, 100), (1000, 100)])
def test_bucket_index_at_various_step_counts(steps, rows):
    t = torch.tensor([0, 9, 10, 499, 500, 990, 999])
    assert timestep_bucket(t).tolist() == [0, 0, 1, 49, 50, 99, 99]
    seq = torch.tensor(ddim_timesteps(steps, 1000))
    buckets = timestep_bucket(seq)
    assert buckets.tolist() == (seq // 10).tolist()
    assert len(set(buckets.tolist())) == rows  # 200 steps: two consecutive steps share a row
    assert timestep_bucket(torch.tensor([0, 3, 7]), num_buckets=4, num_timesteps=8).tolist() == [0, 1, 3]


def test_cache_timestep_and_train_cache_option():
    t = torch.tensor([0, 500, 998, 999])
    assert tiny_tbs().cache_timestep(t).tolist() == [1, 501, 999, 999]
    assert tiny_tbs(train_cache="t+10").cache_timestep(t).tolist() == [10, 510, 999, 999]
    assert tiny_tbs(train_cache="sampler", sampler_steps=200).cache_timestep(t).tolist() == [5, 505, 999, 999]
    assert parse_train_cache("t+5") == 5
    assert parse_train_cache("sampler", 1000, 100) == 10
    with pytest.raises(ConfigError, match="t\\+K"):
        parse_train_cache("t-1")
    with pytest.raises(ConfigError, match="sampler_steps"):
        parse_train_cache("sampler")


def test_training_cache_comes_from_t_plus_1_with_same_noise(monkeypatch):
    acp = alphas_cumprod(make_betas(num_timesteps=4))
    student = tiny_tbs(num_buckets=4, num_timesteps=4)
    teacher = DDIMUNet(tiny_unet_config(resolution=8))
    objective = DistillObjective(teacher, acp)
    calls = []
    real_cache_pass = student.cache_pass

    def spy(x, t):
        calls.append((x.clone(), t.clone()))
        return real_cache_pass(x, t)

    monkeypatch.setattr(student, "cache_pass", spy)
    x0 = torch.randn(8, 3, 8, 8)
    objective(student, x0, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)  # replay the objective's draws: t, then eps
    t = sample_timesteps(8, 4, g)
    noise = torch.randn(x0.shape, generator=g)
    assert 3 in t.tolist()  # T - 1 is drawn, so the clip is exercised
    x_cache, t_cache = calls[0]
    assert t_cache.tolist() == (t + 1).clamp(max=3).tolist()
    torch.testing.assert_close(x_cache, q_sample(x0, t_cache, noise, acp))


def test_sampling_state_is_previous_steps_post_mix_features():
    w = tiny_tbs(n_blocks=3).eval()
    seen = []

    def denoiser(x, t, state):
        seen.append((state, t[0].item()))
        eps, new_state = w.denoise(x, t, state)
        seen.append(("out", new_state, {k: v.clone() for k, v in w._features.items()}))
        return eps, new_state

    x_T = torch.randn(2, 3, 8, 8)
    ddim_sample(denoiser, x_T, alphas_cumprod(make_betas()), steps=3)
    states_in = [s for s in seen if s[0] != "out"]
    outs = [s for s in seen if s[0] == "out"]
    assert [t for _, t in states_in] == [666, 333, 0]
    assert states_in[0][0] is None
    for k in (1, 2):
        handed, prev_out, prev_feats = states_in[k][0], outs[k - 1][1], outs[k - 1][2]
        assert sorted(handed) == sorted(w.mixed_names)
        for name in w.mixed_names:
            assert handed[name] is prev_out[name]
            assert torch.equal(handed[name], prev_feats[name])  # the post-mix output of the previous call
            assert not handed[name].requires_grad


def test_sampling_cache_is_post_mix():
    w = tiny_tbs(n_blocks=1).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
    with torch.no_grad():
        _, first = w.denoise(x, t, None)
        _, mixed = w.denoise(x, t, {k: v + 1.0 for k, v in first.items()})
        unmixed = w.cache_pass(x, t)
    name = w.mixed_names[0]  # cache = un-mixed output + 1, so the post-mix output is un-mixed + alpha
    torch.testing.assert_close(mixed[name], unmixed[name] + 0.3)
    torch.testing.assert_close(first[name], unmixed[name])


def test_n_blocks_zero_is_plain_and_out_of_range_raises():
    w = tiny_tbs(n_blocks=0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    assert w.alpha.shape == (100, 0)
    assert w.cache_pass(x, t) == {}
    eps, state = w.denoise(x, t, None)
    torch.testing.assert_close(eps, w.unet(x, t))
    torch.testing.assert_close(w(x, t, cache=state), eps)
    with pytest.raises(ValueError, match="n_blocks"):
        tiny_tbs(n_blocks=99)


def test_state_dict_round_trip_and_unet_prefix():
    w = tiny_tbs(alpha_init=0.0)
    assert torch.all(w.alpha == 0)
    with torch.no_grad():
        w.alpha.uniform_()
    state = w.state_dict()
    assert "alpha" in state
    assert {k for k in state if k != "alpha"} == {f"unet.{k}" for k in w.unet.state_dict()}
    fresh = tiny_tbs()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.alpha, w.alpha)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([120])
    cache = w.cache_pass(x, t)
    torch.testing.assert_close(fresh(x, t, cache=cache), w(x, t, cache=cache))


def test_deepcopy_after_forward_and_replaced_block_raises():
    w = tiny_tbs()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    w(x, t).sum().backward()
    ema = copy.deepcopy(w)  # must not try to copy the live activations
    ema(x, t)
    assert ema.last_features()[0] is not w.last_features()[0]
    name = w.mixed_names[0]
    parent, _, child = name.rpartition(".")
    setattr(w.unet.get_submodule(parent), child, copy.deepcopy(w.unet.get_submodule(name)))
    with pytest.raises(RuntimeError, match="did not run"):
        w(x, t)


def test_cache_input_same_and_forward_noise():
    acp = alphas_cumprod(make_betas()).float()
    x0 = torch.randn(4, 1, 2, 2)
    eps = torch.randn(4, 1, 2, 2)
    t = torch.tensor([0, 100, 995, 999])
    x_t = q_sample(x0, t, eps, acp)
    same = CrossTimestep(Toy(), n_blocks=1, train_cache="t+10")
    x_c, t_c = same.cache_input(x0, x_t, t, eps, acp, torch.Generator().manual_seed(0))
    assert t_c.tolist() == [10, 110, 999, 999]
    assert torch.allclose(x_c, q_sample(x0, t_c, eps, acp))  # official: the same eps
    fwd = CrossTimestep(Toy(), n_blocks=1, train_cache="t+10", cache_noise="forward")
    x_f, t_f = fwd.cache_input(x0, x_t, t, eps, acp, torch.Generator().manual_seed(0))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
    r = (acp[t_f] / acp[t]).view(-1, 1, 1, 1)
    assert torch.allclose(x_f, r.sqrt() * x_t + (1 - r).sqrt() * z)  # x_t' ~ q(x_t' | x_t)
    assert torch.equal(x_f[3], x_t[3])  # t = T-1: t' = t, nothing added
    # the forward joint: x_t' given x0 has the marginal of q_sample(x0, t') (mean sqrt(a') x0, var 1 - a')
    big_x0 = torch.full((20000, 1, 1, 1), 0.5)
    tt = torch.full((20000,), 300)
    xt = q_sample(big_x0, tt, torch.randn(big_x0.shape), acp)
    xf, tf = fwd.cache_input(big_x0, xt, tt, None, acp, torch.Generator().manual_seed(1))
    a = acp[310]
    assert float(xf.mean()) == pytest.approx(float(a.sqrt() * 0.5), abs=0.02)
    assert float(xf.var()) == pytest.approx(float(1 - a), rel=0.03)
    with pytest.raises(ConfigError, match="cache_noise"):
        CrossTimestep(Toy(), n_blocks=1, cache_noise="fresh")


def test_sample_cache_unmixed_carries_pre_mix_outputs():
    w = CrossTimestep(Toy(), n_blocks=1, alpha_init=0.5, sample_cache="unmixed")
    with torch.no_grad():
        w.unet.a.weight.fill_(1.0)
    x = torch.ones(1, 1, 2, 2)
    t = torch.tensor([10])
    eps, state = w.denoise(x, t, {"b": torch.full((1, 1, 2, 2), 3.0)})
    assert eps.equal(torch.full((1, 1, 2, 2), 2.0))  # (1 - 0.5) * 1 + 0.5 * 3
    assert state["b"].equal(torch.ones(1, 1, 2, 2))  # the block's own output, not the mix
    mixed = CrossTimestep(Toy(), n_blocks=1, alpha_init=0.5)
    with torch.no_grad():
        mixed.unet.a.weight.fill_(1.0)
    _, state = mixed.denoise(x, t, {"b": torch.full((1, 1, 2, 2), 3.0)})
    assert state["b"].equal(torch.full((1, 1, 2, 2), 2.0))  # official: post-mix
    with pytest.raises(ConfigError, match="sample_cache"):
        CrossTimestep(Toy(), n_blocks=1, sample_cache="x")

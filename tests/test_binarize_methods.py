"""Each method's forward against its formula computed by hand, and its backward against the stated STE."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.binarize import METHODS, binarize_, set_progress, set_timestep
from bidm.binarize.core import approx_sign_grad, clip_grad, sign, sign_ste
from bidm.binarize.reste import reste_grad


def fp_conv(cin=2, cout=3, k=3, stride=1, padding=1, bias=True):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(3)  # some |W| > 1, so the clamp STE has zeros
        if bias:
            conv.bias.normal_()
    return conv


def hand_codes(x):
    return torch.where(x >= 0, 1.0, -1.0)


def randomize(layer):
    """Move every non-weight parameter off its init so the formulas below are really exercised."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name not in ("weight", "bias"):
                p.add_(0.2 * torch.randn_like(p))
    return layer


# ----------------------------------------------------------------------------------------------------------------
# core


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_pseudo_gradients_at_chosen_points():
    u = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.25, 0.999, 1.0, 2.0])
    torch.testing.assert_close(approx_sign_grad(u), torch.tensor([0.0, 0.0, 1.0, 2.0, 1.5, 0.002, 0.0, 0.0]))
    torch.testing.assert_close(clip_grad(u), torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    x = u.clone().requires_grad_()
    out = sign_ste(x, approx_sign_grad(x))
    (out * torch.arange(8.0)).sum().backward()
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    torch.testing.assert_close(x.grad, torch.arange(8.0) * approx_sign_grad(u))


def test_reste_derivative_values():
    x = torch.tensor([-2.0, -1.5, -0.5, -0.05, 0.0, 0.05, 0.5, 1.0, 1.6])
    g1 = reste_grad(x, 1.0, 1.5)  # o = 1: the clip STE with bound t
    torch.testing.assert_close(g1, torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1, 0]))
    g3 = reste_grad(x, 3.0, 1.5)
    power = lambda v: (1 / 3) * v ** (-2 / 3)  # noqa: E731
    secant = 0.1 ** (1 / 3) / 0.1
    expect = [0.0, power(1.5), power(0.5), secant, secant, secant, power(0.5), power(1.0), 0.0]
    torch.testing.assert_close(g3, torch.tensor(expect))


# ----------------------------------------------------------------------------------------------------------------
# per method: forward = formula, backward = stated STE


def weight_grad_reference(fp_weight, alpha, y_fn, grad_out, ste):
    """dL/dW when the STE is stated on the effective weight alpha*sign(W): dL/d(alpha sign W) * ste(W)."""
    w_eff = (alpha.detach().reshape(-1, *[1] * (fp_weight.dim() - 1)) * hand_codes(fp_weight)).requires_grad_()
    (y_fn(w_eff) * grad_out).sum().backward()
    return w_eff.grad * ste(fp_weight)


def test_xnor_conv_formula_and_weight_ste():
    fp = fp_conv()
    layer = METHODS["xnor"](fp)
    x = torch.randn(2, 2, 5, 5)
    alpha = fp.weight.abs().mean(dim=(1, 2, 3))
    k_map = F.conv2d(x.abs().mean(1, keepdim=True), torch.full((1, 1, 3, 3), 1 / 9), padding=1)
    y = layer(x)
    expect = F.conv2d(hand_codes(x), hand_codes(fp.weight), padding=1) * k_map * alpha.reshape(1, -1, 1, 1)
    torch.testing.assert_close(y, expect)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ref = weight_grad_reference(
        fp.weight.detach(), alpha, lambda w: F.conv2d(hand_codes(x), w, padding=1) * k_map, g, clip_grad
    )
    torch.testing.assert_close(layer.weight.grad, ref)
    assert (layer.weight.grad[fp.weight.abs() > 1] == 0).all()


def test_xnor_linear_uses_mean_abs_input():
    fp = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    y = METHODS["xnor"](fp)(x)
    alpha = fp.weight.abs().mean(1)
    torch.testing.assert_close(y, hand_codes(x) @ hand_codes(fp.weight).T * x.abs().mean(1, keepdim=True) * alpha)


def test_xnorpp_gamma_created_at_first_forward_and_reloaded():
    fp = fp_conv(stride=2)
    layer = randomize(METHODS["xnorpp"](fp))
    assert layer.gamma_h.numel() == 0
    x = torch.randn(2, 2, 6, 6)
    layer(x)
    with torch.no_grad():
        layer.gamma_h.normal_()
        layer.gamma_w.normal_()
    y = layer(x)
    gamma = (
        layer.gamma_out.reshape(1, -1, 1, 1) * layer.gamma_h.reshape(1, 1, 3, 1) * layer.gamma_w.reshape(1, 1, 1, 3)
    )
    expect = F.conv2d(hand_codes(x), hand_codes(fp.weight), stride=2, padding=1) * gamma + fp.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(y, expect)
    fresh = METHODS["xnorpp"](fp)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y)
    (y.sum()).backward()
    torch.testing.assert_close(layer.weight.grad != 0, (layer.weight.grad != 0) & (fp.weight.abs() <= 1))
    assert METHODS["xnorpp"](fp, factors="c")(x).shape == y.shape


def test_dorefa_01_codes_formula_and_ste():
    fp = fp_conv(k=1, padding=0)
    layer = METHODS["dorefa"](fp)
    assert layer.a_code == "01"
    x = torch.tensor([-0.5, 0.2, 0.5, 0.7, 1.5]).reshape(1, 1, 1, 5).repeat(1, 2, 1, 1).requires_grad_()
    a = layer.quantize_input(x)
    assert a[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    a.sum().backward()
    assert x.grad[0, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    x = torch.rand(2, 2, 4, 4) * 1.4 - 0.2
    y = layer(x)
    scale = fp.weight.abs().mean()
    codes = (x >= 0.5).float()
    torch.testing.assert_close(y, F.conv2d(codes, hand_codes(fp.weight)) * scale + fp.bias.reshape(1, -1, 1, 1))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ref = weight_grad_reference(fp.weight.detach(), scale.reshape(1), lambda w: F.conv2d(codes, w), g, torch.ones_like)
    torch.testing.assert_close(layer.weight.grad, ref)


def rprelu_ref(y, m):
    u = y - m.shift_in.reshape(1, -1, 1, 1)
    return torch.where(u >= 0, u, u * m.slope.reshape(1, -1, 1, 1)) + m.shift_out.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("cout,stride", [(3, 1), (2, 1), (2, 2)])
def test_reactnet_and_bbcu_formulas(cout, stride):
    fp = fp_conv(cin=2, cout=cout, stride=stride)
    x = torch.randn(2, 2, 6, 6)
    for method in ("reactnet", "bbcu"):
        layer = randomize(METHODS[method](fp))
        u = x + layer.act_shift.reshape(1, -1, 1, 1)
        alpha = fp.weight.abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
        y = F.conv2d(hand_codes(u), hand_codes(fp.weight), stride=stride, padding=1) * alpha + fp.bias.reshape(
            1, -1, 1, 1
        )
        if cout != 2:
            short = layer.shortcut.proj(x)
        else:
            short = F.avg_pool2d(x, stride) if stride > 1 else x
        expect = rprelu_ref(y + short, layer.rprelu) if method == "reactnet" else rprelu_ref(y, layer.rprelu) + short
        torch.testing.assert_close(layer(x), expect)
        # ApproxSign at u = x + b, to x and to the shift
        xq = x.clone().requires_grad_()
        a = layer.quantize_input(xq)
        g = torch.randn_like(a)
        (a * g).sum().backward()
        torch.testing.assert_close(xq.grad, g * approx_sign_grad(u))
        torch.testing.assert_close(layer.act_shift.grad, (g * approx_sign_grad(u)).sum(dim=(0, 2, 3)))


def test_reste_forward_backward_and_annealing():
    fp = fp_conv(k=1, padding=0)
    model = binarize_(nn.Sequential(fp), "reste", filter_fn=lambda m, n: True)
    layer = model[0]
    assert float(layer.o) == 1.0
    set_progress(model, 0.5)
    assert math.isclose(float(layer.o), math.sqrt(3.0), rel_tol=1e-6)
    set_progress(model, 1.0)
    assert math.isclose(float(layer.o), 3.0, rel_tol=1e-6)
    x = torch.randn(2, 2, 3, 3).requires_grad_()
    y = layer(x)
    scale = fp.weight.abs().mean()
    torch.testing.assert_close(
        y, F.conv2d(hand_codes(x), hand_codes(fp.weight)) * scale + fp.bias.reshape(1, -1, 1, 1)
    )
    a = layer.quantize_input(x)
    g = torch.randn_like(a)
    (a * g).sum().backward()
    torch.testing.assert_close(x.grad, g * reste_grad(x.detach(), 3.0, 1.5))
    w = layer.quantize_weight()
    gw = torch.randn_like(w)
    (w * gw).sum().backward()
    torch.testing.assert_close(layer.weight.grad, gw * reste_grad(fp.weight.detach(), 3.0, 1.5))


def test_efficientdm_formula_timesteps_and_lsq():
    fp = fp_conv()
    layer = METHODS["efficientdm"](fp, rank=2)
    assert not layer.weight.requires_grad and layer.lora_A.shape == (2, 18) and layer.lora_B.shape == (3, 2)
    x = torch.randn(2, 2, 4, 4)
    x[1] *= 5
    set_timestep(layer, torch.tensor([15, 999]))  # buckets 1 and 99
    y = layer(x)
    assert layer.act_step_ready.nonzero().flatten().tolist() == [1, 99]
    torch.testing.assert_close(layer.act_step[[1, 99]].detach(), x.abs().flatten(1).mean(1))
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    w = fp.weight + (layer.lora_B @ layer.lora_A).reshape(fp.weight.shape)
    s_w, s_a = layer.weight_step.reshape(1, -1, 1, 1), layer.act_step[[1, 99]].reshape(-1, 1, 1, 1)
    expect = F.conv2d(hand_codes(x), hand_codes(w), padding=1) * s_w * s_a + fp.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(y, expect.detach())
    # LSQ on the two-level quantizer: dq/ds = sign(v) - v inside |v| <= 1, sign(v) outside, times g
    lin = METHODS["efficientdm"](nn.Linear(4, 1, bias=False), rank=1)
    set_timestep(lin, 0)
    v = torch.tensor([[0.5, -2.0, 0.0, 1.0]])
    lin(v)  # calibrates s_a = mean|v| = 0.875
    with torch.no_grad():
        lin.act_step[0] = 1.0
        lin.weight.fill_(1.0)
        lin.weight_step.fill_(1.0)
    lin.zero_grad()
    lin(v).sum().backward()
    g = 1 / math.sqrt(4)
    expect = g * sum(
        float(hand_codes(torch.tensor(e)) - e) if abs(e) <= 1 else math.copysign(1, e) for e in v[0].tolist()
    )
    assert math.isclose(float(lin.act_step.grad[0]), expect, rel_tol=1e-5)


@pytest.mark.parametrize("cout,stride", [(2, 1), (3, 1), (2, 2)])
def test_bidm_conv_formula_and_stes(cout, stride):
    fp = fp_conv(cin=2, cout=cout, stride=stride)
    layer = randomize(METHODS["bidm"](fp))
    assert layer.bias is None and layer.shortcut.abs_scale
    x = torch.randn(2, 2, 6, 6)
    u = x + layer.act_shift.reshape(1, -1, 1, 1)
    alpha = fp.weight.abs().mean(dim=(1, 2, 3))
    k_map = F.conv2d(x.abs().mean(1, keepdim=True), layer.filter_k.weight, layer.filter_k.bias, stride, 1)
    if cout != 2:
        short = layer.shortcut.proj(x)
    else:
        short = F.avg_pool2d(x, stride) if stride > 1 else x
    y = layer(x)
    body = F.conv2d(hand_codes(u), hand_codes(fp.weight), stride=stride, padding=1)
    expect = body * alpha.reshape(1, -1, 1, 1) * k_map + layer.shortcut.scale.abs() * short
    torch.testing.assert_close(y, expect)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ref = weight_grad_reference(
        fp.weight.detach(),
        alpha,
        lambda w: F.conv2d(hand_codes(u), w, stride=stride, padding=1) * k_map.detach(),
        g,
        clip_grad,
    )
    torch.testing.assert_close(layer.weight.grad, ref)
    torch.testing.assert_close(
        layer.act_shift.grad,
        (
            F.conv_transpose2d(
                g * alpha.reshape(1, -1, 1, 1) * k_map,
                hand_codes(fp.weight),
                stride=stride,
                padding=1,
                output_padding=stride - 1,
            )
            * approx_sign_grad(u)
        )
        .sum(dim=(0, 2, 3))
        .detach(),
    )


def test_bidm_k_initialised_once_and_kept_on_load():
    fp = fp_conv()
    layer = METHODS["bidm"](fp)
    torch.testing.assert_close(layer.filter_k.weight, torch.full((1, 1, 3, 3), 1 / 9))
    with torch.no_grad():
        layer.filter_k.weight.mul_(2)
    fresh = METHODS["bidm"](fp)
    fresh.load_state_dict(layer.state_dict())
    fresh(torch.randn(1, 2, 4, 4))
    torch.testing.assert_close(fresh.filter_k.weight, torch.full((1, 1, 3, 3), 2 / 9))
    frozen = METHODS["bidm"](fp, learnable_k=False, k_bias=False)
    assert frozen.filter_k.bias is None and not frozen.filter_k.weight.requires_grad


def test_bidm_shortcut_variants():
    fp = fp_conv(cin=2, cout=2)
    x = torch.randn(1, 2, 4, 4)
    cifar = METHODS["bidm"](fp, shortcut_scale_init=0.0, shortcut_abs=False)
    no_short = cifar(x)
    with torch.no_grad():
        cifar.shortcut.scale.fill_(-0.5)
    torch.testing.assert_close(cifar(x), no_short - 0.5 * x)
    paper = METHODS["bidm"](fp)
    paper.load_state_dict(cifar.state_dict())
    torch.testing.assert_close(paper(x), no_short + 0.5 * x)  # |s|
    with pytest.warns(UserWarning, match="off forever"):
        METHODS["bidm"](fp, shortcut_scale_init=0.0)


def test_bidm_linear_threshold_fixed_and_official_quirk():
    fp = nn.Linear(4, 3)
    x = torch.tensor([[0.3, -0.2, 0.05, -0.7]])
    alpha = fp.weight.abs().mean(1)
    for in_forward in (True, False):
        layer = METHODS["bidm"](fp, linear_threshold_in_forward=in_forward)
        with torch.no_grad():
            layer.act_shift.copy_(torch.tensor([-0.5, 0.5, 0.0, 0.1]))
        u = x + layer.act_shift
        codes = hand_codes(u) if in_forward else hand_codes(x)
        y = layer(x)
        torch.testing.assert_close(y, codes @ hand_codes(fp.weight).T * alpha)
        y.sum().backward()
        dcodes = (alpha[:, None] * hand_codes(fp.weight)).sum(0)
        torch.testing.assert_close(layer.act_shift.grad, (dcodes * approx_sign_grad(u))[0].detach())

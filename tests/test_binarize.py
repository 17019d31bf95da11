"""Registry and the contract every binarization method satisfies (parametrized over METHODS)."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bidm.binarize as B
from bidm.binarize import METHODS, BinaryLayer, binarize_, load_fp_state_dict, set_timestep
from bidm.errors import BidmError, CheckpointError

ALL = sorted(METHODS)


class Tiny(nn.Module):
    """Covers Cin != Cout, stride 2, 1x1 convs, a linear on [B, C] and one on [B, H, W, C]; FP conv_in/conv_out."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 12, 3, padding=1)
        self.conv_down = nn.Conv2d(12, 12, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(12, 12, 1)
        self.temb = nn.Linear(4, 12)
        self.mix = nn.Linear(12, 12)
        self.conv_out = nn.Conv2d(12, 3, 3, padding=1)

    def forward(self, x, t):
        emb = torch.stack([t.float() / 1000, (t.float() / 100).sin(), (t.float() / 100).cos(), t.float() * 0], 1)
        h = self.conv_a(F.silu(self.conv_in(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.proj(self.conv_down(h))
        h = self.mix(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(F.interpolate(h, scale_factor=2.0))


def inputs(batch=2):
    return torch.randn(batch, 3, 8, 8), torch.tensor([5, 730])[:batch]


def binary_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryLayer)}


def student(method):
    return binarize_(Tiny(), method)


# ----------------------------------------------------------------------------------------------------------------
# Registry


def test_every_method_file_is_registered():
    folder = Path(B.__file__).parent
    files = {p.stem for p in folder.glob("*.py")} - {"__init__", "core"}
    assert files == set(METHODS), f"unregistered: {files - set(METHODS)}; no file: {set(METHODS) - files}"
    assert {"xnor", "xnorpp", "dorefa", "reactnet", "reste", "bbcu", "efficientdm", "bidm"} <= set(METHODS)


def test_unknown_method_lists_choices():
    with pytest.raises(BidmError, match="choose one of") as err:
        binarize_(Tiny(), "nope")
    assert str(sorted(METHODS)) in str(err.value)


@pytest.mark.parametrize("method", ALL)
def test_unknown_option_is_an_error(method):
    with pytest.raises(BidmError, match="unknown option"):
        binarize_(Tiny(), method, not_an_option=1)


def test_default_filter_keeps_paper_fp_layers():
    from bidm.unet import DDIMUNet, tiny_unet_config

    fp_names = {n for n, m in DDIMUNet(tiny_unet_config()).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    expected = {n for n in fp_names if n in ("conv_in", "conv_out", "temb.dense.0", "temb.dense.1")}
    expected |= {n for n in fp_names if n.endswith("nin_shortcut")}
    model = binarize_(DDIMUNet(tiny_unet_config()), "bidm")
    binary = binary_layers(model)
    kept = {
        n
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) and not any(n.startswith(b + ".") for b in binary)
    }
    assert kept == expected and any(n.endswith("nin_shortcut") for n in kept)
    assert set(binary) == fp_names - expected
    assert {"down.0.block.0.temb_proj", "mid.attn_1.q", "down.0.downsample.conv"} <= set(binary)
    x = torch.randn(1, 3, 16, 16)
    assert model(x, torch.tensor([3])).shape == x.shape


def test_filter_fn_and_bare_layer():
    model = binarize_(Tiny(), "xnor", filter_fn=lambda m, name: name == "proj")
    assert list(binary_layers(model)) == ["proj"]
    layer = binarize_(nn.Conv2d(2, 3, 3), "xnor")
    assert isinstance(layer, BinaryLayer) and layer.method == "xnor"


def test_example_inputs_materialise_lazy_parameters():
    x, t = inputs()
    lazy = binarize_(Tiny(), "xnorpp")
    assert B.has_lazy_parameters(lazy)
    model = binarize_(Tiny(), "xnorpp", example_inputs=(x[:1], t[:1]))
    assert not B.has_lazy_parameters(model) and model.conv_a.gamma_h.shape == (8,)
    calibrated = binarize_(Tiny(), "efficientdm", example_inputs=(x, t))
    assert not calibrated.conv_a.act_step_ready.any()  # no lazy shape: the example forward is not run


def test_binarize_twice_leaves_internal_fp_parts_alone():
    model = binarize_(Tiny(), "bidm")
    binarize_(model, "bidm")
    assert isinstance(model.conv_a.shortcut.proj, nn.Conv2d) and not isinstance(
        model.conv_a.shortcut.proj, BinaryLayer
    )


# ----------------------------------------------------------------------------------------------------------------
# Contract, for every method


@pytest.mark.parametrize("method", ALL)
def test_layer_attributes(method):
    model = student(method)
    layers = binary_layers(model)
    assert set(layers) == {"conv_a", "conv_down", "proj", "temb", "mix"}
    for layer in layers.values():
        assert isinstance(layer, (B.BinaryConv2d, B.BinaryLinear))
        assert layer.w_bits == 1 and layer.a_bits == 1 and layer.method == method
        assert layer.a_code in ("pm1", "01")
        assert "weight" in dict(layer.named_parameters(recurse=False))


@pytest.mark.parametrize("method", ALL)
def test_shapes_and_exact_codes(method):
    model = student(method)
    seen = []
    for layer in binary_layers(model).values():

        def spy(a, w, _op=layer.binary_op, _layer=layer):
            seen.append((_layer.a_code, a.detach(), w.detach()))
            return _op(a, w)

        layer.binary_op = spy
    x, t = inputs()
    x[0, :, :2] = 0.0  # exact zeros must become code +1 (or 0 for {0,1} codes)
    assert model(x, t).shape == x.shape
    assert len(seen) == 5
    for code, a, w in seen:
        allowed = torch.tensor([-1.0, 1.0]) if code == "pm1" else torch.tensor([0.0, 1.0])
        assert torch.isin(a, allowed).all() and torch.isin(w, torch.tensor([-1.0, 1.0])).all()


@pytest.mark.parametrize("method", ALL)
def test_gradients_reach_latent_weights(method):
    model = student(method)
    x, t = inputs()
    model(x, t).square().mean().backward()
    for name, layer in binary_layers(model).items():
        for pname, p in layer.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"
    # each layer alone on N(0, 1) inputs (inside the net, DoReFa's {0,1} codes of small features can be all 0)
    for name, fp in Tiny().named_children():
        if name in binary_layers(model):
            layer = METHODS[method](fp)
            shape = (2, fp.in_channels, 6, 6) if isinstance(fp, nn.Conv2d) else (2, 3, fp.in_features)
            set_timestep(layer, t)
            layer(torch.randn(shape)).square().mean().backward()
            latent = (
                [layer.weight] if layer.weight.requires_grad else [getattr(layer, n) for n in layer.merged_into_weight]
            )
            assert any(p.grad.abs().sum() > 0 for p in latent), name


@pytest.mark.parametrize("method", ALL)
def test_postprocess_reads_latent_weight_only_through_weight_scale(method):
    # what `bidm.export` relies on: freeze weight_scale(), drop the latent weight, keep postprocess
    t = torch.tensor([5, 730])
    for fp in Tiny().children():
        layer = METHODS[method](fp)
        set_timestep(layer, t)
        x = torch.randn((2, fp.in_channels, 6, 6) if isinstance(fp, nn.Conv2d) else (2, 3, fp.in_features))
        with torch.no_grad():
            y = layer.binary_op(layer.quantize_input(x), layer.quantize_weight())
            out = layer.postprocess(y, x)
            frozen = layer.weight_scale().detach().clone()
            layer.weight_scale = lambda frozen=frozen: frozen
            layer.weight.mul_(-3.0)
            torch.testing.assert_close(layer.postprocess(y, x), out)


@pytest.mark.parametrize("method", ALL)
def test_state_dict_round_trip(method):
    x, t = inputs()
    model = student(method).eval()
    model(x, t)  # lazy parts (xnorpp Gamma, efficientdm calibration) exist after one forward
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = student(method).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x, t), model(x, t))


@pytest.mark.parametrize("method", ALL)
def test_student_starts_from_teacher_and_loads_fp_checkpoint(method):
    teacher = Tiny()
    copied = binarize_(copy.deepcopy(teacher), method)
    for name, layer in binary_layers(copied).items():
        torch.testing.assert_close(layer.weight, teacher.get_submodule(name).weight)
    fresh = student(method)  # different random latent weights
    report = load_fp_state_dict(fresh, teacher.state_dict())
    for name, layer in binary_layers(fresh).items():
        torch.testing.assert_close(layer.weight, teacher.get_submodule(name).weight)
        if layer.bias is not None:
            torch.testing.assert_close(layer.bias, teacher.get_submodule(name).bias)
    assert set(report.loaded) | set(report.dropped) == set(teacher.state_dict())
    assert all(k.split(".")[0] in binary_layers(fresh) for k in report.initialised + report.dropped)
    fresh(*inputs())


def test_fp_checkpoint_errors_name_the_keys():
    sd = Tiny().state_dict()
    with pytest.raises(CheckpointError, match="unexpected 1 key"):
        load_fp_state_dict(student("bidm"), {**sd, "extra.weight": torch.zeros(1)})
    del sd["conv_in.weight"]
    with pytest.raises(CheckpointError, match="conv_in.weight"):
        load_fp_state_dict(student("bidm"), sd)
    sd = Tiny().state_dict()
    sd["proj.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_fp_state_dict(student("xnor"), sd)


def test_fp_checkpoint_reports_new_and_dropped():
    report = load_fp_state_dict(student("bidm"), Tiny().state_dict())
    assert "conv_a.bias" in report.dropped and "conv_a.filter_k.weight" in report.initialised
    assert "conv_a.shortcut.proj.weight" in report.initialised and "conv_a.act_shift" in report.initialised


@pytest.mark.parametrize("method", ALL)
def test_one_optimizer_step(method):
    model = student(method)
    x, t = inputs()
    model(x, t)  # materialise lazy parameters before building the optimizer
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = (model(x, t) - x).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.isfinite(model(x, t)).all()


@pytest.mark.parametrize("method", ALL)
def test_ddim_unet_end_to_end(method):
    from bidm.unet import DDIMUNet, tiny_unet_config

    model = binarize_(DDIMUNet(tiny_unet_config()), method)
    x = torch.randn(2, 3, 16, 16)
    y = model(x, torch.tensor([0, 999]))
    y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("method", ALL)
def test_builds_on_meta_device(method):
    with torch.device("meta"):
        model = Tiny()
    binarize_(model, method)
    x = torch.empty(2, 3, 8, 8, device="meta")
    assert model(x, torch.zeros(2, dtype=torch.long, device="meta")).shape == x.shape


# ----------------------------------------------------------------------------------------------------------------
# Model-level hooks


def test_timestep_context_follows_deepcopy_and_set_timestep():
    model = student("efficientdm")
    x, t = inputs()
    twin = copy.deepcopy(model)
    ctx = twin.conv_a.timestep_ctx
    assert ctx is twin.mix.timestep_ctx and ctx is not model.conv_a.timestep_ctx
    twin(x, t)
    assert torch.equal(ctx.t, t) and model.conv_a.timestep_ctx.t is None
    layer = binarize_(nn.Linear(4, 4), "efficientdm")
    with pytest.raises(BidmError, match="need the timestep"):
        layer(torch.randn(2, 4))
    assert set_timestep(layer, 10) and layer(torch.randn(2, 4)).shape == (2, 4)
    assert not set_timestep(student("xnor"), 10)


def test_set_progress_counts_annealed_layers():
    assert B.set_progress(student("reste"), 0.5) == 5
    assert B.set_progress(student("xnor"), 0.5) == 0
    with pytest.raises(BidmError):
        B.set_progress(student("reste"), 1.5)

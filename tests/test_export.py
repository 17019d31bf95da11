"""Packed layers equal the fake-binary layers of every method; save -> load -> forward equals the fake-binary model."""

import copy

import pytest
import torch
import torch.nn as nn

from bidm.binarize import METHODS, binarize_, set_timestep
from bidm.config import BinarizeConfig, Config, to_dict
from bidm.errors import CheckpointError
from bidm.export import (
    convert_,
    export_model,
    is_packed,
    kernels,
    load_packed,
    pack,
    pack_,
    read_packed,
    save_packed,
)
from bidm.models import build_model
from bidm.unet import tiny_unet_config

IMPLS = ["ref", pytest.param("c", marks=pytest.mark.skipif(kernels.library() is None, reason="no C compiler"))]

# (FP layer, input shape): padded borders, stride 2, Cin not a multiple of 64, batch > 1, 1x1 conv, linear layers
# (with and without leading dims, square and not), a stride-2 conv without padding on an odd size.
LAYERS = [
    (lambda: nn.Conv2d(70, 13, 3, padding=1), (3, 70, 9, 7)),
    (lambda: nn.Conv2d(64, 64, 3, stride=2, padding=1), (2, 64, 8, 8)),
    (lambda: nn.Conv2d(96, 96, 3, stride=2), (2, 96, 9, 9)),
    (lambda: nn.Conv2d(130, 130, 1), (2, 130, 5, 4)),
    (lambda: nn.Conv2d(40, 72, 1), (2, 40, 4, 4)),
    (lambda: nn.Linear(150, 11), (4, 150)),
    (lambda: nn.Linear(64, 64), (3, 2, 64)),
]


def perturbed(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    """Move every parameter off its init (thresholds, scales, k-convs, RPReLU, LoRA ...) so none is trivial."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return layer


def binary_part(layer, x):
    return layer.binary_op(layer.quantize_input(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_layer_equals_fake_binary_layer(method, impl, monkeypatch):
    monkeypatch.setenv("BIDM_KERNEL", impl)
    gen = torch.Generator().manual_seed(0)
    for make, shape in LAYERS:
        layer = perturbed(binarize_(make(), method), gen).eval()
        if method == "efficientdm":
            METHODS[method].prepare_model(layer)
            set_timestep(layer, torch.arange(shape[0]) * 300)
        x = torch.randn(*shape, generator=gen) + 0.3
        with torch.no_grad():
            expected = layer(x)
            expected_binary = layer.binary_op(layer.quantize_input(x), layer.quantize_weight())
            packed = convert_(copy.deepcopy(layer))
            assert is_packed(packed) and "weight" not in dict(packed.named_parameters())
            got_binary = binary_part(packed, x)
            got = packed(x)
        assert torch.equal(got_binary, expected_binary), (method, shape)  # integer-exact
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(packed.quantize_weight(), layer.quantize_weight())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["xnor", "bidm"])
def test_fused_forward_equals_fake_binary_in_both_layouts(method, impl, monkeypatch):
    """XNOR/BiDM convs take the fused path (channels-last output) from NCHW or channels-last inputs; BIDM_FUSED=0
    gives the generic path (NCHW output); all equal the fake-binary layer."""
    monkeypatch.setenv("BIDM_KERNEL", impl)
    gen = torch.Generator().manual_seed(2)
    for make, shape in LAYERS:
        if len(shape) != 4:
            continue
        layer = perturbed(binarize_(make(), method), gen).eval()
        packed = convert_(copy.deepcopy(layer))
        x = torch.randn(*shape, generator=gen) + 0.3
        with torch.no_grad():
            expected = layer(x)
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                got = packed(inp)
                assert kernels.is_channels_last(got) or got.shape[2:] == (1, 1)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            monkeypatch.setenv("BIDM_FUSED", "0")
            generic = packed(x)
            monkeypatch.delenv("BIDM_FUSED")
        assert generic.is_contiguous()
        torch.testing.assert_close(generic, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler")
@pytest.mark.parametrize("method", ["xnor", "bidm"])
@pytest.mark.parametrize("threshold_in_forward", [True, False])
def test_fused_linear_equals_generic_and_fake_binary(method, threshold_in_forward, monkeypatch):
    """XNOR / BiDM linears run as prepared 1x1 convs: the same output as the generic packed path
    (BIDM_PREPARED=0) and the fake-binary layer, with a nonzero threshold used only when BiDM's forward uses it."""
    gen = torch.Generator().manual_seed(5)
    layer = perturbed(binarize_(nn.Linear(70, 9), method), gen).eval()
    if method == "bidm":
        layer.threshold_in_forward = threshold_in_forward
        with torch.no_grad():
            layer.act_shift.copy_(torch.randn(70, generator=gen))
    elif not threshold_in_forward:
        pytest.skip("xnor has no threshold")
    packed = convert_(copy.deepcopy(layer))
    x = torch.randn(5, 70, generator=gen)
    calls = []
    monkeypatch.setattr(kernels.PreparedConv, "gemm", lambda self, *a, _g=kernels.PreparedConv.gemm: calls.append(1)
                        or _g(self, *a))  # fmt: skip
    with torch.no_grad():
        expected, fused = layer(x), packed(x)
        monkeypatch.setenv("BIDM_PREPARED", "0")
        generic = packed(x)
    assert calls == [1] and fused.shape == (5, 9)
    torch.testing.assert_close(fused, generic, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


def test_fused_constants_follow_state_dict_changes_and_the_model_runs_channels_last():
    gen = torch.Generator().manual_seed(4)
    layer = perturbed(binarize_(nn.Conv2d(16, 16, 3, padding=1), "bidm"), gen).eval()
    packed = convert_(copy.deepcopy(layer))
    x = torch.randn(2, 16, 5, 5, generator=gen)
    with torch.no_grad():
        packed(x)  # fills the cache
        for module in (layer, packed):
            module.act_shift.add_(0.5)
            module.filter_k.bias.add_(0.1)
            module.shortcut.scale.mul_(2.0)
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-4, atol=1e-5)
        assert packed.__dict__["_fused_constants"]["slots"] is not None  # checked without attribute lookups
        for module in (layer, packed):  # a replaced parameter (load_state_dict(assign=True)) is seen too
            module.act_shift = nn.Parameter(module.act_shift.detach() - 1.0)
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-4, atol=1e-5)
    model = pack_(perturbed(build_model(tiny_config("xnor")), gen).eval())
    with torch.no_grad():
        eps = model(torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([10, 20]))
    assert kernels.is_channels_last(eps)  # FP convs read channels last: one layout through the network


def test_packed_state_dict_replaces_latent_weight_by_bits():
    layer = binarize_(nn.Conv2d(70, 8, 3, padding=1), "efficientdm")
    packed = convert_(copy.deepcopy(layer))
    keys = set(packed.state_dict())
    assert "weight_bits" in keys and not {"weight", "lora_A", "lora_B"} & keys  # LoRA folded into the bits
    assert packed.state_dict()["weight_bits"].dtype == torch.int64
    assert packed.state_dict()["weight_bits"].shape == (8, 3, 3, 2)
    assert {"weight_step", "act_step", "bias"} <= keys
    xnor = convert_(binarize_(nn.Linear(10, 4), "xnor"))
    assert xnor.state_dict()["weight_alpha"].shape == (4,)


def test_packed_layer_survives_deepcopy_and_pickle():
    import pickle

    layer = convert_(perturbed(binarize_(nn.Conv2d(8, 8, 3, padding=1), "bidm"), torch.Generator().manual_seed(3)))
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = layer(x)
        layer(x.contiguous(memory_format=torch.channels_last))  # builds the prepared C calls (ctypes state)
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert type(other).__name__ == "PackedBiDMConv2d" and torch.equal(other(x), y)
    linear = convert_(binarize_(nn.Linear(10, 4), "xnor")).eval()
    v = torch.randn(2, 10)
    with torch.no_grad():
        w = linear(v)
        for other in (copy.deepcopy(linear), pickle.loads(pickle.dumps(linear))):
            assert torch.equal(other(v), w)


def test_unpackable_layer_is_refused_by_name():
    layer = binarize_(nn.Conv2d(8, 8, 3, padding=2, dilation=2), "xnor")
    with pytest.raises(NotImplementedError, match="'xnor'.*dilation"):
        convert_(layer)


def test_postprocess_reading_the_latent_weight_is_refused_by_name():
    from bidm.binarize.xnor import XnorConv2d

    class ReadsWeight(XnorConv2d):
        method = "reads-weight"

        def postprocess(self, y, x):
            return y * self.weight.abs().mean()  # not through weight_scale(): cannot be frozen at export

    packed = convert_(ReadsWeight(nn.Conv2d(8, 8, 3, padding=1), bias=False))
    with pytest.raises(NotImplementedError, match="'reads-weight' cannot be packed"):
        packed(torch.randn(1, 8, 5, 5))


def tiny_config(method: str) -> Config:
    cfg = Config(model=tiny_unet_config(resolution=8), binarize=BinarizeConfig(method=method, tbs_blocks=2))
    cfg.model.attn_resolutions = (4,)
    return cfg


def run_two_steps(model, x, ts):
    """Two consecutive denoising steps (the second one mixes the TBS cache for BiDM)."""
    if hasattr(model, "denoise"):
        eps1, state = model.denoise(x, ts[0], None)
        eps2, _ = model.denoise(x * 0.9, ts[1], state)
        return torch.cat([eps1, eps2])
    return torch.cat([model(x, ts[0]), model(x * 0.9, ts[1])])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_round_trip_tiny_unet(method, tmp_path):
    cfg = tiny_config(method)
    gen = torch.Generator().manual_seed(1)
    model = perturbed(build_model(cfg), gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    ts = [torch.tensor([700, 650]), torch.tensor([600, 550])]
    with torch.no_grad():
        run_two_steps(model, x, ts)  # shape-dependent parameters (xnorpp's Gamma) are created at the first forward
        model.eval()
        expected = run_two_steps(model, x, ts)
        report = export_model(copy.deepcopy(model), tmp_path / "packed.safetensors", to_dict(cfg))
        loaded, config = load_packed(tmp_path / "packed.safetensors")
        got = run_two_steps(loaded, x, ts)
    assert to_dict(config) == to_dict(cfg)
    assert sum(is_packed(m) for m in loaded.modules()) > 10
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert report["theoretical_bytes"] < report["file_bytes"] < report["fp32_bytes"]


def test_file_holds_bits_and_metadata_and_rejects_foreign_files(tmp_path):
    cfg = tiny_config("bidm")
    model = pack_(build_model(cfg).eval())
    path = save_packed(model, tmp_path / "m.safetensors", to_dict(cfg))
    tensors, header = read_packed(path)
    name = "unet.down.0.block.0.conv1"
    assert tensors[f"{name}.weight_bits"].dtype == torch.int64 and f"{name}.weight" not in tensors
    geom = header["layers"][name]
    assert geom["kind"] == "conv2d" and geom["method"] == "bidm" and geom["padding"] == [1, 1]
    assert header["layout"]["name"] == "bidm-bits/1" and header["format_version"] == 2
    assert header["layers"]["unet.down.0.block.0.temb_proj"]["kind"] == "linear"
    state = model.state_dict()
    for key in (f"{name}.weight_bits", "unet.down.0.block.0.temb_proj.weight_bits"):
        assert torch.equal(tensors[key], state[key])  # the dense stream comes back as the model's padded words
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert f"{name}.weight_bits" not in stored
    cout, cin = geom["out_channels"], geom["in_channels"]
    stream = stored[f"{name}.weight_bitstream"]
    assert stream.dtype == torch.uint8 and stream.numel() == (cout * 9 * cin + 7) // 8  # no padding at all
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a bidm packed model"):
        read_packed(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="pack_"):
        save_packed(build_model(cfg), tmp_path / "unpacked.safetensors")


def test_bitstream_roundtrip_and_format_1_files_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    from bidm import integrity
    from bidm.export import io

    gen = torch.Generator().manual_seed(3)
    for shape in [(5, 3, 3, 70), (3, 1, 1, 64), (2, 1, 3, 1)]:
        codes = torch.where(torch.randn(*shape, generator=gen) > 0, 1.0, -1.0)
        words = pack.pack_codes(codes)  # [Cout, kh, kw, Wc]
        stream = io.dense_bitstream(words, shape[-1])
        assert stream.numel() == (codes.numel() + 7) // 8
        assert torch.equal(io.words_from_bitstream(stream, shape), words)
    with pytest.raises(ValueError, match="uint8 bytes"):
        io.words_from_bitstream(stream[:-1], shape)
    # a format-1 file (padded int64 words stored as they are) written by an older bidm still loads
    cfg = tiny_config("xnor")
    model = pack_(build_model(cfg).eval())
    tensors = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    layers = {n: io.layer_geometry(n, m) for n, m in model.named_modules() if is_packed(m)}
    header = {"format_version": 1, "layout": {"name": pack.LAYOUT}, "layers": layers, "config": to_dict(cfg)}
    meta = integrity.with_digest(tensors, {"format": io.FORMAT, "layout": pack.LAYOUT, "bidm": json.dumps(header)})
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    loaded, _ = load_packed(tmp_path / "v1.safetensors")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tensors[k]), k


def test_export_command_writes_a_file_that_sample_can_load(tmp_path, capsys):
    from bidm import checkpoint
    from bidm.cli import main
    from bidm.commands.sample import load_any

    cfg = tiny_config("xnor")
    model = perturbed(build_model(cfg), torch.Generator().manual_seed(2))
    state = model.state_dict()
    checkpoint.save(tmp_path / "run" / "checkpoint.safetensors", model=state, ema=state, config=to_dict(cfg), step=1)
    out = tmp_path / "packed.safetensors"
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity" in printed and "theoretical 1-bit" in printed
    loaded, config = load_any(str(out))
    assert config.binarize.method == "xnor" and any(is_packed(m) for m in loaded.modules())
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model.eval()(x, t), rtol=1e-4, atol=1e-5)
    assert main(["sample", str(out), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert "images/s (packed XNOR-popcount kernel" in capsys.readouterr().out

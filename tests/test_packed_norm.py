"""The packed runtime's channels-last GroupNorm (+ SiLU) equals torch's; pack_ swaps it in; every other case falls
back to torch."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.binarize import binarize_
from bidm.export import kernels, pack_
from bidm.export.norm import PackedGroupNorm, convert_norms_, group_norm
from bidm.unet import DDIMUNet, tiny_unet_config

needs_c = pytest.mark.skipif(kernels.library() is None, reason="no C compiler")

# (batch, channels, groups, H, W): batches below and above the thread count (the split-pixel and per-sample paths),
# channel counts with and without a SIMD tail, one channel per group, a 1x1 image.
SHAPES = [(1, 64, 32, 8, 8), (3, 40, 4, 5, 7), (4, 96, 32, 6, 6), (2, 33, 33, 3, 3), (5, 128, 32, 1, 1)]


def norm_with_params(c: int, g: int, affine: bool, gen: torch.Generator) -> nn.GroupNorm:
    norm = nn.GroupNorm(g, c, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(c, generator=gen))
            norm.bias.copy_(0.5 * torch.randn(c, generator=gen))
    return norm


@needs_c
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_torch_group_norm_and_silu(shape, affine):
    gen = torch.Generator().manual_seed(sum(shape))
    b, c, g, h, w = shape
    norm = norm_with_params(c, g, affine, gen)
    # an offset and a wide range: the variance must not come from E[x^2] - mean^2 cancellation in float
    x = (3 * torch.randn(b, c, h, w, generator=gen) + 5).contiguous(memory_format=torch.channels_last)
    if affine:  # one channel's gain sweeps u = norm(x) across exp's float range (u < -88.7: silu is -0 in torch)
        norm.weight.data[0] = 60.0
    with torch.no_grad():
        exact = copy.deepcopy(norm).double()(x.double())  # float64 truth; torch's float32 result for scale
        expected = norm(x)
        got = group_norm(x, norm)
        got_silu = group_norm(x, norm, silu=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch_err = (expected.double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= 2 * torch_err + 1e-6  # as close to the truth as torch is
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got_silu, F.silu(expected), rtol=1e-4, atol=2e-5)
    assert torch.equal(torch.signbit(got_silu), torch.signbit(F.silu(got)))


@pytest.mark.parametrize(
    "case",
    ["nchw", "autograd", "float64", "ref-backend", "switched-off"],
)
def test_other_inputs_take_torch_group_norm(case, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    norm = convert_norms_(nn.Sequential(norm_with_params(64, 32, True, gen)))[0]
    x = torch.randn(2, 64, 4, 4, generator=gen)
    if case != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "float64":
        x, norm = x.double(), norm.double()
    if case == "ref-backend":
        monkeypatch.setenv("BIDM_KERNEL", "ref")
    if case == "switched-off":
        monkeypatch.setenv("BIDM_FUSED_NORM", "0")
    called = []
    monkeypatch.setattr(kernels, "library", lambda: called.append(1) or None)  # the kernel must not run
    if case == "autograd":
        x.requires_grad_(True)
        y = norm(x, silu=True)
        y.sum().backward()
        assert x.grad is not None and norm.weight.grad is not None
    else:
        with torch.no_grad():
            y = norm(x, silu=True)
    ref = nn.GroupNorm(32, 64, eps=norm.eps).to(x.dtype)
    ref.load_state_dict(norm.state_dict())
    torch.testing.assert_close(y, F.silu(ref(x)))
    assert not called


def test_bad_switch_value_is_an_error(monkeypatch):
    monkeypatch.setenv("BIDM_FUSED_NORM", "yes")
    norm = PackedGroupNorm(2, 4)
    with pytest.raises(ValueError, match="BIDM_FUSED_NORM"), torch.no_grad():
        norm(torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last))


@needs_c
@pytest.mark.parametrize("method", ["bidm", "xnor"])
def test_pack_swaps_norms_and_keeps_the_packed_output(method, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    model = DDIMUNet(tiny_unet_config(resolution=8)).eval()
    binarize_(model, method)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    x, t = torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([10, 900])
    state = copy.deepcopy(model.state_dict())
    pack_(model)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, PackedGroupNorm) for m in norms)
    with torch.no_grad():
        fused = model(x, t)
        monkeypatch.setenv("BIDM_FUSED_NORM", "0")
        unfused = model(x, t)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)
    fake = DDIMUNet(tiny_unet_config(resolution=8)).eval()
    binarize_(fake, method)
    fake.load_state_dict(state)
    assert set(model.state_dict()) >= {k for k in state if "norm" in k}  # norms keep their keys
    with torch.no_grad():
        torch.testing.assert_close(fused, fake(x, t), rtol=1e-4, atol=1e-5)


@needs_c
@pytest.mark.parametrize("cflags", ["", "-mno-avx512f", "-mno-avx2 -mno-avx512f"])
def test_silu_sweep_matches_torch_in_every_simd_variant(cflags, monkeypatch, tmp_path):
    """gamma 0 makes u = beta per channel: SiLU at 1000 chosen points (exp's overflow edge included), in the
    AVX-512, AVX2 and scalar builds, each against torch's SiLU."""
    monkeypatch.setattr(kernels, "_state", {"lib": None, "tried": False, "info": {}, "warned": False})
    monkeypatch.setenv("BIDM_CFLAGS", cflags)
    monkeypatch.setenv("BIDM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BIDM_KERNEL", "c")
    edges = torch.tensor([-88.8, -88.73, -88.72, -88.5, -88.3, -87.5, -87.0, -1e-3, 0.0, 1e-3, 87.5, 88.5, 90.0])
    u = torch.cat([torch.linspace(-120, 120, 1000 - len(edges)), edges])
    norm = nn.GroupNorm(1000, 1000)
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.copy_(u)
        x = torch.stack([torch.ones(1000), -torch.ones(1000)], dim=1)[None, :, :, None]  # [1, 1000, 2, 1]
        got = group_norm(x.contiguous(memory_format=torch.channels_last), norm, silu=True).flatten(1)[0, ::2]
    expected = F.silu(u)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-30)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))

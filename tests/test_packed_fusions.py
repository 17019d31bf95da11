"""The packed runtime's block-level fusions: the skip concatenation left as a pair (GroupNorm of two tensors, 1x1
conv as split GEMMs), FP 1x1 convs as GEMMs (the skip one added into conv2's output), the time-embedding add in
conv1's epilogue, the upsample conv on packed words, attention output in the input's layout. Each equals the plain
path (to the bit where the float order is kept, else to float rounding), and each switch turns it off."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.binarize import binarize_
from bidm.export import kernels, pack_
from bidm.export.conv1x1 import GEMM_MAX_ROWS, PackedConv1x1
from bidm.export.fused_block import PackedResnetBlock, PackedUpsample
from bidm.export.norm import group_norm
from bidm.export.skip_concat import ChannelPair
from bidm.unet import AttnBlock, DDIMUNet, ResnetBlock, Upsample, tiny_unet_config

needs_c = pytest.mark.skipif(kernels.library() is None, reason="no C compiler")
CL = torch.channels_last


def cl(*shape, gen, scale=1.0, offset=0.0):
    return (scale * torch.randn(*shape, generator=gen) + offset).contiguous(memory_format=CL)


def perturbed_student(method: str, seed: int, resolution: int = 8) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = DDIMUNet(tiny_unet_config(resolution=resolution)).eval()
    binarize_(model, method)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@needs_c
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
    "c1, c2, groups, batch, hw",
    [(32, 32, 8, 2, (4, 4)), (6, 10, 4, 3, (5, 3)), (64, 96, 32, 1, (16, 16)), (24, 40, 32, 4, (1, 2))],
)
def test_group_norm_of_a_pair_equals_group_norm_of_the_concatenation(c1, c2, groups, batch, hw, silu):
    """Groups that straddle the two parts (6 + 10 channels, 4 per group), a batch below and above the thread count,
    a 1x2 image."""
    gen = torch.Generator().manual_seed(c1 + c2)
    norm = nn.GroupNorm(groups, c1 + c2, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(c1 + c2, generator=gen))
        norm.bias.copy_(0.5 * torch.randn(c1 + c2, generator=gen))
    a, b = cl(batch, c1, *hw, gen=gen, scale=3, offset=2), cl(batch, c2, *hw, gen=gen, scale=0.5, offset=-1)
    with torch.no_grad():
        got = group_norm(ChannelPair(a, b), norm, silu=silu)
        expected = group_norm(torch.cat([a, b], 1).contiguous(memory_format=CL), norm, silu=silu)
    assert got.shape == (batch, c1 + c2, *hw) and kernels.is_channels_last(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_group_norm_of_a_pair_falls_back_to_torch_on_the_concatenation(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    a, b = cl(2, 8, 3, 3, gen=gen), cl(2, 8, 3, 3, gen=gen)
    monkeypatch.setenv("BIDM_FUSED_NORM", "0")
    with torch.no_grad():
        assert torch.equal(group_norm(ChannelPair(a, b), norm), F.group_norm(torch.cat([a, b], 1), 4, norm.weight,
                                                                                norm.bias, norm.eps))  # fmt: skip


def conv1x1(cin: int, cout: int, bias: bool, gen) -> tuple[nn.Conv2d, PackedConv1x1]:
    plain = nn.Conv2d(cin, cout, 1, bias=bias)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(plain.weight.shape, generator=gen) / cin**0.5)
        if bias:
            plain.bias.copy_(torch.randn(cout, generator=gen))
    packed = copy.deepcopy(plain)
    packed.__class__ = PackedConv1x1
    return plain, packed


@pytest.mark.parametrize("bias", [True, False])
def test_packed_conv1x1_equals_the_conv_on_pairs_and_small_inputs(bias):
    gen = torch.Generator().manual_seed(1)
    plain, packed = conv1x1(48, 20, bias, gen)
    a, b = cl(2, 16, 5, 5, gen=gen), cl(2, 32, 5, 5, gen=gen)
    x = torch.cat([a, b], 1).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = plain(x)
        for got in (packed(ChannelPair(a, b)), packed(x)):
            assert kernels.is_channels_last(got)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        big = cl(1, 48, 40, 40, gen=gen)  # 1600 pixels > GEMM_MAX_ROWS: torch's conv, the same call
        assert 1600 > GEMM_MAX_ROWS and torch.equal(packed(big), plain(big))
        nchw = x.contiguous()
        assert torch.equal(packed(nchw), plain(nchw))
    assert packed.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():  # an in-place weight update is seen (the transposed weight is re-made)
        packed.weight.mul_(2)
        plain.weight.mul_(2)
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)


def test_packed_conv1x1_under_autograd_takes_the_conv():
    gen = torch.Generator().manual_seed(2)
    plain, packed = conv1x1(8, 4, True, gen)
    a, b = cl(1, 4, 3, 3, gen=gen), cl(1, 4, 3, 3, gen=gen)
    y = packed(ChannelPair(a, b))
    y.sum().backward()
    assert packed.weight.grad is not None
    assert torch.equal(y, plain(torch.cat([a, b], 1)))


@needs_c
@pytest.mark.parametrize("method", ["bidm", "xnor"])
def test_packed_unet_reads_skip_concatenations_as_pairs(method, monkeypatch):
    model = perturbed_student(method, seed=4)
    pack_(model)
    pair_blocks = [b for level in model.up for b in level.block]  # the blocks the up path hands a concatenation
    assert all("concat" in b.__dict__ and isinstance(b.nin_shortcut, PackedConv1x1) for b in pair_blocks)
    seen = []

    def record(module, args):
        seen.append(isinstance(args[0], ChannelPair))

    handles = [b.register_forward_pre_hook(record) for b in pair_blocks]
    x, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([5, 500, 990])
    with torch.no_grad():
        paired = model(x, t)
        assert seen and all(seen)
        monkeypatch.setenv("BIDM_SKIP_CONCAT", "0")
        seen.clear()
        concatenated = model(x, t)
        assert seen and not any(seen)
    for h in handles:
        h.remove()
    torch.testing.assert_close(paired, concatenated, rtol=1e-4, atol=1e-5)


@needs_c
@pytest.mark.parametrize("method", ["bidm", "xnor"])
def test_fused_blocks_equal_the_plain_blocks(method, monkeypatch):
    """Time embedding in conv1's epilogue, the 1x1 skip GEMM added into conv2's output, the upsample conv on the
    packed words: the plain forward's output up to float rounding (the skip GEMM sums in another order)."""
    model = perturbed_student(method, seed=6)
    pack_(model)
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    assert blocks and all(type(m) is PackedResnetBlock for m in blocks)
    assert [type(level.upsample) for level in model.up[1:]] == [PackedUpsample] * (len(model.up) - 1)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)), torch.tensor([20, 700])
    with torch.no_grad():
        fused = model(x, t)
        monkeypatch.setenv("BIDM_FUSED_BLOCK", "0")
        plain = model(x, t)
        monkeypatch.setenv("BIDM_PREPARED", "0")  # the general C calls: plain blocks
        general = model(x, t)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(general, plain, rtol=1e-4, atol=1e-5)
    blob = copy.deepcopy(model)  # the swapped classes survive a copy
    assert type(blob.down[0].block[0]) is PackedResnetBlock


@needs_c
@pytest.mark.parametrize("method", ["bidm", "xnor"])
def test_time_embedding_add_in_the_epilogue_is_the_same_to_the_bit(method):
    block = perturbed_student(method, seed=10).down[0].block[0]  # no 1x1 skip: every other float is the same
    assert not hasattr(block, "nin_shortcut")
    pack_(block)
    assert type(block) is PackedResnetBlock
    gen = torch.Generator().manual_seed(11)
    x, temb = cl(2, block.conv1.in_channels, 6, 6, gen=gen), torch.randn(2, block.temb_proj.in_features, generator=gen)
    with torch.no_grad():
        fused = block(x, temb)
        plain = ResnetBlock.forward(block, x, temb)
    assert torch.equal(fused, plain)


@needs_c
@pytest.mark.parametrize("method", ["bidm", "xnor"])
def test_upsample_conv_on_packed_words_is_the_same_to_the_bit(method):
    up = perturbed_student(method, seed=12).up[1].upsample
    pack_(up)
    assert type(up) is PackedUpsample
    x = cl(3, up.conv.in_channels, 5, 4, gen=torch.Generator().manual_seed(13))
    with torch.no_grad():
        fused, plain = up(x), Upsample.forward(up, x)
    assert kernels.is_channels_last(fused) and torch.equal(fused, plain)


def test_skip_gemm_accumulates_into_an_output():
    gen = torch.Generator().manual_seed(14)
    plain, packed = conv1x1(24, 8, True, gen)
    a, b = cl(2, 8, 3, 3, gen=gen), cl(2, 16, 3, 3, gen=gen)
    y = cl(2, 8, 3, 3, gen=gen)
    with torch.no_grad():
        expected = y + plain(torch.cat([a, b], 1)) - plain.bias[:, None, None]
        assert packed.can_accumulate(ChannelPair(a, b)) and packed.accumulate_(y, ChannelPair(a, b)) is y
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        nchw = torch.zeros(2, 8, 3, 3)  # torch's conv where the GEMM does not apply: the same sum
        packed.accumulate_(nchw, ChannelPair(a, b))
        torch.testing.assert_close(nchw, plain(torch.cat([a, b], 1)) - plain.bias[:, None, None], rtol=1e-5, atol=1e-5)
        assert not packed.can_accumulate(a.contiguous())  # NCHW


def test_blocks_of_methods_without_a_fused_conv_keep_the_plain_forward():
    model = perturbed_student("reactnet", seed=8)
    pack_(model)
    assert not any(type(m) is PackedResnetBlock for m in model.modules())


def test_attention_keeps_a_channels_last_input_channels_last():
    gen = torch.Generator().manual_seed(9)
    attn = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 4, generator=gen)
    with torch.no_grad():
        nchw, nhwc = attn(x), attn(x.contiguous(memory_format=CL))
    assert nchw.is_contiguous() and kernels.is_channels_last(nhwc)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-6)

"""Bit packing layout and the binary kernels: compiled == reference twin == F.conv2d on codes, bit for bit."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bidm.export import kernels, pack

HAVE_C = kernels.library() is not None
IMPLS = ["ref", pytest.param("c", marks=pytest.mark.skipif(not HAVE_C, reason="no C compiler"))]


def pm1(*shape, gen):
    return torch.where(torch.randn(*shape, generator=gen) >= 0, 1.0, -1.0)


def codes01(*shape, gen):
    return (torch.rand(*shape, generator=gen) > 0.5).float()


def test_bit_layout_is_little_endian_with_bit1_for_minus_one():
    codes = torch.ones(70)
    codes[[0, 5, 63, 64, 69]] = -1.0
    words = pack.pack_codes(codes, "pm1")
    assert words.dtype == torch.int64 and words.shape == (2,)
    assert words[0].item() == 1 + (1 << 5) - (1 << 63)  # bits 0, 5, 63; bit 63 makes the int64 negative
    assert words[1].item() == 1 + (1 << 5)  # codes 64 and 69; padding bits 6..63 are 0
    assert torch.equal(pack.unpack_codes(words, 70, "pm1"), codes)
    zero_one = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert pack.pack_codes(zero_one, "01").item() == 0b1001


def test_conv_weight_order_is_tap_row_tap_col_channel():
    gen = torch.Generator().manual_seed(0)
    w = pm1(5, 70, 3, 2, gen=gen)
    words = pack.pack_conv_weight(w)
    assert words.shape == (5, 3, 2, 2)
    bits = pack.unpack_bits(words.numpy(), 70)  # [Cout, kh, kw, Cin]
    assert np.array_equal(bits, (w < 0).permute(0, 2, 3, 1).numpy())
    assert torch.equal(pack.unpack_conv_weight(words, 70), w)


def test_pack_rejects_values_that_are_not_codes():
    with pytest.raises(ValueError, match="not exact pm1"):
        pack.pack_codes(torch.tensor([1.0, 0.0, -1.0]), "pm1")
    with pytest.raises(ValueError, match="not exact 01"):
        pack.pack_codes(torch.tensor([1.0, -1.0]), "01")


def test_tap_sums():
    gen = torch.Generator().manual_seed(1)
    w = pm1(4, 67, 3, 3, gen=gen)
    sums = pack.tap_sums(pack.pack_conv_weight(w), 67)
    assert torch.equal(sums, w.sum(1).reshape(4, 9).to(torch.int32))


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_activation_matches_layout(impl):
    gen = torch.Generator().manual_seed(2)
    a = pm1(2, 130, 3, 5, gen=gen)
    assert torch.equal(kernels.pack_activation(a, impl=impl), pack.pack_codes(a.permute(0, 2, 3, 1), "pm1"))
    b = codes01(3, 100, gen=gen)
    assert torch.equal(kernels.pack_activation(b, "01", impl=impl), pack.pack_codes(b, "01"))


# (B, Cin, H, W, Cout, k, stride, padding): padded borders, stride 2, Cin not a multiple of 64, batch > 1, 1x1,
# odd sizes, a 1x1 image, more padding than kernel reach, tiles that cross images.
GEOMETRIES = [
    (2, 70, 9, 7, 13, 3, 1, 1),
    (3, 128, 8, 8, 16, 3, 2, 1),
    (1, 200, 5, 5, 9, 1, 1, 0),
    (2, 64, 7, 7, 8, 3, 2, 0),
    (5, 130, 1, 1, 17, 1, 1, 0),
    (2, 3, 4, 4, 3, 5, 1, 2),
    (4, 33, 6, 5, 7, 1, 2, 1),
    (1, 256, 4, 4, 24, 3, 1, 1),
    (3, 65, 3, 3, 5, 3, 1, 2),
]


@pytest.mark.parametrize("code", ["pm1", "01"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("impl", IMPLS)
def test_binary_conv2d_equals_conv_of_codes(impl, geom, code):
    b, cin, h, w, cout, k, s, p = geom
    gen = torch.Generator().manual_seed(hash(geom) % 1000)
    a = pm1(b, cin, h, w, gen=gen) if code == "pm1" else codes01(b, cin, h, w, gen=gen)
    wt = pm1(cout, cin, k, k, gen=gen)
    expected = F.conv2d(a, wt, stride=s, padding=p)  # zero padding of the binarized input
    weight = kernels.KernelWeight(pack.pack_conv_weight(wt), cin)
    y = kernels.binary_conv2d(kernels.pack_activation(a, code, impl=impl), weight, (s, s), (p, p), code, impl=impl)
    assert y.dtype == torch.float32
    assert torch.equal(y, expected)


@pytest.mark.parametrize("code", ["pm1", "01"])
@pytest.mark.parametrize("impl", IMPLS)
def test_binary_linear_equals_linear_of_codes(impl, code):
    gen = torch.Generator().manual_seed(3)
    a = pm1(6, 150, gen=gen) if code == "pm1" else codes01(6, 150, gen=gen)
    wt = pm1(11, 150, gen=gen)
    weight = kernels.KernelWeight(pack.pack_linear_weight(wt), 150)
    y = kernels.binary_linear(kernels.pack_activation(a, code, impl=impl), weight, code, impl=impl)
    assert torch.equal(y, F.linear(a, wt))


def _check_random_geometries(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        b, cin, cout = int(rng.integers(1, 4)), int(rng.integers(1, 200)), int(rng.integers(1, 20))
        k, s = int(rng.choice([1, 2, 3])), int(rng.integers(1, 3))
        p, h, w = int(rng.integers(0, k)), int(rng.integers(k, 12)), int(rng.integers(k, 12))
        code = str(rng.choice(["pm1", "01"]))
        a = pm1(b, cin, h, w, gen=gen) if code == "pm1" else codes01(b, cin, h, w, gen=gen)
        weight = kernels.KernelWeight(pack.pack_conv_weight(pm1(cout, cin, k, k, gen=gen)), cin)
        a_words = kernels.pack_activation(a, code, impl="c")
        y_c = kernels.binary_conv2d(a_words, weight, (s, s), (p, p), code, impl="c")
        y_ref = kernels.reference_conv2d(a_words.numpy(), weight.words.numpy(), cin, (s, s), (p, p), code)
        assert np.array_equal(y_c.numpy().astype(np.int64), y_ref), (b, cin, h, w, cout, k, s, p, code)


@pytest.fixture(params=["pixel-major", "panel-major"])
def sweep(request):
    """Both loop orders of bidm_conv2d: every panel swept pixel-major (threshold 2^40 bytes) or panel-major (0)."""
    if not HAVE_C:
        yield request.param
        return
    lib = kernels.library()
    old = lib.bidm_set_pixel_major_bytes(1 << 40 if request.param == "pixel-major" else 0)
    yield request.param
    lib.bidm_set_pixel_major_bytes(old)


@pytest.mark.skipif(not HAVE_C, reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_kernel_equals_reference_twin_on_random_geometries(threads, sweep):
    """Random shapes (incl. tiles crossing images and partial output panels), both codes, 1 and 2 threads, both
    loop orders."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_random_geometries(4, 12)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not HAVE_C, reason="no C compiler")
@pytest.mark.parametrize(
    "cflags, isa",
    [
        ("-mno-avx512f", "avx2 or scalar"),
        ("-mno-avx2 -mno-avx512f", "scalar"),
        ("-DBIDM_MR=3", "native, odd MR"),
        ("-mno-avx512f -DBIDM_HARLEY_SEAL=1", "avx2 harley-seal"),
    ],
)
def test_every_micro_kernel_variant_equals_the_reference_twin(monkeypatch, tmp_path, cflags, isa):
    """The AVX-512 (vpopcntq), AVX2 (nibble LUT, Harley-Seal) and scalar micro-kernels, and an odd pixel block,
    count alike."""
    monkeypatch.setattr(kernels, "_state", {"lib": None, "tried": False, "info": {}, "warned": False})
    monkeypatch.setenv("BIDM_CFLAGS", cflags)
    monkeypatch.setenv("BIDM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BIDM_KERNEL", "c")
    info = kernels.kernel_info()
    if "avx512" in cflags:
        assert not info["avx512"], info
    if "avx2" in cflags:
        assert not info["avx2"], info
    if "MR=3" in cflags:
        assert info["mr"] == 3, info
    if "HARLEY" in cflags:
        if not info["avx2"]:
            pytest.skip("no AVX2 on this CPU")
        assert info["popcount"] == "avx2-harley-seal", info
    _check_random_geometries(7, 6)


def test_reference_backend_is_selectable_by_env(monkeypatch):
    monkeypatch.setenv("BIDM_KERNEL", "ref")
    assert kernels.backend() == "ref"
    monkeypatch.setenv("BIDM_KERNEL", "nope")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.backend()


def test_missing_compiler_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {"lib": None, "tried": False, "info": {}, "warned": False})
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    monkeypatch.delenv("BIDM_KERNEL", raising=False)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert kernels.backend() == "ref"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.backend() == "ref"  # said once only
    monkeypatch.setenv("BIDM_KERNEL", "c")
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.backend()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_input_pass_equals_sign_then_pack_and_mean_abs(impl, channels_last):
    """Threshold + sign + pack + mean_c|x| in one pass: bit-exact codes, mean to float rounding; both layouts."""
    gen = torch.Generator().manual_seed(5)
    for c, h, w in [(70, 5, 3), (64, 4, 4), (200, 3, 7), (9, 2, 2)]:
        x = torch.randn(3, c, h, w, generator=gen)
        x[0, 0, 0, 0] = -0.0  # sign(-0) = +1
        shift = 0.3 * torch.randn(c, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for sh in (None, shift):
            u = x if sh is None else x + sh.reshape(1, -1, 1, 1)
            words, mean = kernels.pack_input(x, sh, absmean=True, impl=impl)
            assert torch.equal(words, pack.pack_codes(torch.where(u < 0, -1.0, 1.0).permute(0, 2, 3, 1), "pm1"))
            torch.testing.assert_close(mean, x.abs().mean(dim=1, keepdim=True), rtol=1e-6, atol=1e-7)
            words01, none = kernels.pack_input(x, sh, "01", impl=impl)
            assert none is None and torch.equal(words01, pack.pack_codes((u > 0.5).float().permute(0, 2, 3, 1), "01"))
    rows = torch.randn(5, 150, generator=gen)
    words, mean = kernels.pack_input(rows, None, absmean=True, impl=impl)
    assert torch.equal(words, pack.pack_codes(torch.where(rows < 0, -1.0, 1.0), "pm1"))
    torch.testing.assert_close(mean, rows.abs().mean(dim=1, keepdim=True))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_epilogue_equals_torch_after_the_dots(impl, channels_last, sweep):
    """alpha, K map, bias and scaled residual applied while writing == the same torch ops on the exact dots."""
    gen = torch.Generator().manual_seed(6)
    for cin, cout, k, s, p, h in [(70, 13, 3, 1, 1, 8), (64, 20, 3, 2, 0, 9), (130, 9, 1, 1, 0, 6)]:
        a = pm1(2, cin, h, h, gen=gen)
        weight = kernels.KernelWeight(pack.pack_conv_weight(pm1(cout, cin, k, k, gen=gen)), cin)
        words = kernels.pack_activation(a, impl=impl)
        dots = F.conv2d(a, weight_codes := pack.unpack_conv_weight(weight.words, cin), None, s, p)
        assert weight_codes.shape == (cout, cin, k, k)
        res = torch.randn(dots.shape, generator=gen)
        if channels_last:
            res = res.contiguous(memory_format=torch.channels_last)
        epi = kernels.Epilogue(
            alpha=torch.rand(cout, generator=gen),
            kmap=torch.rand(2, 1, *dots.shape[2:], generator=gen),
            bias=torch.randn(cout, generator=gen),
            res=res,
            res_scale=0.3,
        )
        y = kernels.binary_conv2d(words, weight, (s, s), (p, p), epilogue=epi, channels_last=channels_last, impl=impl)
        assert y.shape == dots.shape and kernels.is_channels_last(y) == channels_last
        torch.testing.assert_close(y, epi.apply(dots), rtol=0, atol=0)  # same float ops, same order
        # a per-sample row bias (a ResBlock's time embedding) is added last: the same floats as adding it after
        row_bias = torch.randn(2, cout, generator=gen)
        epi_t = dataclasses.replace(epi, row_bias=row_bias)
        y_t = kernels.binary_conv2d(
            words, weight, (s, s), (p, p), epilogue=epi_t, channels_last=channels_last, impl=impl
        )
        assert torch.equal(y_t, y + row_bias[:, :, None, None])
        if channels_last and s == 1 and dots.shape[-1] % 2 == 0:  # a residual read nearest-upsampled (res_up)
            low = res[:, :, ::2, ::2].contiguous(memory_format=torch.channels_last)
            epi_u = dataclasses.replace(epi, res=low, res_up=2)
            y_u = kernels.binary_conv2d(words, weight, (s, s), (p, p), epilogue=epi_u, channels_last=True, impl=impl)
            up = dataclasses.replace(epi, res=kernels.upsample_nearest(low, 2))
            assert torch.equal(y_u, up.apply(dots))
        # the K map computed by the kernel from mean_c|x| and the 1-channel conv (up to summation order)
        mean, k_weight = torch.rand(2, 1, h, h, generator=gen), torch.rand(1, 1, k, k, generator=gen)
        kmap = F.conv2d(mean, k_weight, torch.tensor([0.2]), s, p)
        epi_k = kernels.Epilogue(epi.alpha, None, epi.bias, res, 0.3, mean, k_weight, 0.2)
        y_k = kernels.binary_conv2d(
            words, weight, (s, s), (p, p), epilogue=epi_k, channels_last=channels_last, impl=impl
        )
        epi.kmap = kmap
        torch.testing.assert_close(y_k, epi.apply(dots), rtol=1e-6, atol=1e-5)
        plain = kernels.binary_conv2d(words, weight, (s, s), (p, p), channels_last=channels_last, impl=impl)
        assert torch.equal(plain, dots)

"""The off-CPU path of packed layers (bidm.export.int8_gemm): int8 GEMM of the codes == the exact conv / linear of
the codes, and a whole packed model routed through it (as on CUDA) matches its fake-binary model. Runs on the CPU:
``torch._int_mm`` has a CPU kernel; where CUDA exists the same parity is checked on the GPU."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bidm.config import BinarizeConfig, Config
from bidm.export import int8_gemm, kernels, pack, packed_layers
from bidm.export import pack_ as pack_model
from bidm.models import build_model
from bidm.unet import tiny_unet_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_int8_conv_and_linear_equal_the_exact_products(device):
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        b, cin, cout = int(rng.integers(1, 4)), int(rng.integers(1, 150)), int(rng.integers(1, 20))
        k, s = int(rng.choice([1, 3])), int(rng.integers(1, 3))
        p, h, w = int(rng.integers(0, k)), int(rng.integers(k, 10)), int(rng.integers(k, 10))
        code = str(rng.choice(["pm1", "01"]))
        a = torch.where(torch.randn(b, cin, h, w, generator=gen) >= 0, 1.0, -1.0 if code == "pm1" else 0.0)
        wc = torch.where(torch.randn(cout, cin, k, k, generator=gen) >= 0, 1.0, -1.0)
        w8 = int8_gemm.weight_matrix(wc, torch.device(device))
        assert w8.dtype == torch.int8 and w8.shape[0] % 8 == 0 and w8.shape[1] % 8 == 0
        y = int8_gemm.conv2d(a.to(device), w8, cout, (k, k), (s, s), (p, p)).cpu()
        assert torch.equal(y, F.conv2d(a, wc, stride=s, padding=p)), (b, cin, cout, k, s, p, h, w, code)
        # the same codes through the popcount kernel's reference twin
        ref = kernels.reference_conv2d(kernels.pack_activation(a, code, impl="ref").numpy(),
                                       pack.pack_conv_weight(wc).numpy(), cin, (s, s), (p, p), code)  # fmt: skip
        assert np.array_equal(y.numpy().astype(np.int64), ref)
    a = torch.where(torch.randn(5, 7, 70, generator=gen) >= 0, 1.0, -1.0)
    wl = torch.where(torch.randn(9, 70, generator=gen) >= 0, 1.0, -1.0)
    w8 = int8_gemm.weight_matrix(wl, torch.device(device))
    assert torch.equal(int8_gemm.linear(a.to(device), w8, 9).cpu(), F.linear(a, wl))


@pytest.mark.parametrize("method", ["xnor", "bidm", "reactnet"])
def test_packed_model_through_the_int8_path_matches_fake_binary(method, monkeypatch):
    """As on a GPU: every packed layer's product by the int8 GEMM, the generic (unfused) forward around it."""
    monkeypatch.setattr(packed_layers, "off_cpu", lambda a: True)
    monkeypatch.setenv("BIDM_FUSED", "0")
    torch.manual_seed(0)
    cfg = Config(model=tiny_unet_config(resolution=8), binarize=BinarizeConfig(method=method, tbs_blocks=2))
    cfg.model.attn_resolutions = (4,)
    model = build_model(cfg).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([5, 500, 900])
    with torch.no_grad():
        expected = model(x, t)
        pack_model(model)
        got = model(x, t)
    assert any("_int8_cache" in m.__dict__ for m in model.modules())  # the int8 path really ran
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

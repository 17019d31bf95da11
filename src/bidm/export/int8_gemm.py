"""The packed layers' path off the CPU: weight bits unpacked once into int8 codes, activation codes as int8, and
the product by ``torch._int_mm`` (int8 x int8 -> int32; on CUDA an int8 tensor-core GEMM).

The CPU runs the XNOR-popcount kernel (`bidm.export.kernels`); a GPU has no popcount GEMM in torch, but its int8
tensor cores multiply +-1 / {0, 1} codes exactly, so this path keeps the packed file's bits as the only weight and
gives the same integer dot products. The weight matrix is built per device on first use and cached on the layer;
activations are im2col'ed (``F.unfold``, zero padding: a padded tap contributes 0, as in the popcount kernel) in the
input's float dtype, then cast to int8. ``_int_mm`` wants M > 16 and K, N multiples of 8 on CUDA: rows and columns
are zero-padded to fit and cut off afterwards (zeros add nothing to a dot product).

It also runs on the CPU (``torch._int_mm`` has a CPU kernel), which is how the tests check it against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bidm.export.kernels import conv_output_size


def _pad_to(n: int, multiple: int) -> int:
    return -n % multiple


def weight_matrix(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int8 codes [K_pad, N_pad] from +-1 weight codes [Cout, Cin, kh, kw] (K = Cin*kh*kw in F.unfold's order) or
    [Cout, Cin] (K = Cin), N = Cout; K and N padded with zeros to multiples of 8."""
    w = codes.flatten(1).to(torch.int8).T  # [K, N]
    w = F.pad(w, (0, _pad_to(w.shape[1], 8), 0, _pad_to(w.shape[0], 8)))
    return w.contiguous().to(device)


def int_matmul(a: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """a: codes [M, K] (any float/int dtype, exact small integers), w from `weight_matrix`: int32 [M, n]."""
    m, k = a.shape
    a8 = F.pad(a.to(torch.int8), (0, w.shape[0] - k, 0, max(17 - m, 0)))
    return torch._int_mm(a8.contiguous(), w)[:m, :n]


def conv2d(a: torch.Tensor, w: torch.Tensor, cout: int, kernel_size, stride, padding) -> torch.Tensor:
    """``F.conv2d(a, codes)`` for activation codes ``a`` [B, Cin, H, W]: float32 [B, Cout, Ho, Wo] (exact integers)."""
    b = a.shape[0]
    ho, wo = conv_output_size(*a.shape[2:], kernel_size, stride, padding)
    cols = F.unfold(a, kernel_size, padding=padding, stride=stride)  # [B, K, L]
    y = int_matmul(cols.transpose(1, 2).reshape(b * ho * wo, -1), w, cout)  # [B*L, Cout]
    return y.reshape(b, ho, wo, cout).permute(0, 3, 1, 2).float()


def linear(a: torch.Tensor, w: torch.Tensor, cout: int) -> torch.Tensor:
    """``F.linear(a, codes)`` for codes ``a`` [..., Cin]: float32 [..., Cout]."""
    lead = a.shape[:-1]
    return int_matmul(a.reshape(-1, a.shape[-1]), w, cout).reshape(*lead, cout).float()

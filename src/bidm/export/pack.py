"""Bit packing of binary codes: pure functions, one documented layout.

Layout ``bidm-bits/1`` (``LAYOUT``; the kernel in ``bidm/csrc/bitgemm.c`` reads exactly this):

- **Codes.** ``pm1`` codes are exact +-1 (sign(0) = +1 was applied before packing); ``01`` codes are exact 0/1
  (DoReFa's 1-bit activations). Weights are always ``pm1``.
- **Bit.** ``pm1``: bit 1 <=> code -1 (Larq/LCE convention, the sign bit). ``01``: bit = code.
- **Word.** 64 codes along the reduction axis per 64-bit word, little-endian bit order: element ``c`` of the axis is
  bit ``c % 64`` of word ``c // 64`` (bit 0 = least significant). Words are stored as ``int64`` (same 64 bits;
  safetensors has no uint64), native little-endian.
- **Padding.** The axis is padded to a multiple of 64 with bit 0 (code +1 for ``pm1``, 0 for ``01``) in weights and
  activations alike. Padded positions never count: for ``pm1`` the XOR of two zero bits is 0 and ``K`` counts real
  channels only; for ``01`` a zero activation bit contributes 0.
- **Conv weight** ``[Cout, Cin, kh, kw]`` -> ``[Cout, kh, kw, Wc]``: the reduction order is tap row, tap column, then
  channel, with ``Wc = ceil(Cin / 64)`` words per tap (channels packed per tap, like LCE's OHWI).
- **Linear weight** ``[Cout, Cin]`` -> ``[Cout, Wc]``.
- **Activations** ``[B, C, H, W]`` -> ``[B, H, W, Wc]`` (channels packed per pixel); ``[B, C]`` -> ``[B, Wc]``.
"""

from __future__ import annotations

import numpy as np
import torch

LAYOUT = "bidm-bits/1"
LAYOUT_VERSION = 1
WORD_BITS = 64
CODES = ("pm1", "01")


def num_words(n: int) -> int:
    """Words needed for ``n`` codes."""
    return (n + WORD_BITS - 1) // WORD_BITS


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool ``[..., n]`` -> int64 ``[..., ceil(n/64)]``; element c -> bit c%64 of word c//64, padding bits 0."""
    bits = np.asarray(bits, dtype=bool)
    n = bits.shape[-1]
    pad = num_words(n) * WORD_BITS - n
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), dtype=bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")  # [..., 8 * words] bytes, element 8j+i -> byte j bit i
    return np.ascontiguousarray(packed).view("<u8").astype(np.int64, copy=False).reshape(*bits.shape[:-1], -1)


def unpack_bits(words: np.ndarray, n: int) -> np.ndarray:
    """int64 ``[..., Wc]`` -> bool ``[..., n]`` (inverse of `pack_bits`)."""
    words = np.ascontiguousarray(np.asarray(words, dtype=np.int64)).astype("<i8", copy=False)
    as_bytes = words.view(np.uint8).reshape(*words.shape[:-1], words.shape[-1] * 8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :n].astype(bool)


def code_bits(codes: torch.Tensor, code: str) -> np.ndarray:
    """Exact codes -> bool bits per the layout; raises ValueError on a value that is not a code."""
    if code not in CODES:
        raise ValueError(f"unknown code {code!r}; expected one of {list(CODES)}")
    values = codes.detach().to("cpu", torch.float32).numpy()
    allowed = (-1.0, 1.0) if code == "pm1" else (0.0, 1.0)
    if not np.isin(values, allowed).all():
        raise ValueError(f"tensor holds values other than {allowed}: not exact {code} codes")
    return values < 0 if code == "pm1" else values > 0.5


def pack_codes(codes: torch.Tensor, code: str = "pm1", dim: int = -1) -> torch.Tensor:
    """Pack exact codes along ``dim`` (moved last) into int64 words ``[..., Wc]``."""
    bits = code_bits(codes.movedim(dim, -1), code)
    return torch.from_numpy(pack_bits(bits))


def unpack_codes(words: torch.Tensor, n: int, code: str = "pm1") -> torch.Tensor:
    """int64 words ``[..., Wc]`` -> float32 codes ``[..., n]``."""
    bits = torch.from_numpy(unpack_bits(words.numpy(), n))
    if code == "pm1":
        return 1.0 - 2.0 * bits.float()
    return bits.float()


def pack_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """+-1 codes ``[Cout, Cin, kh, kw]`` -> int64 ``[Cout, kh, kw, Wc]``."""
    if w.dim() != 4:
        raise ValueError(f"conv weight must be [Cout, Cin, kh, kw], got {tuple(w.shape)}")
    return pack_codes(w.permute(0, 2, 3, 1), "pm1")


def unpack_conv_weight(words: torch.Tensor, cin: int) -> torch.Tensor:
    """int64 ``[Cout, kh, kw, Wc]`` -> float32 +-1 ``[Cout, Cin, kh, kw]``."""
    return unpack_codes(words, cin, "pm1").permute(0, 3, 1, 2).contiguous()


def pack_linear_weight(w: torch.Tensor) -> torch.Tensor:
    """+-1 codes ``[Cout, Cin]`` -> int64 ``[Cout, Wc]``."""
    if w.dim() != 2:
        raise ValueError(f"linear weight must be [Cout, Cin], got {tuple(w.shape)}")
    return pack_codes(w, "pm1")


def popcount(words: np.ndarray) -> np.ndarray:
    """Per-word popcount of int64 words (numpy >= 2 has `bitwise_count`; older numpy uses a byte table)."""
    words = np.asarray(words, dtype=np.int64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words.view(np.uint64)).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, 8)
    return table[as_bytes].sum(-1)


def tap_sums(words: torch.Tensor, cin: int) -> torch.Tensor:
    """Per output channel and tap, the sum of that tap's +-1 weights: ``Cin - 2 popc(w[o, t])``, int32 [Cout, T].

    For ``pm1`` inputs a padded tap is packed as +1, so it adds exactly this; the kernel subtracts it back.
    """
    w = words.numpy().reshape(words.shape[0], -1, words.shape[-1])  # [Cout, T, Wc]
    return torch.from_numpy((cin - 2 * popcount(w).sum(-1)).astype(np.int32))

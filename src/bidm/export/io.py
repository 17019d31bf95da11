"""The packed model file: one safetensors file, nothing pickled.

Tensors: the packed model's state dict, except that each binarized weight is stored as ``<layer>.weight_bitstream``:
its codes as one dense little-endian bit stream (uint8, no per-row or per-word padding, element order [Cout, kh, kw,
Cin]), which `read_packed` turns back into the model's ``<layer>.weight_bits`` words (layout
`bidm.export.pack.LAYOUT`, padded to 64 bits per tap). Format 1 files stored the padded words themselves and still
load. Every other tensor (FP layers, ``weight_alpha``, thresholds, k-convs, shortcut
convs/scales, RPReLU, Gamma, TBS alpha table, ...) is stored as it is in the model (FP32 for a FP32 model).

Metadata (safetensors string fields): ``format`` = `FORMAT`, ``layout`` = `pack.LAYOUT`, and ``bidm`` = JSON with
``format_version``, ``layout`` (the spec in words), ``layers`` (per packed layer: kind, class, method, a_code,
in/out channels, kernel, stride, padding, words per tap) and ``config`` (the resolved bidm config, from which
`load_packed` rebuilds the architecture), plus ``sha256`` (`bidm.integrity`, checked on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bidm import integrity
from bidm.errors import CheckpointError
from bidm.export import pack
from bidm.export.packed_layers import PackedBinaryConv2d, is_packed, pack_
from bidm.fileio import atomic_write

FORMAT = "bidm-packed"
FORMAT_VERSION = 2  # 2: dense weight bit streams; 1: padded int64 words (read, not written)
READABLE_VERSIONS = (1, 2)
LAYOUT_SPEC = (
    "bit 1 = code -1 (pm1) or code 1 (01); 64 codes per int64 word along the reduction axis, little-endian bit "
    "order (element c -> word c//64, bit c%64); padding bits 0; conv weight [Cout, kh, kw, ceil(Cin/64)] (reduction "
    "order tap row, tap column, channel); linear weight [Cout, ceil(Cin/64)]; zero padding of the binarized input "
    "contributes 0"
)


def layer_geometry(name: str, layer: nn.Module) -> dict:
    geom = {
        "class": layer.fake_class.__name__,
        "method": layer.method,
        "a_code": layer.a_code,
        "words": int(layer.weight_bits.shape[-1]),
        "weight_alpha": layer.has_weight_alpha(),
    }
    if isinstance(layer, PackedBinaryConv2d):
        geom.update(
            kind="conv2d", in_channels=layer.in_channels, out_channels=layer.out_channels,
            kernel_size=list(layer.kernel_size), stride=list(layer.stride), padding=list(layer.packed_padding),
        )  # fmt: skip
    else:
        geom.update(kind="linear", in_features=layer.in_features, out_features=layer.out_features)
    return geom


def save_packed(model: nn.Module, path: str | Path, config: dict | None = None) -> Path:
    """Write a packed model (after `pack_`) and its config to one safetensors file, atomically."""
    layers = {name: layer_geometry(name, m) for name, m in model.named_modules() if is_packed(m)}
    if not layers:
        raise ValueError("save_packed: the model has no packed binary layers; run bidm.export.pack_(model) first")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for name, geom in layers.items():
        words = tensors.pop(f"{name}.weight_bits")
        tensors[f"{name}.weight_bitstream"] = dense_bitstream(words, _weight_shape(geom)[3])
    from bidm.checkpoint import first_nonfinite

    bad = first_nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"not exporting to {path}: tensor {bad!r} holds NaN/inf (the model diverged)")
    header = {
        "format_version": FORMAT_VERSION,
        "layout": {"name": pack.LAYOUT, "spec": LAYOUT_SPEC},
        "layers": layers,
        "config": config or {},
    }
    meta = integrity.with_digest(tensors, {"format": FORMAT, "layout": pack.LAYOUT, "bidm": json.dumps(header)})
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of a packed file, validated; no model is built."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed model {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bidm packed model (format {meta.get('format')!r})")
    header = _header(path, meta)
    integrity.verify(path, tensors, meta)
    if header.get("format_version") not in READABLE_VERSIONS or meta.get("layout") != pack.LAYOUT:
        raise CheckpointError(
            f"{path}: packed format {header.get('format_version')} / layout {meta.get('layout')} is not supported "
            f"by this bidm (formats {list(READABLE_VERSIONS)}, layout {pack.LAYOUT})"
        )
    if header["format_version"] >= 2:
        for name, geom in header.get("layers", {}).items():
            stream = tensors.pop(f"{name}.weight_bitstream", None)
            if stream is None:
                raise CheckpointError(f"{path}: packed layer {name!r} has no weight_bitstream tensor")
            try:
                words = words_from_bitstream(stream, _weight_shape(geom))
                tensors[f"{name}.weight_bits"] = words if geom["kind"] == "conv2d" else words[:, 0, 0]
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{path}: packed layer {name!r}: bad geometry or bit stream ({err})") from None
    return tensors, header


def _weight_shape(geom: dict) -> tuple[int, int, int, int]:
    """(Cout, kh, kw, Cin) of a packed layer's codes, from its header geometry."""
    if geom["kind"] == "conv2d":
        kh, kw = geom["kernel_size"]
        return int(geom["out_channels"]), int(kh), int(kw), int(geom["in_channels"])
    return int(geom["out_features"]), 1, 1, int(geom["in_features"])


def dense_bitstream(words: torch.Tensor, cin: int) -> torch.Tensor:
    """Padded words ``[Cout, (kh, kw,) Wc]`` -> uint8 stream of the ``Cout*kh*kw*cin`` bits, densely."""
    bits = pack.unpack_bits(words.numpy(), cin)  # [..., cin]
    return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))


def words_from_bitstream(stream: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of `dense_bitstream` for codes of ``shape`` = (Cout, kh, kw, Cin): words [Cout, kh, kw, Wc]."""
    cout, kh, kw, cin = shape
    n = cout * kh * kw * cin
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() != (n + 7) // 8:
        raise ValueError(
            f"expected {(n + 7) // 8} uint8 bytes for codes {shape}, got {tuple(stream.shape)} {stream.dtype}"
        )
    bits = np.unpackbits(stream.numpy(), bitorder="little")[:n].reshape(cout, kh, kw, cin)
    return torch.from_numpy(pack.pack_bits(bits))


def _header(path: Path, meta: dict[str, str]) -> dict:
    """The ``bidm`` JSON header, checked for the fields `load_packed` reads."""
    try:
        header = json.loads(meta.get("bidm", ""))
    except ValueError as err:
        raise CheckpointError(f"{path}: the packed file's 'bidm' header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the packed file's 'bidm' header must be a JSON object")
    for key, kind in (("layers", dict), ("config", dict)):
        if not isinstance(header.get(key, {}), kind):
            raise CheckpointError(f"{path}: the packed header's {key!r} must be a JSON object")
    return header


def is_packed_file(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file written by `save_packed` (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def load_packed(path: str | Path, model: nn.Module | None = None):
    """Rebuild the packed model from a file written by `save_packed`: (model in eval mode, config).

    The config is a `bidm.config.Config` when the file stores one (as `bidm export` does), else the stored dict.
    ``model``: the fake-binary (or already packed) architecture to load into; by default it is built from the
    stored config with `bidm.models.build_model`. Loading is strict: every tensor must match. Nothing is unpickled.
    """
    from bidm.config import from_dict

    tensors, header = read_packed(path)
    config = header.get("config") or {}
    if model is None:
        if not config:
            raise CheckpointError(f"{path} stores no config; pass the architecture as load_packed(path, model)")
        from bidm.models import build_model

        config = from_dict(config)
        model = build_model(config)
    pack_(model)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the rebuilt packed model: {err}") from err
    return model.eval(), config


# ---------------------------------------------------------------------------------------------------------------
# Sizes


def size_report(model: nn.Module, path: str | Path | None = None) -> dict:
    """Bytes of the packed model: on disk (``path``), as a dense FP32 model, and the theoretical 1-bit size.

    ``fp32_bytes``: every tensor at 4 bytes, binarized weights dense (the same network as an FP32 checkpoint,
    binarizer tensors included). ``theoretical_bytes``: binarized weights at exactly 1 bit each (no word padding),
    every other tensor at 4 bytes. ``packed_tensor_bytes``: what the packed model holds in memory (int64 words with
    padding to 64 bits, the rest at their dtype); the file stores the binarized weights as dense bit streams
    (``theoretical_bytes`` up to a byte per layer) and adds its JSON header.
    """
    binary_bits = fp_numel = stored = 0
    for name, t in model.state_dict().items():
        stored += t.numel() * t.element_size()
        if name.endswith("weight_bits"):
            continue
        fp_numel += t.numel()
    for m in model.modules():
        if is_packed(m):
            binary_bits += m.__dict__["weight"].numel()
    report = {
        "binary_weights": binary_bits,
        "other_values": fp_numel,
        "fp32_bytes": 4 * (binary_bits + fp_numel),
        "theoretical_bytes": binary_bits // 8 + (binary_bits % 8 > 0) + 4 * fp_numel,
        "packed_tensor_bytes": stored,
    }
    if path is not None:
        report["file_bytes"] = Path(path).stat().st_size
        report["compression_vs_fp32"] = report["fp32_bytes"] / report["file_bytes"]
    return report


def export_model(
    model: nn.Module, path: str | Path, config: dict | None = None, *, example: tuple | None = None
) -> dict:
    """`pack_` the fake-binary model in place, `save_packed` it, and return its `size_report`.

    With ``example`` = the forward's inputs, e.g. ``(x, t)``, the report also holds the `bidm.profile.summarize`
    sizes of the fake-binary model (``summary_bytes``: binarized weights at 1 bit, the rest FP32;
    ``summary_fp32_bytes``: the FP reference network) and the parity of the packed model with it on that input
    (``max_abs_diff``, ``max_rel_diff`` relative to the largest output magnitude).
    """
    model.eval()
    report: dict = {}
    if example is not None:
        from bidm.profile import summarize

        one = tuple(v[:1] for v in example)  # sizes do not depend on the batch
        s = summarize(model, tuple(one[0].shape), inputs=one)
        report.update(summary_bytes=round(s.size_mib * 2**20), summary_fp32_bytes=round(s.fp_size_mib * 2**20))
        with torch.no_grad():
            before = model(*example)
    pack_(model)
    save_packed(model, path, config)
    report.update(size_report(model, path))
    if example is not None:
        with torch.no_grad():
            diff = (model(*example) - before).abs().max().item()
        report.update(max_abs_diff=diff, max_rel_diff=diff / max(before.abs().max().item(), 1e-30))
    return report

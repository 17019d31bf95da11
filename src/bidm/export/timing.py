"""Where a packed model's forward spends its time: sign/thresholds, bit-packing, popcount kernel, postprocess, and
everything else (FP layers, norms, attention, ...). Used by ``bench/kernel.py``.

Fused layers (`bidm.export.fused`) count their input pass (threshold + sign + pack + mean|x|) under ``pack``, the
kernel with its epilogue (alpha, K map, bias, shortcut add) under ``popcount gemm``, and the shortcut's pool / FP
1x1 conv under ``shortcut (FP)``; generic layers count ``sign`` (quantize_input) and ``postprocess`` separately.
The GroupNorms of `bidm.export.norm` (with the SiLU they fuse) count under ``groupnorm (+SiLU)``, and those that
also make the next binary conv's input pass (`bidm.export.fused.norm_conv`) under ``groupnorm (+SiLU) + pack``."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn as nn

from bidm.export import fused, kernels, norm
from bidm.export.packed_layers import is_packed


def _timed(fn, bucket: str, acc: dict):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[bucket] += time.perf_counter() - t0

    return wrapper


@contextmanager
def _instrumented(model: nn.Module, acc: dict):
    # binary_linear calls binary_conv2d through the module global: patching the latter counts both, once
    patched_fns = {"pack_activation": "pack", "pack_input": "pack", "binary_conv2d": "popcount gemm"}
    saved = {name: getattr(kernels, name) for name in patched_fns}
    saved_fused = {name: getattr(fused, name) for name in ("shortcut",)}
    saved_norm, saved_norm_packed = norm.group_norm, norm.group_norm_packed
    prepared = {"pack": "pack", "gemm": "popcount gemm"}  # the fused layers' prepared calls (PreparedConv)
    saved_prepared = {name: getattr(kernels.PreparedConv, name) for name in prepared}
    layers = [m for m in model.modules() if is_packed(m)]
    try:
        for name, bucket in patched_fns.items():
            setattr(kernels, name, _timed(saved[name], bucket, acc))
        for name, fn in saved_fused.items():
            setattr(fused, name, _timed(fn, "shortcut (FP)", acc))
        norm.group_norm = _timed(saved_norm, "groupnorm (+SiLU)", acc)
        norm.group_norm_packed = _timed(saved_norm_packed, "groupnorm (+SiLU) + pack", acc)
        for name, bucket in prepared.items():
            setattr(kernels.PreparedConv, name, _timed(saved_prepared[name], bucket, acc))
        for m in layers:
            m.quantize_input = _timed(type(m).quantize_input.__get__(m), "sign", acc)
            m.postprocess = _timed(type(m).postprocess.__get__(m), "postprocess", acc)
        yield
    finally:
        for name in patched_fns:
            setattr(kernels, name, saved[name])
        for name, fn in saved_fused.items():
            setattr(fused, name, fn)
        norm.group_norm, norm.group_norm_packed = saved_norm, saved_norm_packed
        for name, fn in saved_prepared.items():
            setattr(kernels.PreparedConv, name, fn)
        for m in layers:
            del m.quantize_input, m.postprocess


def profile_packed(model: nn.Module, *inputs, reps: int = 1) -> dict[str, float]:
    """Milliseconds per forward in each bucket, plus ``total``."""
    acc: dict[str, float] = defaultdict(float)
    with torch.no_grad():
        model(*inputs)  # warm-up
        with _instrumented(model, acc):
            t0 = time.perf_counter()
            for _ in range(reps):
                model(*inputs)
            total = time.perf_counter() - t0
    out = {k: 1e3 * v / reps for k, v in acc.items()}
    out["rest (FP layers, norms, attention)"] = 1e3 * total / reps - sum(out.values())
    out["total"] = 1e3 * total / reps
    return out

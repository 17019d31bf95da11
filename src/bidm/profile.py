"""Efficiency summary of a (binarized) model, larq-style: per-layer precision, parameters, storage bits and MACs,
and totals: FP32 size and binarized size (MiB), BOPs, FLOPs, OPs = BOPs/64 + FLOPs, and both savings.

    import bidm
    bidm.summary(model, (1, 3, 32, 32))                   # prints the table, returns a `Summary`
    s = bidm.profile.summarize(model, (1, 3, 32, 32))     # no printing; s.to_dict() has the JSON keys

Counting rules (reference §7):
- **MACs** come from forward hooks during one forward of ``input_shape`` (``model(x)``, or ``model(x, t)`` with
  ``t = 0`` when forward takes two arguments), on the model's device -- build big models on the meta device.
  Conv: numel(out) * Cin/groups * kh * kw; linear: numel(out) * in_features. Attention matmuls, norms, activations
  and element-wise ops are not counted (thop convention, the paper's "96.00 G" of LDM-4 bedrooms).
- **Precision** is read from each module's ``w_bits`` / ``a_bits`` (32 when absent), never from its class.
  Binarized layers are those with fewer than 32 bits; modules inside them (BiDM's k-conv, FP 1x1 shortcut convs,
  RPReLU, ...) are their *internal* FP parts.
- **FP reference** (``fp_size_mib``, ``fp_flops``): the same network with every binarized layer back at FP32
  (its ``weight`` and FP bias, even when the method dropped the bias) and without the internal parts.
- ``accounting="measured"`` (default) counts the model as it is: binarized weights at ``w_bits``, every other
  parameter and floating buffer at 32 bits (tensors in a layer's ``merged_into_weight`` excluded, e.g. LoRA factors);
  BOPs = sum of w_bits * a_bits * MACs of binarized layers; FLOPs = MACs of every FP conv/linear that runs,
  internal ones included (ResBlock skip convs, BiDM's FP shortcut convs and k-convs).
- ``accounting="paper"`` follows the paper's Table 4 (reference §7), computed on the FP reference: every conv/linear
  weight at 1 bit except the FP-kept first conv, last conv and time-embedding MLP -- **ResBlock skip convs count as
  1-bit** -- and biases, norms and those layers at 32 bits; binarizer-added tensors are not counted. BOPs = MACs of
  the binarized layers (skip convs excluded); FLOPs = MACs of the FP-kept layers other than skip convs, or
  ``paper_flops`` when given. The skip convs' MACs are thus counted nowhere, as in the paper. The paper's
  "FLOPs 0.38 G" for LDM-4 bedrooms is not reproducible from its code (FP first/last conv + time MLP = 0.05 G), so
  the ``ldm-bedrooms`` preset passes ``paper_flops=0.38e9`` (Table 4's number) to reproduce its 52.7x.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn

from bidm.errors import BidmError

MIB = 8 * 2**20  # bits per MiB
_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerRow:
    name: str
    type: str
    w_bits: int
    a_bits: int
    params: int  # tensor elements stored directly by this module (as counted for the size)
    bits: int  # their storage bits under the chosen accounting
    macs: int
    role: str  # "binary" | "fp" (FP conv/linear) | "internal" (FP part of a binary layer) | "other"


@dataclass
class Summary:
    layers: list[LayerRow]
    accounting: str
    params: int
    fp_params: int
    fp_size_mib: float
    size_mib: float
    size_saving: float
    fp_flops: int
    bops: int
    flops: float
    ops: float
    ops_saving: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self, layers: bool = False) -> dict:
        d = asdict(self)
        if not layers:
            d.pop("layers")
        return d

    def table(self, layers: bool = True) -> str:
        lines = []
        if layers:
            head = f"{'Layer':<44} {'Type':<16} {'W/A bits':>8} {'Params':>11} {'Size KiB':>10} {'MACs (M)':>10}"
            lines += [head, "-" * len(head)]
            for r in self.layers:
                bits = f"{r.w_bits}/{r.a_bits}" if r.role in ("binary", "fp", "internal") else "-"
                lines.append(
                    f"{r.name[-44:]:<44} {r.type[:16]:<16} {bits:>8} {r.params:>11,} {r.bits / 8192:>10.1f} "
                    f"{r.macs / 1e6:>10.2f}"
                )
            lines.append("-" * len(head))
        lines += [
            f"accounting: {self.accounting}",
            f"params: {self.params:,} (FP reference {self.fp_params:,})",
            f"size: {self.size_mib:.2f} MiB  (FP32 {self.fp_size_mib:.2f} MiB)  saving {self.size_saving:.2f}x",
            f"BOPs: {self.bops / 1e9:.2f} G   FLOPs: {self.flops / 1e9:.3f} G   "
            f"OPs = BOPs/64 + FLOPs = {self.ops / 1e9:.3f} G",
            f"FP FLOPs: {self.fp_flops / 1e9:.2f} G   OPs saving {self.ops_saving:.2f}x",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Counting


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if hasattr(module, "kernel_size"):  # convs and binarized convs
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return out.numel() * module.in_features


def _bits(m: nn.Module) -> tuple[int, int]:
    return int(getattr(m, "w_bits", 32)), int(getattr(m, "a_bits", 32))


def _is_binary(m: nn.Module) -> bool:
    return min(_bits(m)) < 32


def _direct_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    skip = set(getattr(m, "merged_into_weight", ()))
    tensors = {n: p for n, p in m.named_parameters(recurse=False) if p is not None}
    tensors |= {
        n: b
        for n, b in m.named_buffers(recurse=False)
        if b is not None and b.is_floating_point() and n not in m._non_persistent_buffers_set
    }
    return {n: t for n, t in tensors.items() if n not in skip}


def _example_inputs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    x = torch.zeros(input_shape, device=device)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        q for q in inspect.signature(model.forward).parameters.values() if q.kind in kinds and q.default is q.empty
    ]
    if len(required) >= 2:
        return x, torch.zeros(input_shape[0], dtype=torch.long, device=device)
    return (x,)


def count_macs(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """MACs per module name (convs, linears, binarized layers) over one forward of ``inputs``."""
    from bidm.binarize import set_timestep

    macs: dict[str, int] = {}

    def hook(name):
        def record(module, args, out):
            macs[name] = macs.get(name, 0) + _macs(module, out)

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, _COMPUTE) or _is_binary(m)
    ]
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout, no data-dependent init (EfficientDM calibrates in training mode only)
    try:
        if inputs:
            set_timestep(model, torch.zeros(inputs[0].shape[0], dtype=torch.long, device=inputs[0].device))
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return macs


def summarize(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    accounting: str = "measured",
    paper_flops: float | None = None,
    inputs: tuple | None = None,
) -> Summary:
    """Count ``model`` on one forward of ``input_shape`` (see the module docstring for the rules)."""
    from bidm.binarize import SKIP_CONVS, matches

    if accounting not in ("measured", "paper"):
        raise BidmError(f"accounting must be 'measured' or 'paper', got {accounting!r}")
    if any(hasattr(m, "weight_bits") for m in model.modules()):
        raise BidmError(
            "summarize counts a fake-binary model (after binarize_); for a packed model's real sizes use "
            "bidm.export.size_report"
        )
    macs = count_macs(model, inputs if inputs is not None else _example_inputs(model, tuple(input_shape)))
    binary = [n for n, m in model.named_modules() if _is_binary(m)]
    notes = []
    if accounting == "paper" and not binary:
        accounting, paper_flops = "measured", None
        notes.append("no binarized layer: the paper accounting does not apply, counted as measured")
    rows, fp_bits, fp_params, bops, flops, fp_flops = [], 0, 0, 0, 0.0, 0
    for name, m in model.named_modules():
        tensors = _direct_tensors(m)
        is_compute = isinstance(m, _COMPUTE) or _is_binary(m)
        if not tensors and not is_compute:
            continue
        w_bits, a_bits = _bits(m)
        n_macs = macs.get(name, 0)
        numel = sum(t.numel() for t in tensors.values())
        if _is_binary(m):
            role = "binary"
        elif any(name.startswith(b + ".") for b in binary):
            role = "internal"
        else:
            role = "fp" if is_compute else "other"
        weight = m.weight.numel() if role == "binary" else 0
        fp_bias = m.weight.shape[0] if role == "binary" and getattr(m, "has_fp_bias", False) else 0
        if role == "binary":
            fp_n = weight + fp_bias
            bops += w_bits * a_bits * n_macs
            fp_flops += n_macs
            if accounting == "paper":
                bits = weight * w_bits + 32 * fp_bias
            else:
                bits = weight * w_bits + 32 * (numel - weight)
        elif role == "internal":
            fp_n, bits = 0, (0 if accounting == "paper" else 32 * numel)
            flops += 0 if accounting == "paper" else n_macs
        else:
            fp_n = numel
            fp_flops += n_macs
            if accounting == "paper" and role == "fp" and matches(name, SKIP_CONVS):
                w = m.weight.numel()
                bits = w + 32 * (numel - w)  # 1-bit weight in the paper's size; its MACs are counted nowhere
            else:
                bits = 32 * numel
                flops += n_macs
        fp_params += fp_n
        fp_bits += 32 * fp_n
        rows.append(LayerRow(name or "(model)", type(m).__name__, w_bits, a_bits, numel, bits, n_macs, role))
    if accounting == "paper" and paper_flops is not None:
        notes.append(
            f"FLOPs set to the paper's {paper_flops / 1e9:.2f} G (measured FP-kept layers: {flops / 1e9:.3f} G)"
        )
        flops = float(paper_flops)
    size_bits = sum(r.bits for r in rows)
    ops = bops / 64 + flops
    return Summary(
        layers=rows,
        accounting=accounting,
        params=sum(r.params for r in rows),
        fp_params=fp_params,
        fp_size_mib=fp_bits / MIB,
        size_mib=size_bits / MIB,
        size_saving=fp_bits / size_bits if size_bits else 1.0,
        fp_flops=fp_flops,
        bops=bops,
        flops=float(flops),
        ops=float(ops),
        ops_saving=fp_flops / ops if ops else 1.0,
        notes=notes,
    )


def summary(model: nn.Module, input_shape: tuple[int, ...], *, layers: bool = True, **kwargs) -> Summary:
    """Print the per-layer table and totals of `summarize`; returns the `Summary`."""
    s = summarize(model, input_shape, **kwargs)
    print(s.table(layers=layers))
    return s


# ---------------------------------------------------------------------------------------------------------------
# Model presets (built on the meta device: shapes only, no memory, no weights)


def ldm_unet(setting: str) -> nn.Module:
    """The FP UNet of an LDM setting (`bidm.ldm.settings`): the official openaimodel architecture (`bidm.ldm.unet`).
    LDM-4 bedrooms: 274,056,163 params and 96.02 G MACs at its 64x64x3 latent, as in reference §7."""
    from bidm.ldm.settings import SETTINGS
    from bidm.unet import UNetConfig, build_unet

    return build_unet(UNetConfig(**SETTINGS[setting]["model"]))


def _ddim_cifar10() -> nn.Module:
    from bidm.unet import DDIMUNet, UNetConfig

    return DDIMUNet(UNetConfig())


def _tiny() -> nn.Module:
    from bidm.unet import DDIMUNet, tiny_unet_config

    return DDIMUNet(tiny_unet_config())


@dataclass(frozen=True)
class Preset:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    paper_flops: float | None = None  # the paper's FP FLOPs of the binarized model, when it reports one


PRESETS = {
    "tiny": Preset(_tiny, (1, 3, 16, 16)),
    "ddim-cifar10": Preset(_ddim_cifar10, (1, 3, 32, 32)),
    "ldm-bedrooms": Preset(partial(ldm_unet, "ldm-bedrooms"), (1, 3, 64, 64), paper_flops=0.38e9),
    "ldm-churches": Preset(partial(ldm_unet, "ldm-churches"), (1, 4, 32, 32)),  # the paper reports no LDM-8 FLOPs
    "ldm-ffhq": Preset(partial(ldm_unet, "ldm-ffhq"), (1, 3, 64, 64), paper_flops=0.38e9),  # same UNet as bedrooms
}


def build_preset(name: str, method: str | None = "bidm", **options) -> tuple[nn.Module, Preset]:
    """The preset's model on the meta device, binarized with ``method`` under `default_filter` (None/"none": FP)."""
    if name not in PRESETS:
        raise BidmError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    with torch.device("meta"):
        model = preset.build()
    if method not in (None, "none"):
        from bidm.binarize import binarize_

        binarize_(model, method, **options)
    return model, preset

"""Binarization engine: swap a model's nn.Conv2d / nn.Linear for W1A1 layers of one method, in place.

    model = binarize_(model, "bidm")                     # default_filter keeps the paper's FP layers
    model = binarize_(model, "xnor", filter_fn=lambda m, name: "attn" not in name)
    report = load_fp_state_dict(model, fp_state_dict)    # FP checkpoint into a binarized model

``METHODS`` maps a name (= the file ``bidm/binarize/<name>.py``) to a `core.Method` (layer factory + option
defaults). Adding a method: write ``<name>.py`` with a ``@register("<name>")`` factory, then add its import below.

Model-level hooks: `set_timestep` (EfficientDM's per-timestep step sizes read the timestep of the forward in
progress; ``binarize_`` installs a pre-hook so ``model(x, t)`` sets it) and `set_progress` (ReSTE anneals its
estimator with the fraction of training done; the trainer calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

# One import per method file; tests/test_binarize.py checks every file of this folder is registered.
from bidm.binarize import bbcu, bidm, dorefa, efficientdm, reactnet, reste, xnor, xnorpp  # noqa: F401
from bidm.binarize.core import METHODS, BinaryConv2d, BinaryLayer, BinaryLinear, Method, register
from bidm.errors import BidmError, CheckpointError

__all__ = [
    "METHODS",
    "BinaryConv2d",
    "BinaryLayer",
    "BinaryLinear",
    "FP_KEPT",
    "SKIP_CONVS",
    "LoadReport",
    "Method",
    "binarize_",
    "default_filter",
    "get_method",
    "has_lazy_parameters",
    "load_fp_state_dict",
    "matches",
    "register",
    "set_progress",
    "set_timestep",
]

# Paper protocol (reference §2d, CONTRACTS.md): these stay full precision. Names are dotted path segments matched
# anywhere in a module name: DDIM (temb.dense, conv_in/out, nin_shortcut), diffusers (time_embedding, conv_in/out,
# conv_shortcut), LDM (time_embed, input_blocks.0.0 = first conv, out.2 = last conv, skip_connection).
SKIP_CONVS = ("nin_shortcut", "conv_shortcut", "skip_connection")
FP_KEPT = (
    "conv_in",
    "conv_out",
    "temb.dense",
    "time_embedding",
    "time_embed",
    "input_blocks.0.0",
    "out.2",
) + SKIP_CONVS


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when one of the dotted ``patterns`` occurs as whole segments of the module ``name``."""
    padded = f".{name}."
    return any(f".{p}." in padded for p in patterns)


def default_filter(module: nn.Module, name: str) -> bool:
    """Binarize every nn.Conv2d / nn.Linear except the FP-kept layers of the paper protocol (`FP_KEPT`)."""
    return not matches(name, FP_KEPT)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise BidmError(f"unknown binarization method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def binarize_(
    model: nn.Module,
    method: str,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    example_inputs: tuple | None = None,
    **options,
) -> nn.Module:
    """Replace, in place, each nn.Conv2d / nn.Linear for which ``filter_fn(module, name)`` is True by the method's
    binarized layer, built from the FP layer (latent weights are copies of the FP weights).

    Args:
        model: any nn.Module; a bare Conv2d/Linear is not swapped in place, its binarized version is returned.
        method: a key of `METHODS`.
        filter_fn: ``(module, name) -> bool``, True = binarize; default `default_filter`.
        example_inputs: arguments of one forward, e.g. ``(x, t)`` (any values, any batch size). Methods with
            shape-dependent parameters (``xnorpp``'s spatial scales Gamma_h, Gamma_w) create them at the first forward;
            with ``example_inputs`` that forward runs here (no grad), so the optimizer and an EMA copy built next see
            the final shapes. Ignored when the model has no such parameter.
        **options: keyword options of the method's factory (see ``METHODS[method].options``).

    Returns the model. Layers inside already-binarized layers (e.g. BiDM's FP shortcut conv) are never touched.
    """
    entry = get_method(method)
    entry.check_options(options)
    filter_fn = filter_fn or default_filter
    if _is_candidate(model):
        model = entry(model, **options) if filter_fn(model, "") else model
    else:
        binary = [name for name, m in model.named_modules() if isinstance(m, BinaryLayer)]
        for name, module in list(model.named_modules()):
            if not name or not _is_candidate(module) or not filter_fn(module, name):
                continue
            if any(name.startswith(prefix + ".") for prefix in binary):
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, entry(module, **options))
    if entry.prepare_model is not None:
        entry.prepare_model(model)
    if example_inputs is not None and has_lazy_parameters(model):
        with torch.no_grad():
            model(*example_inputs)
    return model


def has_lazy_parameters(model: nn.Module) -> bool:
    """True while a binarized layer still has a parameter waiting for its first forward (shape [0])."""
    return any(
        p.numel() == 0 for m in model.modules() if isinstance(m, BinaryLayer) for p in m.parameters(recurse=False)
    )


def set_timestep(model: nn.Module, t: torch.Tensor | int) -> bool:
    """Set the timestep seen by timestep-dependent layers (EfficientDM). Returns False when the model has none.

    Not needed when the model is called as ``model(x, t)``: ``binarize_`` installed a pre-hook doing this.
    """
    contexts = {id(c): c for m in model.modules() if (c := getattr(m, "timestep_ctx", None)) is not None}
    for ctx in contexts.values():
        ctx.t = torch.as_tensor(t)
    return bool(contexts)


def set_progress(model: nn.Module, frac: float) -> int:
    """Tell annealed estimators (ReSTE) the fraction of training done, in [0, 1]; returns the layers updated."""
    if not 0.0 <= frac <= 1.0:
        raise BidmError(f"training progress must be in [0, 1], got {frac}")
    layers = [m for m in model.modules() if hasattr(m, "set_progress")]
    for m in layers:
        m.set_progress(frac)
    return len(layers)


@dataclass
class LoadReport:
    """What `load_fp_state_dict` did: FP keys loaded, FP keys the binarized layers drop by design (their FP bias),
    and binarizer tensors not in the checkpoint, left at their initial value."""

    loaded: list[str]
    dropped: list[str]
    initialised: list[str]


def load_fp_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, new_keys: Iterable[str] = ()
) -> LoadReport:
    """Load a full-precision checkpoint into a binarized model.

    Every FP key must load: a checkpoint key the model lacks (other than a dropped FP bias of a binarized layer), a
    model key of FP origin missing from the checkpoint, or a shape mismatch raises `CheckpointError` naming the keys.
    Keys of FP origin are all keys outside binarized layers plus ``weight``/``bias`` of each binarized layer; the
    other keys of a binarized layer (thresholds, k-convs, scales, ...) are the method's new tensors and may be
    absent. ``new_keys``: extra key prefixes that are new too (e.g. a TBS wrapper's coefficients).
    """
    own = model.state_dict()
    binary = {name: m for name, m in model.named_modules() if isinstance(m, BinaryLayer)}
    new_prefixes = tuple(new_keys)
    dropped, new = set(), set()
    for name, layer in binary.items():
        p = f"{name}." if name else ""
        dropped |= {p + k for k in layer.dropped_fp_keys()}
        new |= {k for k in own if k.startswith(p) and k not in (p + "weight", p + "bias")}
    new |= {k for k in own if new_prefixes and k.startswith(new_prefixes)}
    unexpected = sorted(k for k in state_dict if k not in own and k not in dropped)
    missing = sorted(k for k in own if k not in state_dict and k not in new)
    shapes = sorted(k for k in own if k in state_dict and own[k].shape != state_dict[k].shape and own[k].numel())
    if unexpected or missing or shapes:
        parts = [
            f"{what} {len(keys)} key(s) {keys[:6]}"
            for what, keys in (("unexpected", unexpected), ("missing", missing), ("shape mismatch for", shapes))
            if keys
        ]
        raise CheckpointError("FP checkpoint does not fit the binarized model: " + "; ".join(parts))
    loadable = {k: v for k, v in state_dict.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(
        loaded=sorted(loadable),
        dropped=sorted(k for k in state_dict if k in dropped),
        initialised=sorted(k for k in new if k not in state_dict),
    )

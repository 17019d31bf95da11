"""Checkpoints as one safetensors file, written atomically (temp file + fsync + rename).

Stored tensors: ``model.<name>`` (raw weights), ``ema.<name>`` (EMA weights), ``optim.<i>.<key>`` (optimizer state
per parameter index). Metadata (strings): ``format``, ``step``, ``config`` (the resolved config as JSON) and
``optim_groups`` (the optimizer's param groups as JSON) and ``sha256`` (`bidm.integrity`: checked on load). Nothing
is unpickled on load, and malformed metadata or foreign tensor names are a `CheckpointError`, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bidm import integrity
from bidm.errors import CheckpointError
from bidm.fileio import atomic_write

FORMAT = "bidm-checkpoint-v1"
CKPT_NAME = "checkpoint.safetensors"
GROUPS = ("model", "ema", "optim")  # the tensor name prefixes of a checkpoint


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, or None."""
    for name, value in tensors.items():
        if value.dtype.is_floating_point or value.dtype.is_complex:
            if not bool(torch.isfinite(value).all()):
                return name
    return None


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors, json.dumps(state_dict["param_groups"])


def _unflatten_optimizer(path: Path, tensors: dict[str, torch.Tensor], groups: list) -> dict:
    """The optimizer state dict from ``<index>.<key>`` tensors and the param groups; malformed is an error."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or not key:
            raise CheckpointError(f"{path}: malformed optimizer tensor name 'optim.{name}' (expected optim.<i>.<key>)")
        state.setdefault(int(index), {})[key] = value
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{path}: malformed optimizer param groups in the metadata")
    return {"state": state, "param_groups": groups}


def _meta_json(path: Path, meta: dict[str, str], key: str, kind: type):
    """A JSON metadata field of type ``kind``; missing or malformed is a `CheckpointError`."""
    if key not in meta:
        raise CheckpointError(f"{path}: the checkpoint metadata has no {key!r} field")
    try:
        value = json.loads(meta[key])
    except ValueError as err:
        raise CheckpointError(f"{path}: the {key!r} metadata is not valid JSON ({err})") from None
    if not isinstance(value, kind):
        raise CheckpointError(
            f"{path}: the {key!r} metadata must be a JSON {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _meta_step(path: Path, meta: dict[str, str]) -> int:
    """The ``step`` field: a non-negative integer."""
    raw = meta.get("step")
    if raw is None:
        raise CheckpointError(f"{path}: the checkpoint metadata has no 'step' field")
    try:
        step = int(raw)
    except ValueError:
        raise CheckpointError(f"{path}: the 'step' metadata must be a non-negative integer, got {raw!r}") from None
    if step < 0:
        raise CheckpointError(f"{path}: the 'step' metadata must be a non-negative integer, got {raw!r}")
    return step


def save(
    path: str | Path,
    *,
    model: dict[str, torch.Tensor],
    config: dict,
    step: int,
    ema: dict[str, torch.Tensor] | None = None,
    optimizer: dict | None = None,
    extra_meta: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint atomically; the previous file stays intact until the new one is complete.

    Refuses (`CheckpointError`, nothing written) when a weight or EMA tensor is NaN or inf: a diverged model must
    never replace the last good checkpoint. The metadata gets the content hash of `bidm.integrity`.
    """
    path = Path(path)
    for group, state in (("model", model), ("ema", ema or {})):
        bad = first_nonfinite(state)
        if bad is not None:
            raise CheckpointError(
                f"not saving step {step} to {path}: {group} tensor {bad!r} holds NaN/inf (the weights diverged); "
                "the previous checkpoint is kept"
            )
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    meta = {"format": FORMAT, "step": str(step), "config": json.dumps(config)}
    if optimizer is not None:
        opt_tensors, meta["optim_groups"] = _flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
    meta.update(extra_meta or {})
    # safetensors refuses tensors sharing memory; clone any alias.
    seen: dict[int, str] = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[key] = value.clone()
        seen[ptr] = key
    meta = integrity.with_digest(tensors, meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


class Checkpoint:
    """A loaded checkpoint: ``model``, ``ema``, ``optimizer`` (state dict or None), ``config`` (dict), ``step``."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        self.path = path
        self.step = _meta_step(path, meta)
        self.config = _meta_json(path, meta, "config", dict)
        self.meta = meta
        groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
        for name, value in tensors.items():
            prefix, _, rest = name.partition(".")
            if prefix not in groups or not rest:
                raise CheckpointError(
                    f"{path}: unexpected tensor {name!r} (a bidm checkpoint holds only {', '.join(GROUPS)}.* "
                    "tensors); the file is not one bidm wrote"
                )
            groups[prefix][rest] = value
        self.model = groups["model"]
        self.ema = groups["ema"] or None
        self.optimizer = None
        if "optim_groups" in meta:
            self.optimizer = _unflatten_optimizer(path, groups["optim"], _meta_json(path, meta, "optim_groups", list))

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        return self.ema if use_ema and self.ema else self.model


def resolve(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    return path


def load(path: str | Path) -> Checkpoint:
    path = resolve(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a run directory holding {CKPT_NAME}, or the file)")
    try:
        from safetensors import safe_open

        tensors = load_file(path)

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {err}"
        ) from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bidm checkpoint (format={meta.get('format')!r}, want {FORMAT})")
    ck = Checkpoint(path, tensors, meta)  # malformed metadata is reported before the hash is checked
    integrity.verify(path, tensors, meta)
    return ck

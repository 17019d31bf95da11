"""Checkpoints as one safetensors file, written atomically (temp file + fsync + rename).

Stored tensors: ``model.<name>`` (raw weights), ``ema.<name>`` (EMA weights), ``optim.<i>.<key>`` (optimizer state
per parameter index). Metadata (strings): ``format``, ``step``, ``config`` (the resolved config as JSON) and
``optim_groups`` (the optimizer's param groups as JSON). Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bidm.errors import CheckpointError

FORMAT = "bidm-checkpoint-v1"
CKPT_NAME = "checkpoint.safetensors"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp):
        Path(tmp).write_text(text)

    _atomic(Path(path), write)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], str]:
    tensors = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors, json.dumps(state_dict["param_groups"])


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups_json: str) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": json.loads(groups_json)}


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
    """Write a checkpoint atomically; the previous file stays intact until the new one is complete."""
    path = Path(path)
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
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


class Checkpoint:
    """A loaded checkpoint: ``model``, ``ema``, ``optimizer`` (state dict or None), ``config`` (dict), ``step``."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        self.path = path
        self.step = int(meta["step"])
        self.config = json.loads(meta["config"])
        self.meta = meta
        groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
        for name, value in tensors.items():
            prefix, rest = name.split(".", 1)
            groups[prefix][rest] = value
        self.model = groups["model"]
        self.ema = groups["ema"] or None
        self.optimizer = (
            _unflatten_optimizer({f"optim.{k}": v for k, v in groups["optim"].items()}, meta["optim_groups"])
            if "optim_groups" in meta
            else None
        )

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
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {err}"
        ) from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bidm checkpoint (format={meta.get('format')!r}, want {FORMAT})")
    return Checkpoint(path, tensors, meta)

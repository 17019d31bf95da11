"""What `--resume` may change: the new config against the one stored in the checkpoint.

A resumed run continues the stored one exactly, so everything that defines it is frozen: the data, the model, the
diffusion schedule, the method and its options, the teacher, the seed, the batch size, the optimizer kind and the
loss. Changing one of them is a `ConfigError` that lists every such key (start a new run instead). The rest is
applied, and said so: the budget (``train.steps``), the optimizer's ``lr`` / ``weight_decay`` (written into its
param groups, which otherwise keep the checkpoint's values), ``grad_clip``, ``ema_decay``, the logging and
checkpoint intervals, and the ``sample`` section (only read by later sampling; except ``sample.steps`` when the
TBS training cache is derived from it).
"""

from __future__ import annotations

from pathlib import Path

from bidm.errors import ConfigError

APPLIED = {
    "train.steps": "the run continues to the new step count",
    "train.lr": "written into the optimizer's param groups",
    "train.weight_decay": "written into the optimizer's param groups",
    "train.grad_clip": "used from the next step",
    "train.ema_decay": "used from the next EMA update",
    "train.log_every": "used from the next step",
    "train.ckpt_every": "used from the next step",
    "train.device": "the run continues on the new device",
    "data.workers": "used by the data loader (the batch order does not depend on it)",
}
RECORDED = "sample."  # sampling defaults: recorded in the run's config, not used by training
IGNORED = {"out_dir"}  # a run directory may be moved or named differently
PATHS = {"data.path", "binarize.teacher", "first_stage.ckpt", "first_stage.latent_cache"}  # compared as resolved paths


def flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; the opaque mappings (options, diffusers_config) stay whole."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("options", "method_options", "diffusers_config"):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _same(key: str, old, new) -> bool:
    if key in PATHS and old is not None and new is not None:
        return Path(str(old)).resolve() == Path(str(new)).resolve()
    return old == new


def changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, stored value, new value) for every flattened key whose value differs (`IGNORED` left out)."""
    a, b = flatten(old), flatten(new)
    keys = sorted((set(a) | set(b)) - IGNORED)
    return [(k, a.get(k), b.get(k)) for k in keys if not _same(k, a.get(k), b.get(k))]


def _sample_steps_trains(new: dict) -> bool:
    """True when ``sample.steps`` sets the TBS training cache (``binarize.train_cache=sampler``)."""
    b = new.get("binarize", {})
    return b.get("method") == "bidm" and b.get("tbs") and b.get("train_cache") == "sampler"


def check_resume(old: dict, new: dict, source: str = "the checkpoint") -> list[str]:
    """Raise `ConfigError` for frozen changes; return one line per change that is applied or recorded.

    ``old`` and ``new`` are resolved configs as dicts (``bidm.config.to_dict``), both with every default filled.
    """
    frozen, notes = [], []
    for key, before, after in changes(old, new):
        if key in APPLIED:
            notes.append(f"{key}: {before!r} -> {after!r} ({APPLIED[key]})")
        elif key.startswith(RECORDED) and not (key == "sample.steps" and _sample_steps_trains(new)):
            notes.append(f"{key}: {before!r} -> {after!r} (recorded for sampling; training does not read it)")
        else:
            frozen.append(f"{key} ({before!r} -> {after!r})")
    if frozen:
        raise ConfigError(
            f"--resume cannot change {', '.join(frozen)}: {source} was trained with the stored values (data, "
            "model, diffusion, method, teacher, seed, batch size, optimizer and loss are fixed for a run); drop "
            f"these overrides, or start a new run in another directory. Changeable: {', '.join(sorted(APPLIED))}, "
            "sample.*"
        )
    return notes

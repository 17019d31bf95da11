"""Typed configuration: nested dataclasses with defaults, YAML files holding overrides only, ``a.b=value`` overrides
from the command line. An unknown key or a value of the wrong type is an error. The resolved config is saved next to
every checkpoint (``config.yaml``) and inside it, and models are rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bidm.errors import ConfigError
from bidm.fields import check, choice, num
from bidm.ldm.first_stage import FirstStageConfig
from bidm.unet import UNetConfig


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | npz | folder
    path: str | None = None  # cifar10 / npz: a .npz or a directory with {split}.npz; folder: an image dir
    split: str = "train"
    size: int = num(16, gt=0)  # images are resized to size x size
    channels: int = num(1, gt=0)  # digits only: 1 or 3
    limit: int | None = num(None, gt=0)  # keep the first N images (after a seeded shuffle)
    stream: bool = False  # folder: read images lazily through a DataLoader (LSUN/FFHQ scale) instead of into RAM
    workers: int = num(2, ge=0)  # DataLoader worker processes of a streamed dataset (0 = in the main process)


@dataclass
class DiffusionConfig:
    schedule: str = choice("linear", ("linear", "sqrt_linear"))  # linear (DDPM/DDIM) | sqrt_linear (LDM)
    num_timesteps: int = num(1000, gt=0)
    beta_start: float = num(1e-4, gt=0, lt=1)
    beta_end: float = num(0.02, gt=0, lt=1)


@dataclass
class TrainConfig:
    steps: int = num(2000, gt=0)
    batch_size: int = num(64, gt=0)
    lr: float = num(2e-4, gt=0)
    optimizer: str = choice("adam", ("adam", "adamw"))  # adam (DDIM CIFAR recipe) | adamw (LDM, weight decay 0.01)
    weight_decay: float = num(0.0, ge=0)
    grad_clip: float = num(1.0, ge=0)  # 0 = off
    warmup_steps: int = num(0, ge=0)  # linear lr warm-up from 1e-6 x lr (LDM LambdaLinearScheduler; churches: 10k)
    ema_decay: float = num(0.999, ge=0, lt=1)
    seed: int = num(0, ge=0)
    loss_reduction: str = choice("mean", ("mean", "sum"))  # mean (LDM) | sum (DDIM repo / BiDM CIFAR code)
    loss_kind: str = choice("l2", ("l2", "l1"))  # l2 | l1 (LSUN-Churches)
    log_every: int = num(25, gt=0)
    ckpt_every: int = num(500, gt=0)
    mixed_precision: str = choice("no", ("no", "fp16", "bf16"))  # passed to accelerate
    device: str = "auto"  # auto (Accelerate's: the process's GPU, else CPU) | cpu | cuda (an error where absent)


@dataclass
class BinarizeConfig:
    method: str = "none"  # "none" trains/holds an FP model; else a key of bidm.METHODS
    options: dict = field(default_factory=dict)  # keyword options of the method's layer factory
    # per-method options, used only when that method is the one run (a recipe can serve every method):
    # {"bidm": {"shortcut_scale_init": 0.0}}; ``options`` wins over them
    method_options: dict = field(default_factory=dict)
    # ResBlock 1x1 skip convs: fp (official code, default) | binary (W1A1, as the paper's Table 4 size counts them)
    skip_convs: str = choice("fp", ("fp", "binary"))
    teacher: str | None = None  # FP teacher: a bidm run dir / checkpoint, an official .ckpt, or a diffusers dir
    # TBS cross-timestep connection (BiDM only by default; see bidm.tbs)
    tbs: bool = True
    tbs_blocks: int = num(8, ge=0)  # the last n output blocks are mixed (paper: 8; 0 = off)
    tbs_alpha_init: float = 0.3  # paper 0.3; official CIFAR code 0.0
    # alpha table columns: 0 = one per mixed block; N = N columns indexed by the block's position among all
    # feature blocks (official LDM: cache_coefficients [100, 31] for every setting)
    tbs_table_columns: int = num(0, ge=0)
    train_cache: str = "t+1"  # t+1 (official) | t+K | sampler (cache from t + T/steps, matches sampling)
    train_cache_noise: str = choice(
        "same", ("same", "forward")
    )  # same (official; eta=0 joint) | forward (x_t' ~ q(x_t'|x_t); eta=1 joint)
    tbs_sample_cache: str = choice(
        "mixed", ("mixed", "unmixed")
    )  # mixed (official: post-mix outputs carried) | unmixed (pre-mix, as in training)
    # distillation
    feature_loss: str = "auto"  # spd | l2 | none | auto (= spd for bidm, none for the baselines; bidm.qat)
    spd_lambda: float = num(1e-2, ge=0)  # code & paper App. A (LDM); paper CIFAR 3e-2; paper text "4"
    spd_p: int = num(4, gt=0)
    output_kd: float | None = num(
        None, ge=0
    )  # MSE to the teacher's eps; None = the method's recipe (bidm.qat.RECIPES)
    antithetic: bool = False  # CIFAR code draws half t and half T-1-t


@dataclass
class SampleConfig:
    n: int = num(64, gt=0)
    batch_size: int = num(64, gt=0)
    steps: int = num(100, gt=0)
    eta: float = num(0.0, ge=0)
    skip: str = choice("uniform", ("uniform", "quad"))
    seed: int = num(0, ge=0)
    use_ema: bool = True
    clip_x0: bool = False  # clamp each DDIM x0 prediction to [-1, 1] (not in DDIM/LDM; helps small CPU-scale models)


@dataclass
class Config:
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)  # latent diffusion (bidm.ldm)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    binarize: BinarizeConfig = field(default_factory=BinarizeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = hint is type(None) or type(None) in args
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:  # "none" is a string for str fields (method=none) and null for optional ones (path=none)
            return None
        raise ConfigError(f"{where}: null is not allowed")
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = check(f"{where}{name}", _coerce(value, hint, f"{where}{name}"), fields[name].metadata)
    return cls(**kwargs)


def updated(section, where: str, **values):
    """A copy of the config ``section`` (e.g. ``cfg.sample``) with the non-None ``values`` coerced and checked as
    if they came from the config, so a command's flags obey the same ranges as its YAML keys."""
    given = {k: v for k, v in values.items() if v is not None}
    built = _build(type(section), given, f"{where}.")
    return dataclasses.replace(section, **{k: getattr(built, k) for k in given})


OPAQUE = ("options", "diffusers_config")  # a mapping given for these replaces the old one as a whole


def _deep_merge(base: dict, extra: dict, opaque: tuple[str, ...] = OPAQUE) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in opaque:
            out[key] = _deep_merge(out[key], value, opaque)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (so 3, 1e-4, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            pass
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The overrides of a YAML config file. A top-level ``base: OTHER.yaml`` (relative to the file) is read first
    and this file's values are merged over it (e.g. ``configs/ldm/bedrooms.yaml`` on the paper's LDM recipe)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of overrides, got {type(loaded).__name__}")
    parent = loaded.pop("base", None)
    if parent is None:
        return loaded
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {parent!r}")
    return _deep_merge(read_yaml(path.parent / parent, (*_seen, path.resolve())), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None):
    """Defaults <- ``base`` (e.g. a checkpoint's config) <- YAML file <- ``overrides``."""
    values: dict = dict(base or {})
    if path:
        values = _deep_merge(values, read_yaml(path))
    for text in overrides:
        # ``binarize.options={a: 1}`` replaces the options; ``binarize.options.a=1`` sets one of them
        into_opaque = any(part.strip() in OPAQUE for part in text.split("=", 1)[0].split(".")[:-1])
        values = _deep_merge(values, parse_override(text), () if into_opaque else OPAQUE)
    return _build(Config, values, "")


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(values: dict) -> Config:
    return _build(Config, values, "")


def save_yaml(cfg, path: str | Path) -> None:
    from bidm.fileio import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))

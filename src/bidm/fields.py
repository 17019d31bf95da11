"""Config fields that carry their allowed values, checked when a config is built (`bidm.config`).

``steps: int = num(2000, gt=0)`` declares a field whose value must be > 0; ``ema_decay: float = num(0.999, ge=0,
lt=1)`` one in [0, 1); ``skip: str = choice("uniform", ("uniform", "quad"))`` one of a list. `check` is called on
every coerced value by `bidm.config._build` (so YAML files, ``--set`` overrides, checkpoint configs and the
`bidm sample` flags all go through it) and names the field and the allowed range in its error. Floats must also
be finite. A tuple field's bound applies to each element.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bidm.errors import ConfigError


@dataclass(frozen=True)
class Range:
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __contains__(self, value: float) -> bool:
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )

    def __str__(self) -> str:
        low = f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else None
        high = f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}" if self.le is not None else None
        if low and high:
            left = "(" if self.gt is not None else "["
            right = ")" if self.lt is not None else "]"
            lo = self.gt if self.gt is not None else self.ge
            hi = self.lt if self.lt is not None else self.le
            return f"in {left}{lo:g}, {hi:g}{right}"
        return low or high or "any number"


def num(default: Any, *, gt=None, ge=None, lt=None, le=None):
    """A dataclass field with a numeric range (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"range": Range(gt, ge, lt, le)})


def choice(default: str, options: tuple[str, ...]):
    """A dataclass field whose value must be one of ``options``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(options)})


def check(where: str, value: Any, metadata) -> Any:
    """Raise `ConfigError` when ``value`` breaks the field's range or choices; return it unchanged otherwise."""
    if value is None:
        return value
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where} must be a finite number, got {item}")
        bounds = metadata.get("range")
        if bounds is not None and isinstance(item, (int, float)) and item not in bounds:
            shown = f"{where} elements" if isinstance(value, tuple) else where
            raise ConfigError(f"{shown} must be {bounds}, got {item!r}")
    options = metadata.get("choices")
    if options is not None and value not in options:
        raise ConfigError(f"{where} must be one of {list(options)}, got {value!r}")
    return value

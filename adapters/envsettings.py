"""Dataclass settings from ``LORALOOM_<FIELD>`` variables: the one place a variable becomes a value.

Only entry points (the CLI, the trainer's command) call these; everything below is
handed the resulting settings objects.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
PREFIX = "LORALOOM_"


def env_name(field_name: str) -> str:
    """The variable of a settings field: ``cache_mb`` -> ``LORALOOM_CACHE_MB``."""
    return f"{PREFIX}{field_name.upper()}"


def parse_value(item: dataclasses.Field, raw: str) -> Any:
    """``raw`` as the field's type (int, float, bool, Path or str; ``X | None`` as X)."""
    kind = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", str(item.type))
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    if kind.startswith("bool"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("Path"):
        return Path(raw).expanduser()
    return raw


def values_from_env(cls: type, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that ``environ`` (default: the process's) sets, parsed."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        raw = environ.get(env_name(item.name))
        if raw is not None and raw != "":
            try:
                values[item.name] = parse_value(item, raw)
            except ValueError:
                raise ValueError(f"{env_name(item.name)}={raw!r} is not a valid {item.type}") from None
    return values


def from_env(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Defaults, then ``LORALOOM_*`` variables, then ``overrides`` (those not None)."""
    values = values_from_env(cls, environ)
    values.update({key: value for key, value in overrides.items() if value is not None})
    return cls(**values)

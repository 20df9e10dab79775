"""Strict YAML → dataclass config loading.

Every component owns one small frozen dataclass. `build(cls, data)` turns plain YAML data
into it, rejecting unknown keys and wrongly typed values with the full key path, so a typo in
a fleet file is an error and never a silent default (as in Ray Serve's validated configs).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

from tokenpool.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str, path: str = "size") -> int:
    """`1073741824`, `"1GiB"`, `"512 MiB"` or `"2GB"` to bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"{path}: expected a byte size such as 512MiB or 2GiB, got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def build(cls: type, data: typing.Any, path: str = ""):
    """Build dataclass `cls` from a mapping; fields named *_bytes accept sizes like '1GiB'."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key "
                          f"(expected one of: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = _join(path, name)
        if name.endswith("_bytes") and value is not None:
            value = parse_size(value, key)
        kwargs[name] = _coerce(hints[name], value, key)
    missing = [n for n, f in fields.items() if n not in kwargs and _required(f)]
    if missing:
        raise ConfigError(f"{_join(path, missing[0])}: required key is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return data or {}


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(repr, typing.get_args(tp)))
            raise ConfigError(f"{path}: expected one of {choices}, got {value!r}")
        return value
    return _scalar(tp, value, path)


def _scalar(tp, value, path: str):
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)

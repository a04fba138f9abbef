"""The schema machinery under :mod:`plumage_ds.config`: the error types, the one copy of each value
check, typed loading of ``kw_only`` dataclasses from mappings (:func:`from_dict`, strict: unknown
keys are errors, renamed keys name their new name) and back (:func:`to_dict`), and reading a YAML or
JSON file. Nothing here knows an optimizer or a job: :mod:`plumage_ds.config` holds the schema itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config value: ``Invalid {key}={value!r}: {reason}``; :meth:`within` prefixes the key's section."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"Invalid {key}={value!r}: {reason}")

    def within(self, section: str) -> "ConfigError":
        return ConfigError(f"{section}.{self.key}" if section else self.key, self.value, self.reason)


class ConfigKeyError(ValueError):
    """An unknown or renamed key; :meth:`within` prefixes the key's section."""

    def __init__(self, key: str, detail: str, *, renamed: bool = False) -> None:
        self.key, self.detail, self.renamed = key, detail, renamed
        what = "Invalid config key" if renamed else "Unknown config key"
        super().__init__(f"{what} {key!r}{detail}")

    def within(self, section: str) -> "ConfigKeyError":
        return ConfigKeyError(f"{section}.{self.key}" if section else self.key, self.detail, renamed=self.renamed)


# --------------------------------------------------------------------------- value checks
# The one copy of each check: every optimizer, adapter and engine validates through these.


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(name, value, f"must be one of {list(choices)}")


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or (
        not integer and not math.isfinite(value)
    ):
        raise ConfigError(name, value, "must be a positive integer" if integer else "must be a positive finite number")


def check_nonneg(name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= 0 or (
        not integer and not math.isfinite(value)
    ):
        raise ConfigError(name, value, "must be an integer >= 0" if integer else "must be a finite number >= 0")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be True or False")


def check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "must be an integer")


def check_unit(name: str, value: Any, *, closed: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0)
    if not ok:
        raise ConfigError(name, value, "must be in [0, 1]" if closed else "must be in [0, 1)")


def check_betas(betas: Any) -> None:
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas
    )
    if not ok:
        raise ConfigError("betas", betas, "must be two numbers in [0, 1)")


# --------------------------------------------------------------------------- types from annotations


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(inner type, optional?)`` for ``Optional[X]`` / ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against annotation ``tp`` (ints become floats for ``float``; lists tuples)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(name, value, "must not be null")
    origin = typing.get_origin(inner)
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "must be true or false")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, value, "must be an integer")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "must be a number")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(name, value, "must be a string")
        return value
    if origin is tuple:
        args = typing.get_args(inner)
        if args[-1] is Ellipsis and isinstance(value, str):
            value = (value,)  # one regex for a list of regexes
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, "must be a list")
        if args[-1] is Ellipsis:
            return tuple(_coerce(name, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(name, value, f"must be a list of {len(args)} values")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, value, "must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, inner):
            raise ConfigError(name, value, f"must be a mapping of {inner.__name__} keys")
        return value
    return value


def check_types(obj: Any) -> None:
    """Check (and normalise, e.g. ``1`` → ``1.0`` for floats) every field of dataclass ``obj``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(f.name, getattr(obj, f.name), hints[f.name]))


# --------------------------------------------------------------------------- strict loading


def from_dict(cls: type, data: Any, *, section: str = ""):
    """Build dataclass ``cls`` from a mapping, strictly.

    Unknown keys raise naming them (and the valid keys); a key in ``cls._renamed`` raises naming
    its new name; nested dataclass fields load recursively. A class with ``_extra_field`` set
    collects unknown keys into that ``dict`` field instead (validated by the class). Every error
    carries the key's dotted path, prefixed by ``section``.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(section or cls.__name__, data, f"must be a mapping of {cls.__name__} keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    renamed: dict = getattr(cls, "_renamed", {})
    extra_field = getattr(cls, "_extra_field", None)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        for key, value in data.items():
            if not isinstance(key, str):
                raise ConfigKeyError(str(key), ": keys must be strings")
            if key in renamed:
                raise ConfigKeyError(key, f": {renamed[key]}", renamed=True)
            if key not in names or key == extra_field:
                if extra_field is not None and key != extra_field:
                    extra[key] = value
                    continue
                raise ConfigKeyError(key, f"; valid keys: {sorted(n for n in names if n != extra_field)}")
            inner, _ = _unwrap_optional(hints[key])
            if dataclasses.is_dataclass(inner) and isinstance(value, dict):
                value = from_dict(inner, value, section=key)
            kwargs[key] = value
        if extra_field is not None:
            kwargs[extra_field] = extra
        return cls(**kwargs)
    except (ConfigError, ConfigKeyError) as err:
        raise err.within(section) from None


def to_dict(obj: Any) -> dict:
    """Plain-data dict (tuples become lists) that :func:`from_dict` loads back."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            out = {}
            extra_field = getattr(type(v), "_extra_field", None)
            for f in dataclasses.fields(v):
                if f.name == extra_field:
                    out.update({k: conv(x) for k, x in getattr(v, f.name).items()})
                else:
                    out[f.name] = conv(getattr(v, f.name))
            return out
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def read_mapping(path: str | os.PathLike) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or JSON file into a dict (errors name the file)."""
    path = os.fspath(path)
    if not path.endswith((".yaml", ".yml", ".json")):
        raise ConfigError("config path", path, "must end in .yaml, .yml or .json")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise ConfigError("config path", path, f"cannot read it ({err.strerror or err})") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: one line naming the file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("config file", path, f"not valid {'JSON' if path.endswith('.json') else 'YAML'} ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config file", path, "top level must be a mapping")
    return data

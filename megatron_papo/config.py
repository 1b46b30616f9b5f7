"""Configuration: nested dataclasses, filled from a YAML file and `section.key=value` overrides.

Each option is declared (and documented) once, as a dataclass field in the module that owns it;
this module only knows how to read YAML/overrides into any such dataclass tree:

    cfg = load_config(TrainConfig, "examples/configs/papo_tiny.yaml", ["parallel.tp=2", "algo.gamma=0.02"])

Unknown keys and values of the wrong type are errors that name the key, the file and what was
expected, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/override value to the annotated type (recursing into dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        last_error = None
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last_error = e
        raise last_error or ConfigError(f"{where}: cannot convert {value!r} to {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        if isinstance(value, bool) and tp is not str:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def apply_override(cfg: T, key: str, value: Any, where: str = "command line", _done: str = "") -> T:
    """Return a copy of `cfg` with the dotted `key` set to `value` (converted to the field's type)."""
    head, _, rest = key.partition(".")
    full = _done + head
    types_ = _field_types(type(cfg))
    if head not in types_:
        raise ConfigError(f"{where}: unknown option {head!r} (in {_done + key!r}); valid here: {sorted(types_)}")
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{where}: {full!r} has no sub-options (in {_done + key!r})")
        new = apply_override(current, rest, value, where, full + ".")
    else:
        new = _coerce(value, types_[head], f"{where}: {full}")
    try:
        return dataclasses.replace(cfg, **{head: new})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {full}: {e}") from None


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        out.append((key.strip(), value))
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (), base: T | None = None) -> T:
    """Defaults of `cls` (or `base`), then the YAML file (if any), then `key=value` overrides, in that order."""
    cfg = cls() if base is None else base
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        cfg = _apply_mapping(cfg, data, str(path))
    for key, value in parse_overrides(list(overrides)):
        cfg = apply_override(cfg, key, yaml.safe_load(value) if value.strip() else value)
    return cfg


def _apply_mapping(cfg: T, data: dict[str, Any], where: str, prefix: str = "") -> T:
    """Apply a (nested) YAML mapping onto the dataclass tree: sub-mappings of dataclass fields
    recurse, anything else replaces the field's value."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        types_ = _field_types(type(cfg))
        if key in types_ and isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, key)):
            cfg = dataclasses.replace(cfg, **{key: _apply_mapping(getattr(cfg, key), value, where, dotted + ".")})
        else:
            cfg = apply_override(cfg, key, value, where=where, _done=prefix)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

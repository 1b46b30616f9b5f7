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
        if value is None:
            raise ConfigError(f"{where}: expected {tp.__name__}, got None")
        if isinstance(value, bool):  # YAML reads yes/no/on/off as booleans: quote such a text
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}" + (" (quote it)" if tp is str else ""))
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


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        out.append((key.strip(), value))
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (), base: T | None = None) -> T:
    """Defaults of `cls` (or `base`), then the YAML file (if any), then `key=value` overrides, in that
    order. Each value is checked against its field's type where it is read (the error names the file
    or the command line); the dataclasses are built once, from the final values, so a check that
    relates two options sees both, whatever order they were given in."""
    tree = _tree(cls() if base is None else base)
    sources = []  # where values came from, named by an error of the final build
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
        _merge(cls, tree, data, str(path))
        sources.append(str(path))
    if overrides:
        for key, raw in parse_overrides(list(overrides)):
            _set(cls, tree, key, raw)
        sources.append("the command line")
    try:
        return _build(cls, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{e} (options from {' and '.join(sources) or 'the defaults'})") from None


def _tree(cfg: Any) -> dict[str, Any]:
    """The dataclass tree as nested dicts of its field values (sub-dataclasses become dicts)."""
    return {f.name: _tree(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else v
            for f in dataclasses.fields(cfg)}


def _merge(cls: type, tree: dict[str, Any], data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Write a (nested) mapping into `tree` (the values of a `cls`): a mapping given for a dataclass
    field merges into its current values; anything else replaces the field's value."""
    types_ = _field_types(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"{where}: unknown option {key!r} (in {dotted!r}); valid here: {sorted(types_)}")
        tp = types_[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _merge(tp, tree[key], value, where, dotted + ".")
        else:
            tree[key] = _coerce(value, tp, f"{where}: {dotted}")


def _set(cls: type, tree: dict[str, Any], key: str, raw: str, where: str = "command line") -> None:
    """Apply one `key=value` override. The value is YAML (numbers, booleans, lists, mappings), except
    for a text option, which takes the text as typed (`output_dir=no` is the folder "no"; surrounding
    spaces and quotes dropped; `~`, `none`, `null`: None where the option allows it)."""
    *sections, name = key.split(".")
    done = ""
    for section in sections:
        types_ = _field_types(cls)
        if section not in types_:
            raise ConfigError(f"{where}: unknown option {section!r} (in {key!r}); valid here: {sorted(types_)}")
        if not dataclasses.is_dataclass(types_[section]):
            raise ConfigError(f"{where}: {done + section!r} has no sub-options (in {key!r})")
        cls, tree, done = types_[section], tree[section], done + section + "."
    tp = _field_types(cls).get(name)
    if tp is not None and _is_text(tp):
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # quoted as in YAML
        elif value == "~":
            value = None  # YAML's null, as `none` and `null`
    else:
        value = yaml.safe_load(raw) if raw.strip() else raw
    _merge(cls, tree, {name: value}, where, done)


def _is_text(tp: Any) -> bool:
    """str, an optional str, or a choice among strings."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return bool(args) and all(_is_text(a) for a in args)
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

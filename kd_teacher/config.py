"""Typed configuration: dataclasses loaded from YAML, unknown keys are errors, dotted overrides.

Every component owns one dataclass (`ModelConfig`, `KDConfig`, `DumpConfig`, ...). This module turns nested
dicts into those dataclasses strictly, so that a typo in a YAML key is an error at start-up rather than a
silently ignored setting, and `load_config` is the one YAML loader every command uses:

1. read the file; apply the dotted `key=value` overrides (full dotted paths from the file's top level);
2. take the `section` (e.g. `kd:` of a student's config), if one is named; it must be there;
3. includes: a key `<name>_config: FILE` next to a field `<name>` of the dataclass reads FILE and merges
   `<name>:` over it (a dump config's `teacher_config: teacher.yaml` with `teacher: {engine: {k: 8}}`);
4. build the dataclass (`from_dict`), then resolve relative paths in fields marked `PATH`: relative to the
   working directory if they exist there, else to the YAML file's folder.
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
    """A configuration value or key is wrong; the message names the dotted key."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(options) == 1:  # Optional[X]: X's own error names the field and what it allows
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} fits none of the allowed forms: " + "; ".join(errors))
    if origin is typing.Literal:
        # YAML 1.1 reads off/no/false as False and on/yes/true as True: a Literal that has the word takes it
        # (`engine.repacking: off`).
        if isinstance(value, bool) and value not in args and ("on" if value else "off") in args:
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrongly typed values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"missing required key(s) {', '.join(prefix + k for k in missing)} for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    except ConfigError as e:  # the dataclass's own checks (__post_init__): say where it sits in the file
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {p} is not a mapping")
            node = nxt
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A YAML file's top-level mapping, with dotted overrides applied (ConfigError if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return apply_overrides(data, overrides or [])


# Field metadata of a file or directory path that a YAML file may give relative to its own folder.
PATH = {"path": True}


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None, section: str | None = None) -> T:
    """Dataclass `cls` from a YAML file (optionally one top-level `section` of it): see the module docstring."""
    path = Path(path)
    data = load_yaml(path, overrides)
    if section:
        if section not in data:
            raise ConfigError(f"{path} has no top-level `{section}:` block")
        data = data[section]
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: `{section}:` must be a mapping, got {data!r}")
    cfg = from_dict(cls, _with_includes(cls, data, path.parent), section or "")
    resolve_paths(cfg, path.parent)
    return cfg


def _with_includes(cls: type, data: dict, base: Path) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    out = dict(data)
    for name in sorted(names):
        key = f"{name}_config"
        if key in out and key not in names:
            ref = out.pop(key)
            if ref is not None:
                out[name] = _deep_merge(load_yaml(_resolved(str(ref), base)), out.get(name) or {})
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_paths(cfg: Any, base: Path) -> None:
    """Fields marked `PATH` (in `cfg` and the dataclasses it holds): relative to the working directory if they
    exist there, else to `base` (the YAML's folder) if they exist there; otherwise left as written."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("path") and isinstance(value, str):
            setattr(cfg, f.name, _resolved(value, base))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            resolve_paths(value, base)


def _resolved(p: str, base: Path) -> str:
    if Path(p).is_absolute() or Path(p).exists():
        return p
    candidate = base / p
    return str(candidate) if candidate.exists() else p

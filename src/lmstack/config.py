"""Typed configs: TOML/YAML/JSON files and ``--section.key value`` overrides -> a config dataclass.

Each layer defines its own ``@dataclass`` config next to the code it configures; this module only loads
and validates. Rules:

- an unknown key is an error that names the dotted field and suggests the closest known one;
- a value of the wrong type is an error naming the field, the expected type and the value given;
- command-line override values are parsed as YAML scalars (``3e-4``, ``true``, ``[1, 2]``) and then
  checked like file values, so ``--train.lr 3e-4`` and ``lr = 3e-4`` in a TOML file mean the same;
- a dataclass may validate further in ``__post_init__`` by raising :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import functools
import difflib
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from lmstack.errors import ConfigError

T = TypeVar("T")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file into a dict."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a .toml, .yaml or .json config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_config_text(raw, path.suffix, str(path))


def parse_config_text(raw: bytes | str, suffix: str, name: str) -> dict[str, Any]:
    """Parse config text by its file suffix; every parse problem becomes one ConfigError line naming ``name``."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    else:
        text = raw
    suffix = suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{name}: unknown config format {suffix!r}; use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{name}: cannot parse ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data


def _one_line(e: Exception) -> str:
    """A parser error as one line (PyYAML's messages span several lines with a caret diagram)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "3e-4", "--model.n_layer=4"]`` -> ``{"train": {"lr": 3e-4}, "model": {"n_layer": 4}}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key VALUE or --section.key=VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key}: missing a value")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part!r} is set both as a value and a section")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (sections merge, values replace)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then ``base``, then the file at ``path``, then CLI ``overrides``."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = merge(data, read_config_file(path))
    if overrides:
        data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Validate ``data`` against the dataclass ``cls`` and build it. Errors name the dotted field."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known fields: {', '.join(fields)}"
            raise ConfigError(f"unknown config field '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config field {name!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config field {name!r}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):  # a single path or name where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {name!r}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config field {name!r}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field {name!r}: expected a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {k: _coerce(v, val_tp, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field {name!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field {name!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config field {name!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config field {name!r}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"config field {name!r}: expected a path, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-ready data (paths as strings, tuples as lists)."""
    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return convert(config)


def check_literals(config: Any) -> None:
    """Check every ``Literal[...]`` field of a dataclass built directly in Python (``from_dict`` already
    checks them for configs read from files and the CLI), with the same one-line error."""
    for name, tp in _literal_fields(type(config)):
        _coerce(getattr(config, name), tp, name)


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if get_origin(hints[f.name]) is Literal)

"""Typed run configs: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Every run (tiny checkpoints, reward training, GRPO) is described by a dataclass tree. Loading
checks everything before any model is built:

* an unknown key fails and suggests the closest known one;
* a value of the wrong type fails (``int`` is accepted where a ``float`` is expected, nothing
  else is converted silently);
* a value outside the range declared with :func:`param` fails;
* a dataclass may define ``check(self)`` for rules that involve several fields; it raises
  :class:`ConfigError` naming the key;
* a key a config no longer has fails naming its replacement (the class's ``RENAMED`` mapping).

Errors are :class:`ConfigError` carrying the full dotted key, so the CLI can print one line
and exit non-zero without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config problem tied to one dotted key (``reward.text_heads``)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config key '{key}': {message}")


def param(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
          default_factory: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with an allowed numeric range (inclusive) and a one-line help."""
    meta = {"min": min, "max": max, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Raw(str):
    """An override value as typed on the command line, parsed once its field type is known."""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if isinstance(value, _Raw):
        if tp is str:
            return str(value)
        if origin in (Union, types.UnionType) and str in get_args(tp) and value.lower() not in ("null", "none", "~"):
            return str(value)
        try:
            value = yaml.safe_load(str(value))
        except yaml.YAMLError as err:
            raise ConfigError(key, f"cannot parse override value {str(value)!r}: {err}") from None
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, "may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(key, f"must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if value is None:
        raise ConfigError(key, f"may not be null (expected {_type_name(tp)})")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(vt, v, _join(key, str(k))) for k, v in value.items()}
    raise ConfigError(key, f"unsupported field type {tp!r}")


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, validating keys, types and ranges."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        if prefix:
            keys = [f.name for f in dataclasses.fields(cls) if f.init]
            raise ConfigError(prefix, f"is a section ({', '.join(keys)}), got {data!r}; set its keys, e.g. "
                                      f"{prefix}.{keys[0]}=...")
        raise ConfigError("<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed = getattr(cls, "RENAMED", {})
    for key in data:
        if key in renamed and key not in known:
            raise ConfigError(_join(prefix, str(key)), f"was replaced by '{_join(prefix, renamed[key])}'")
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            raise ConfigError(_join(prefix, str(key)), f"unknown key{hint}")
    kwargs = {}
    for name, f in known.items():
        key = _join(prefix, name)
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict) \
                    and f.default_factory is not dataclasses.MISSING:
                # overrides of a nested config apply on top of the field's own default
                value = _deep_merge(to_dict(f.default_factory()), value)
            kwargs[name] = _coerce(hints[name], value, key)
        elif dataclasses.is_dataclass(hints[name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            kwargs[name] = from_dict(hints[name], {}, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required")
    obj = cls(**kwargs)
    _check_ranges(obj, prefix)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as err:
            if prefix and not err.key.startswith(prefix + "."):
                raise ConfigError(_join(prefix, err.key), err.message) from None
            raise
    return obj


def _check_ranges(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        value = getattr(obj, f.name)
        if value is None or (lo is None and hi is None):
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if lo is not None and v < lo:
                raise ConfigError(_join(prefix, f.name), f"must be >= {lo}, got {v}")
            if hi is not None and v > hi:
                raise ConfigError(_join(prefix, f.name), f"must be <= {hi}, got {v}")


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested mapping (values are typed later)."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value (dotted keys for nested fields)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(item, "override has an empty key")
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is not a mapping; cannot set a sub-key")
            node = child
        node[parts[-1]] = _Raw(raw)
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _read_config_file(path: Path, chain: tuple[Path, ...]) -> dict:
    """A YAML config file as a mapping; ``extends: OTHER.yaml`` (relative to the file) loads OTHER first
    and lays this file's keys over it, sections merged key by key (an ablation names only what it changes)."""
    key = "--config" if not chain else f"{chain[-1]}: extends"
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(key, "files extend each other in a cycle: " + " -> ".join(str(p) for p in (*chain, path)))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(key, f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} must hold a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends", f"expected a file name, got {parent!r}")
    return _deep_merge(_read_config_file(path.parent / parent, (*chain, path.resolve())), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> T:
    """Load ``cls`` from ``base`` (a preset), then a YAML file (optional), then dotted overrides;
    raise :class:`ConfigError`."""
    data = _read_config_file(Path(path), ()) if path is not None else {}
    data = {**(base or {}), **data}
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(obj: Any) -> dict:
    """The config as plain data (lists for tuples), ready for YAML/JSON."""
    return json_plain(dataclasses.asdict(obj))


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def _field_comment(f: dataclasses.Field, tp: Any) -> str:
    parts = [f.metadata.get("help", "")] if f.metadata.get("help") else []
    args = [a for a in get_args(tp) if a is not type(None)]
    literal = tp if get_origin(tp) is Literal else next((a for a in args if get_origin(a) is Literal), None)
    if literal is not None:
        parts.append("one of " + ", ".join(str(c) for c in get_args(literal)))
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None or hi is not None:
        parts.append(" and ".join(x for x in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None
                                              else "") if x))
    return "; ".join(parts)


def to_commented_yaml(obj: Any, indent: int = 0) -> str:
    """The config as YAML with each key's help, choices and range as a comment (loads back as
    :func:`to_dict` gives it)."""
    hints = typing.get_type_hints(type(obj))
    lines = []
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value, pad = getattr(obj, f.name), " " * indent
        comment = _field_comment(f, hints[f.name])
        tail = f"  # {comment}" if comment else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{tail}")
            lines.append(to_commented_yaml(value, indent + 2).rstrip("\n"))
        else:
            lines.append(f"{pad}{f.name}: {_yaml_value(json_plain(value))}{tail}")
    return "\n".join(lines) + "\n"


def json_plain(value: Any) -> Any:
    """Tuples as lists, recursively (what YAML and JSON take)."""
    if isinstance(value, dict):
        return {k: json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    return value


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))

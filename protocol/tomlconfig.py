"""Typed configuration from TOML: dataclasses built from tables, with errors that say where.

Each dataclass field is a key; nested dataclasses are sub-tables; unknown keys are errors
(a typo must not silently fall back to a default). ``inf`` is written as the string "inf".
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

from fedpref.protocol.errors import ConfigError

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e}); fix the syntax at that line") from None


def build(cls: type[T], table: dict[str, Any] | None, *, where: str) -> T:
    """Build dataclass ``cls`` from ``table``; ``where`` names the file and table for errors."""
    table = dict(table or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys are {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        kwargs[name] = _coerce(hints[name], value, where=f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, *, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build(hint, value, where=where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(item, v, where=f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, str) and value.lower() in ("inf", "+inf"):
            return math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, typing.cast(type, __import__("enum").Enum)):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in hint]}") from None
    return value


def to_plain(obj: Any) -> Any:
    """A dataclass tree as JSON-ready values (inf as "inf")."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        return "inf"
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str)):
        return obj.value
    return obj


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "inf" if v == "inf" else json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v).__name__)


def dump_tables(tables: dict[str, dict]) -> str:
    """TOML text for ``{table: {key: value | {subtable...}}}`` (what the CLIs' init commands write)."""
    out = []
    for name, table in tables.items():
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        out.append("")
        sub = {f"{name}.{k}": v for k, v in table.items() if isinstance(v, dict)}
        if sub:
            out.append(dump_tables(sub))
    return "\n".join(out)

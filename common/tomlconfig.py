"""Typed configuration from TOML: dataclasses built from tables, with errors that say where.

Each dataclass field is a key; nested dataclasses are sub-tables; unknown keys are errors
(a typo must not silently fall back to a default). ``inf`` is written as the string "inf".

Every numeric field declares its valid values next to it, ``x: float = ranged(1.0, gt=0)``
(a :class:`Range` in the field's metadata), and the config's ``__post_init__`` calls
:func:`check_fields`. :func:`build` checks the same :class:`Range` while reading TOML, so a
value is rejected with its full key path, whether it comes from a file or from Python. NaN
and -inf are never valid; +inf only where the field says ``inf=True`` (a budget where inf
means "no limit"), since NaN compares False with everything and would slip past a bound.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from fedpref.common.errors import ConfigError

T = TypeVar("T")

_RANGE = "fedpref.range"  # the dataclass field metadata key that holds a Range


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of one numeric config field (see :func:`ranged`).

    ``gt``/``ge`` and ``lt``/``le`` are exclusive/inclusive bounds (``None`` = unbounded on
    that side). Whether the field holds integers comes from its type (``int`` or ``float``,
    or a ``tuple`` of them, checked item by item). ``example`` appears in the fix ("e.g. 1.0";
    by default the field's default) and ``note`` after the range ("(0 = DP off)").
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    inf: bool = False  # +inf is valid ("no limit"); NaN and -inf never are
    example: object = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.gt is not None and self.ge is not None or self.lt is not None and self.le is not None:
            raise TypeError("Range: give at most one lower bound (gt or ge) and one upper bound (lt or le)")

    def accepts(self, value: object, *, integer: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
            return False
        try:
            v = int(value) if integer else float(value)  # type: ignore[arg-type]
        except (OverflowError, ValueError):  # an int too large for a float
            return False
        if math.isnan(v) or v == -math.inf or (v == math.inf and not self.inf):
            return False
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def describe(self, *, integer: bool) -> str:
        """What is valid, in words: 'a finite number > 0', 'an integer in [1, 100000]'."""
        lo = (">", self.gt) if self.gt is not None else ("≥", self.ge) if self.ge is not None else None
        hi = ("<", self.lt) if self.lt is not None else ("≤", self.le) if self.le is not None else None
        noun = "an integer" if integer else "a number" if (lo and hi) or self.inf else "a finite number"
        if lo and hi:
            text = f"{noun} in {'(' if lo[0] == '>' else '['}{_fmt(lo[1])}, {_fmt(hi[1])}{')' if hi[0] == '<' else ']'}"
        elif lo or hi:
            op, bound = lo or hi  # type: ignore[misc]
            text = f"{noun} {op} {_fmt(bound)}"
        else:
            text = noun
        if self.inf:
            text += ", or inf for no limit"
        return text + (f" {self.note}" if self.note else "")

    def check(self, key: str, value: object, *, integer: bool) -> None:
        """Raise a one-line ConfigError naming ``key``, the value and the valid range."""
        if not self.accepts(value, integer=integer):
            fix = self.describe(integer=integer)
            if self.example is not None:
                fix += f", e.g. {_fmt(self.example)}"
            raise ConfigError(f"{key} = {_show(value)}; use {fix}")


def ranged(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None, inf: bool = False, example: object = None,
           note: str = "") -> Any:
    """A dataclass field with its valid range: ``clip_norm: float = ranged(1.0, gt=0)``.

    Without ``example`` the fix suggests ``default`` when that is a finite number.
    """
    if example is None and isinstance(default, numbers.Real) and not isinstance(default, bool) \
            and math.isfinite(default):
        example = default
    return dataclasses.field(default=default, metadata={
        _RANGE: Range(gt=gt, ge=ge, lt=lt, le=le, inf=inf, example=example, note=note)})


def field_range(f: dataclasses.Field) -> Range | None:
    """The Range a field declares with :func:`ranged`, if any."""
    return f.metadata.get(_RANGE)


def numeric_kind(hint: Any) -> tuple[bool, bool] | None:
    """For a field type: (is it integer, is it a tuple of them), or None if it is not numeric."""
    if hint is int or hint is float:
        return hint is int, False
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args and args[0] in (int, float) and (len(args) == 1 or args[1] is Ellipsis or set(args) == {args[0]}):
            return args[0] is int, True
    return None


@functools.cache
def _numeric_fields(cls: type) -> tuple[tuple[str, Range, bool, bool], ...]:
    """(name, range, integer, tuple) of each numeric field of ``cls``; each must declare a Range."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = numeric_kind(hints[f.name])
        if kind is None:
            continue
        rng = field_range(f)
        if rng is None:
            raise TypeError(f"{cls.__name__}.{f.name}: a numeric config field needs a valid range; "
                            f"declare it with ranged(default, gt=..., le=...)")
        out.append((f.name, rng, *kind))
    return tuple(out)


def check_fields(obj: Any, label: str) -> None:
    """Check every numeric field of the dataclass ``obj`` against its Range (call it first in
    ``__post_init__``); ``label`` names the table in errors ("federation" -> "federation.rounds")."""
    for name, rng, integer, is_tuple in _numeric_fields(type(obj)):
        value = getattr(obj, name)
        if not is_tuple:
            rng.check(f"{label}.{name}", value, integer=integer)
        elif not isinstance(value, tuple):
            raise ConfigError(f"{label}.{name} = {_show(value)}; use a list of "
                              f"{'integers' if integer else 'numbers'}, each {rng.describe(integer=integer)}")
        else:
            for i, v in enumerate(value):
                rng.check(f"{label}.{name}[{i}]", v, integer=integer)


def _fmt(x: object) -> str:
    return repr(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _show(value: object) -> str:
    """A value as it appears in an error: numbers plainly (nan, inf), others as repr, short."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            text = repr(int(value)) if isinstance(value, numbers.Integral) else repr(float(value))
        except OverflowError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing TOML file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a TOML file; pass the config file's path") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.start + 1}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e}); check the path and permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e}); fix the syntax at that line") from None


def build(cls: type[T], table: dict[str, Any] | None, *, where: str) -> T:
    """Build dataclass ``cls`` from ``table``; ``where`` names the file and table for errors."""
    table = dict(table or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys are {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        kwargs[name] = _coerce(hints[name], value, where=f"{where}.{name}", rng=field_range(fields[name]))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, *, where: str, rng: Range | None = None) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build(hint, value, where=where)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(item, v, where=f"{where}[{i}]", rng=rng) for i, v in enumerate(value))
    if hint is float or hint is int:
        integer = hint is int
        if not integer and isinstance(value, str) and value.lower() in ("inf", "+inf"):
            value = math.inf  # how to_plain/dump_tables write inf
        (rng or Range()).check(where, value, integer=integer)  # NaN, inf, wrong type, out of range
        return value if integer else float(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
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
        return "inf" if obj > 0 else "-inf"
    if hasattr(obj, "value") and not isinstance(obj, (int, float, str)):
        return obj.value
    return obj


def dump_tables(tables: dict[str, dict]) -> str:
    """TOML text for ``{table: {key: value | {subtable...}}}`` (what the CLIs' init commands write).

    Values as :func:`to_plain` gives them; a float inf is written as the string "inf" (which
    :func:`build` reads back as inf), and NaN is refused: no config field accepts it.
    """
    return tomli_w.dumps(_plain_floats(tables, ""))


def _plain_floats(obj: Any, where: str) -> Any:
    if isinstance(obj, dict):
        return {k: _plain_floats(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_floats(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, float) and math.isnan(obj):
        raise ValueError(f"dump_tables: {where} = nan; no config accepts NaN, write a finite number")
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    return obj

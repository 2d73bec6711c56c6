"""The one JSONL reader: every JSONL file fedpref reads goes through :func:`read_jsonl`.

One error contract for all of them: anything wrong with the file is a
:class:`~fedpref.common.errors.DataError` whose message is one line,
``FILE:LINE: what is wrong; how to fix it`` (``FILE:`` alone when no line is concerned).
Hostile input never escapes as another exception: binary data and non-UTF-8 text, absurdly
nested JSON (``RecursionError``), integers of thousands of digits (Python's int-conversion
limit), NaN and Infinity, a folder where the file should be, overlong lines.

Each caller checks the *meaning* of the records it is given (fields, types) and raises its own
``DataError`` with the same ``FILE:LINE:`` prefix (``where(path, line)``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedpref.common.errors import DataError

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "MAX_LINE_BYTES", "read_jsonl", "where"]

MAX_LINE_BYTES = 1 << 20  # 1 MiB per record: a preference pair or a labelled text is far smaller
MAX_DEPTH = 64  # nesting of objects and arrays in one record (our records need 2 or 3)
MAX_INT_DIGITS = 18  # integers fit in int64; a longer one is a corrupt or hostile file

_FIX_UTF8 = "save the file as UTF-8 text with one JSON object per line"


def where(path: str | os.PathLike[str], line: int | None = None) -> str:
    """``FILE:LINE`` (or ``FILE``) as every JSONL error message starts."""
    return f"{path}:{line}" if line else f"{path}"


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _reject_constant(name: str) -> Any:  # noqa: ANN401
    raise ValueError(f"{name} is not a JSON number")


def _depth(line: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in ``line``, outside strings (a cheap pre-check,
    so that ``json.loads`` never recurses deeply)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in line:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: cannot read the file (no such file); check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: cannot read the file (it is a folder); give the JSONL file's path") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}); check the path and its permissions") from None


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of the JSONL file ``path``.

    Line numbers start at 1; a UTF-8 byte-order mark on the first line is skipped. Every
    record must be a JSON object. Raises :class:`DataError` (``FILE:LINE: what; fix``) for an
    unreadable file or any malformed line; an empty file yields nothing (the caller decides
    whether that is an error).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{where(path, line)}: binary data (a NUL byte), not JSONL text; {_FIX_UTF8}")
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        at = where(path, lineno)
        if len(chunk) > MAX_LINE_BYTES:
            raise DataError(f"{at}: line of {len(chunk)} bytes (at most {MAX_LINE_BYTES}); {_FIX_UTF8}")
        try:
            text = chunk.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{at}: not valid UTF-8 (byte {e.start + 1} of the line); {_FIX_UTF8}") from None
        if not text.strip():
            continue
        if _depth(text) > MAX_DEPTH:
            raise DataError(f"{at}: JSON nested more than {MAX_DEPTH} levels deep; write one flat JSON object per line")
        try:
            obj = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: invalid JSON ({e.msg} at column {e.colno}); write one JSON object per line") from None
        except (ValueError, RecursionError, OverflowError) as e:
            raise DataError(f"{at}: invalid JSON ({' '.join(str(e).split())[:120]}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{at}: expected a JSON object, got {_json_type(obj)}; write one JSON object per line")
        yield lineno, obj


def _json_type(obj: object) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "null"}.get(type(obj), type(obj).__name__)

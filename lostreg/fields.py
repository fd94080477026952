"""Typed reads of JSON (and CSV text) read back from disk: a wrong type is one line naming file
and key.

Run folders are written by ``lostreg.run`` but read back long after, possibly edited by hand
or damaged. ``bool("false")`` is True and ``int("abc")`` raises a bare ``ValueError``, so no
value from disk is used through Python's lenient conversions: every read here checks the JSON
type itself and raises :class:`LostregError` with the file, the key and the offending value.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lostreg.errors import LostregError

MISSING: Any = object()  # "no default": the key is required

# JSON types a method parameter may take (no nested objects: they would not compare or print)
SCALAR_TYPES = (str, int, float, bool, type(None))


def shown(value: Any, limit: int = 60) -> str:
    """``repr`` of a bad value, cut so one damaged file cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def is_int(value: Any) -> bool:
    """A JSON integer that fits 64 bits (``true`` is not one, although Python's bool is an int;
    JSON itself has no bound, and a 400-digit width would overflow NumPy further on)."""
    return isinstance(value, int) and not isinstance(value, bool) and \
        INT64_MIN <= value <= INT64_MAX


def is_number(value: Any) -> bool:
    """A finite JSON number (``NaN``/``Infinity``, which ``json`` accepts, are not; nor is an
    integer too large for a float, on which ``math.isfinite`` raises OverflowError)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


class Fields:
    """One JSON object from ``where`` (a file, or ``file:line``), read with type checks."""

    def __init__(self, data: dict, where: str) -> None:
        self.data = data
        self.where = where

    def fail(self, key: str, expected: str) -> LostregError:
        return LostregError(f"{self.where}: '{key}' must be {expected}, "
                            f"not {shown(self.data.get(key))}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is MISSING:
            raise LostregError(f"{self.where}: missing key '{key}'")
        return default

    def text(self, key: str, default: Any = MISSING, optional: bool = False) -> Any:
        """A non-empty string (``None`` allowed when ``optional``)."""
        value = self._get(key, default)
        if optional and value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string")
        return value

    def integer(self, key: str, default: Any = MISSING, minimum: int | None = None,
                optional: bool = False) -> Any:
        value = self._get(key, default)
        if optional and value is None:
            return None
        if not is_int(value) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise self.fail(key, f"a whole number{bound}")
        return value

    def number(self, key: str, default: Any = MISSING, optional: bool = False) -> Any:
        value = self._get(key, default)
        if optional and value is None:
            return None
        if not is_number(value):
            raise self.fail(key, "a finite number")
        return float(value)

    def flag(self, key: str, default: Any = MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def mapping(self, key: str, default: Any = MISSING) -> dict:
        value = self._get(key, default)
        if not isinstance(value, dict):
            raise self.fail(key, "a JSON object")
        return value

    def scalars(self, key: str, default: Any = MISSING) -> dict:
        """A JSON object of scalar values (method parameters)."""
        value = self.mapping(key, default)
        for name, item in value.items():
            if not isinstance(item, SCALAR_TYPES) or (isinstance(item, float)
                                                      and not math.isfinite(item)):
                raise LostregError(f"{self.where}: '{key}.{name}' must be a string, number, "
                                   f"true/false or null, not {shown(item)}")
        return value

    def box(self, key: str) -> list[float]:
        """``[x1, y1, x2, y2]``: four finite numbers with ``x1 <= x2`` and ``y1 <= y2``."""
        value = self._get(key, MISSING)
        if not is_box(value):
            raise self.fail(key, "[x1, y1, x2, y2] (four finite numbers, x1 <= x2, y1 <= y2)")
        return [float(v) for v in value]

    def boxes(self, key: str) -> list[list[float]]:
        value = self._get(key, MISSING)
        if not isinstance(value, list) or not all(is_box(item) for item in value):
            raise self.fail(key, "a list of [x1, y1, x2, y2] boxes (finite, x1 <= x2, y1 <= y2)")
        return [[float(v) for v in item] for item in value]


def is_box(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4 and all(is_number(v) for v in value)
            and value[0] <= value[2] and value[1] <= value[3])


def _header(path: Path) -> list[str]:
    """The column names of a CSV's first line as written (pandas renames a repeated name)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return next(csv.reader(handle), [])


def _refuse_repeated_columns(header: list[str], path: Path) -> None:
    """One line for a column named twice: pandas would rename the second ``x.1`` and every
    reader would take the first silently, whichever of the two the author meant. Unnamed
    columns (a trailing comma) hold nothing a reader looks up, and may repeat."""
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise LostregError(f"{path}: header: column {shown(name)} is given twice (which "
                               "one holds the values?)")
        seen.add(name)


def read_text_csv(path: Path, columns: Sequence[str]) -> Any:
    """A CSV read as text (``dtype=str``, empty cells kept as ``""``: every value is then
    checked by its reader, never converted by pandas' guesses), with ``columns`` required;
    one line naming the file otherwise. Returns a ``pandas.DataFrame``."""
    import pandas as pd

    try:  # the header first: a column named twice is refused before the file is parsed
        _refuse_repeated_columns(_header(path), path)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, csv.Error) as exc:
        raise LostregError(f"{path}: not a readable CSV ({exc})") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise LostregError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame

"""Text cells between files and reports: read one line each, written so no reader takes them
for structure or code.

The reports copy text they did not write (a published figure's paper, protocol and note; a
run's model and settings from its ``config.json``) into markdown tables and CSV files. Read
unchecked, a newline in a cell adds markdown lines, a ``|`` shifts a table's columns, raw HTML
(``<img onerror=...>``) passes into a rendered page, and a cell starting with ``=`` is a formula
to a spreadsheet opening the CSV (issue 20, row 9). So:

* ``read_cells``: a CSV read as text whose cells are one line each (no line break or other
  control character), one line naming the file, row and column otherwise; an empty file is
  one line too (pandas' ``EmptyDataError`` was a traceback, row 10);
* ``md_cell``: text escaped for a markdown table cell or line (``\\``, ``|``, ``<``, ``>``,
  ``&``; control characters become spaces), so it shows as written;
* ``neutralise_formulas``: a CSV output's text cells starting with ``=``, ``+``, ``-``, ``@``,
  a tab or a carriage return get a leading ``'`` (OWASP's CSV-injection rule: a spreadsheet
  shows the text, never evaluates it); ``restore_formulas`` undoes it for lostreg's own
  readers of such a file. Numbers are never touched (a negative Gram bias stays a number).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from lostreg.errors import LostregError
from lostreg.fields import read_text_csv, shown

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_MARKDOWN = {"\\": "\\\\", "|": "\\|", "<": "&lt;", ">": "&gt;", "&": "&amp;"}
_MARKDOWN_CHARS = re.compile(r"[\\|<>&]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _bad_character(text: str) -> str | None:
    """The first character that makes ``text`` more than one line of plain text, or None."""
    match = _CONTROL.search(text)
    return None if match is None else match.group()


def read_cells(path: Path, columns: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """``fields.read_text_csv`` (every cell text, ``columns`` required) of a file whose every
    cell is one line; one line naming the file, row (as a spreadsheet numbers it) and column
    for the first cell that is not, or for an empty file."""
    try:
        frame = read_text_csv(path, columns)
    except pd.errors.EmptyDataError:
        raise LostregError(f"{path}: empty file (expected a header line with the columns "
                           f"{', '.join(columns)})") from None
    for name in frame.columns:
        bad = _bad_character(str(name))
        if bad is not None:
            raise LostregError(f"{path}: header: column name {shown(name)} holds {bad!r}; "
                               "one line per cell")
    for index, record in enumerate(frame.itertuples(index=False)):
        for name, value in zip(frame.columns, record, strict=True):
            bad = _bad_character(value)
            if bad is not None:
                raise LostregError(f"{path}: row {index + 2}, column '{name}': "
                                   f"{shown(value)} holds {bad!r}; one line per cell")
    return frame


def md_cell(value: Any) -> str:
    """``value`` as text that a markdown table cell (or line) shows as written."""
    text = _CONTROL.sub(" ", str(value))
    return _MARKDOWN_CHARS.sub(lambda match: _MARKDOWN[match.group()], text)


def md_row(cells: list[Any] | tuple[Any, ...]) -> str:
    """A markdown table row of escaped cells."""
    return "| " + " | ".join(md_cell(cell) for cell in cells) + " |"


def _neutral(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text cells cannot start a spreadsheet formula."""
    shown_frame = frame.copy()
    for column in shown_frame.columns:
        if not pd.api.types.is_numeric_dtype(shown_frame[column]):
            shown_frame[column] = shown_frame[column].map(_neutral)
    return shown_frame


def restore_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Undo ``neutralise_formulas`` on a frame read back as text."""
    restored = frame.copy()
    for column in restored.columns:
        restored[column] = restored[column].map(
            lambda v: v[1:] if isinstance(v, str) and v[1:2] and v.startswith("'")
            and v[1:].startswith(FORMULA_STARTS) else v)
    return restored

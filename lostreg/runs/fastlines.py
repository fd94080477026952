"""A box run's predictions read at C speed: the checks of ``store.read_predictions``, on whole
columns instead of line by line.

``store.read_predictions`` parses each line alone and checks each value through
``lostreg.fields`` (about 0.15 s for a VOC07 run); a leaderboard summarising hundreds of runs
spends its time there. Here the file is parsed as one JSON array and each field is checked for
all lines at once, with exactly the same rules: the same JSON types (``type(v) is int``, never
a bool; lists of four finite numbers, ordered corners), non-empty unique image ids, stored hits
equal to the hits recomputed from the boxes (``evaluation.iou.best_ious``). Anything the fast
path is not sure of returns None, and the caller reads the file with
``store.read_predictions``, which accepts it or says, with the file and line, what is wrong:
the fast path never accepts what the line reader refuses, and never says something else.

Parsing the lines as one array is only the same as parsing each line when every line holds
exactly one JSON value; that is checked too: outside strings, the bracket depth is zero at
every line break (no value spans two lines), and there are as many values as lines (a line
holding two values would add one).

Speed (a VOC07 run, 5011 lines): the parse is most of it, and a third of the parse was the
cyclic garbage collector walking the ~100k containers the parse makes (JSON values hold no
cycles), so it is paused while parsing; every check is one C-level pass over a column (``map``,
``set``) rather than a Python loop over the lines.
"""

from __future__ import annotations

from itertools import chain, repeat
from typing import Any

import numpy as np

from lostreg.evaluation.corloc import HIT_IOU
from lostreg.evaluation.iou import best_ious
from lostreg.io import MAX_JSON_DEPTH, gc_paused, loads_fast

_KEPT = b'[]{}"\n'
_DROPPED = bytes(b for b in range(256) if b not in _KEPT)
_STEPS = np.zeros(256, dtype=np.int8)
_STEPS[[ord("["), ord("{")]] = 1
_STEPS[[ord("]"), ord("}")]] = -1


def one_value_per_line(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether, read as JSON, no value spans a line break and nothing nests deeper than
    ``max_depth`` (exact for valid JSON, which the caller's parse then requires): escapes
    removed left to right, every byte but brackets, quotes and line breaks dropped, the depth
    a prefix sum with strings masked out."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = np.frombuffer(data.translate(None, _DROPPED), dtype=np.uint8)
    step = _STEPS[marks]
    in_string = np.bitwise_xor.accumulate((marks == ord('"')).view(np.uint8)).astype(bool)
    step[in_string] = 0
    depth = np.cumsum(step, dtype=np.int64)
    breaks = marks == ord("\n")
    return (int(depth.max(initial=0)) <= max_depth and not depth[breaks].any()
            and not in_string[breaks].any())


def _types(values: list[Any]) -> set[type]:
    return set(map(type, values))


def _records(data: bytes) -> list[dict] | None:
    """Every line's JSON object, or None unless each line is exactly one object."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        return []
    if not one_value_per_line(data):
        return None
    try:
        records = loads_fast(b"[" + b",".join(lines) + b"]")
    except (ValueError, RecursionError):
        return None
    if len(records) != len(lines) or _types(records) != {dict}:
        return None
    return records


def _numbers(values: list[Any]) -> np.ndarray | None:
    """float64 of JSON numbers (int or float, not bool), all finite; None otherwise."""
    if not _types(values) <= {int, float}:
        return None
    try:
        array = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer too large for a float: the line reader says so
        return None
    return array if np.isfinite(array).all() else None


def _boxes(values: list[Any]) -> np.ndarray | None:
    """``(n, 4)`` boxes of lists of four finite numbers with ``x1 <= x2`` and ``y1 <= y2``."""
    if not (_types(values) <= {list} and set(map(len, values)) <= {4}):
        return None
    flat = _numbers(list(chain.from_iterable(values)))
    if flat is None:
        return None
    boxes = flat.reshape(-1, 4)
    ordered = (boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 1] <= boxes[:, 3])
    return boxes if ordered.all() else None


def _sizes(widths: list[Any], heights: list[Any]) -> bool:
    """Whole numbers (not bool) >= 1 whose products (the image areas the line reader
    computes) are floats: below 2**31 each (larger sizes go to the line reader)."""
    values = [*widths, *heights]
    return not values or (_types(values) == {int} and min(values) >= 1
                          and max(values) < 2**31)


def box_columns(data: bytes) -> dict[str, Any] | None:
    """``image_id``, ``hit`` and ``best_iou`` (recomputed) of a box run's predictions, checked
    as ``store.read_predictions`` checks them; None when the line reader must decide. The
    collector stays paused until the parsed lines are freed, so it never walks them."""
    with gc_paused():
        return _box_columns(data)


def _box_columns(data: bytes) -> dict[str, Any] | None:
    records = _records(data)
    if records is None:
        return None
    missing = object()  # its type, ``object``, is no JSON value's
    n = len(records)
    column = {key: list(map(dict.get, records, repeat(key, n), repeat(missing, n)))
              for key in ("image_id", "file", "width", "height", "box", "gt_boxes",
                          "best_iou", "hit")}
    ids = column["image_id"]
    if (not _types(ids) <= {str} or not all(ids) or len(set(ids)) != len(ids)
            or not _types(column["file"]) <= {type(None), object, str} or "" in column["file"]
            or not _sizes(column["width"], column["height"])
            or not _types(column["hit"]) <= {bool}
            or _numbers(column["best_iou"]) is None):
        return None
    boxes = _boxes(column["box"])
    gt_lists = column["gt_boxes"]
    if boxes is None or not _types(gt_lists) <= {list}:
        return None
    gts = _boxes(list(chain.from_iterable(gt_lists)))
    if gts is None:
        return None
    counts = np.fromiter(map(len, gt_lists), dtype=np.int64, count=n)
    ious = best_ious(boxes.reshape(-1, 4), gts.reshape(-1, 4), counts)
    hits = ious >= HIT_IOU
    if not np.array_equal(hits, np.array(column["hit"], dtype=bool)):
        return None
    return {"image_id": ids, "hit": hits, "best_iou": ious}

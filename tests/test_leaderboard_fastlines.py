"""The fast reader of a box run's predictions (``lostreg.runs.fastlines``) never accepts what the
line reader (``store.read_predictions``) refuses, never gives other values, and a summary of a
damaged folder fails with the very line ``load_run`` gives."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from run_folders import write_run
from test_leaderboard_robust import CASES

from lostreg.errors import LostregError
from lostreg.runs import summaries
from lostreg.runs.fastlines import box_columns, one_value_per_line
from lostreg.runs.store import load_run, read_predictions


def _slow(data: bytes) -> tuple[str, object]:
    """What the line reader makes of ``data``: its columns, or the error it raises."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.jsonl"
        path.write_bytes(data)
        try:
            frame = read_predictions(path)
        except (LostregError, ValueError, RecursionError, OverflowError) as exc:
            return "error", type(exc).__name__
    return "ok", frame


def _agree(data: bytes) -> None:
    fast = box_columns(data)
    if fast is None:
        return
    outcome, frame = _slow(data)
    assert outcome == "ok", f"fast path accepted what the line reader refuses: {data!r}"
    assert fast["image_id"] == frame["image_id"].tolist()
    assert np.array_equal(fast["hit"], frame["hit"].to_numpy(dtype=bool))
    assert np.array_equal(fast["best_iou"], frame["best_iou"].to_numpy())


@pytest.fixture(scope="module")
def good_lines() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        run = write_run(Path(tmp), "r", [True, False, True, False, True])
        return (run / "predictions.jsonl").read_bytes()


def test_a_good_file_reads_the_same_both_ways(good_lines: bytes) -> None:
    assert box_columns(good_lines) is not None
    _agree(good_lines)
    _agree(good_lines.replace(b"\n", b"\r\n"))  # CR is JSON whitespace for both readers
    _agree(good_lines.rstrip(b"\n"))  # a last line without its line break


def _lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def _dump(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


CRAFTED = {
    # two objects on one line, one line fewer: the array has as many values as lines
    "two values on a line": lambda data: data.replace(b"}\n{", b"}, {", 1),
    # a value spanning two lines, each line starting with { and ending with }:
    # '{a}, {..."x": [{}' then '{}]}' parse as an array of as many objects as lines
    "a value across lines": lambda data: _dump(_lines(data)[:3])
    + json.dumps(_lines(data)[3])[:-1].encode() + b', "x": [{}\n{}]}\n',
    "an empty line": lambda data: data.replace(b"\n", b"\n\n", 1),
    "a trailing comma": lambda data: data.replace(b"}\n", b"},\n", 1),
    "a byte order mark": lambda data: b"\xef\xbb\xbf" + data,
    "a huge integer": lambda data: data.replace(b'"width": 100', b'"width": 1' + b"0" * 400, 1),
    "a huge box corner": lambda data: data.replace(b'"box": [12', b'"box": [1' + b"0" * 400, 1),
    "a bool width": lambda data: data.replace(b'"width": 100', b'"width": true', 1),
    "an empty file name": lambda data: data.replace(b'"file": "JPEGImages/000000.jpg"',
                                                    b'"file": ""', 1),
    "no file": lambda data: data.replace(b'"file": "JPEGImages/000000.jpg", ', b"", 1),
    "a null file": lambda data: data.replace(b'"file": "JPEGImages/000000.jpg"',
                                             b'"file": null', 1),
    "a NaN IoU": lambda data: data.replace(b'"best_iou": 0.', b'"best_iou": NaN, "x": 0.', 1),
    "an escaped quote in an id": lambda data: data.replace(b'"000001"', b'"0\\"1"', 1),
    "a deep line": lambda data: data.replace(b'"seed": [1, 1]', b'"seed": ' + b"[" * 200
                                             + b"]" * 200, 1),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_files_never_pass_the_fast_path_alone(good_lines: bytes, case: str) -> None:
    data = CRAFTED[case](good_lines)
    assert data != good_lines
    _agree(data)


def test_a_value_across_lines_is_refused_before_parsing(good_lines: bytes) -> None:
    data = CRAFTED["a value across lines"](good_lines)
    assert not one_value_per_line(data) and box_columns(data) is None
    assert _slow(data)[0] == "error"
    assert one_value_per_line(good_lines)


INSERTS = [b"{", b"}", b"[", b"]", b",", b'"', b"\\", b"\n", b", {}", b'{"a": [1', b"]}",
           b"NaN", b"1e999", b"true", b"-", b" ", b"\r", b"\x00", b"\xff"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                st.sampled_from(["insert", "delete", "replace"]),
                                st.sampled_from(INSERTS)), min_size=1, max_size=3))
def test_any_edit_reads_the_same_or_goes_to_the_line_reader(good_lines: bytes, edits) -> None:
    data = bytearray(good_lines)
    for where, how, text in edits:
        at = int(where * len(data))
        if how == "insert":
            data[at:at] = text
        elif how == "delete":
            del data[at:at + len(text)]
        else:
            data[at:at + len(text)] = text
    _agree(bytes(data))


@pytest.mark.parametrize(("case", "damage", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_summary_of_a_damaged_folder_fails_with_load_run_s_line(tmp_path: Path, case: str,
                                                                   damage, reason) -> None:
    run = write_run(tmp_path, "r", [True, False])
    damage(run)
    with pytest.raises(LostregError) as plain:
        load_run(run)
    store = summaries.SummaryStore(tmp_path, None)
    with pytest.raises(LostregError) as fast:
        summaries.load_summary(run, store)
    assert str(fast.value) == str(plain.value)

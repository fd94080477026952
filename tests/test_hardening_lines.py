"""Prediction lines a hostile or broken file may hold, read by both readers of a run folder
(issue 20 row 4 and its variants): the validated reader of a run (``runs.predictions``, which
quarantines a bad line and recomputes its image) and the reports' reader (``runs.store``, one
line naming the file and line). Neither may die with a RecursionError or OverflowError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lostreg.errors import LostregError
from lostreg.runs.predictions import Expected, _Reading
from lostreg.runs.store import read_predictions

DEEP = b"[" * 200_000 + b"]" * 200_000
GOOD = {"image_id": "a", "file": "a.jpg", "width": 20, "height": 10, "box": [0, 0, 10, 5],
        "seed": [0, 0], "gt_boxes": [[0.0, 0.0, 10.0, 5.0]], "best_iou": 1.0, "hit": True}


def _file(tmp_path: Path, second: bytes) -> Path:
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + second + b"\n")
    return path


@pytest.mark.parametrize("second", [
    DEEP,
    b'{"image_id": "b", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
])
def test_a_deep_line_is_one_line_for_the_reports(tmp_path: Path, second: bytes) -> None:
    path = _file(tmp_path, second)
    with pytest.raises(LostregError, match=rf"^{path}:2: not valid JSON \(nested more than"):
        read_predictions(path)


@pytest.mark.parametrize("key", ["width", "height"])
def test_a_huge_integer_is_one_line_for_the_reports(tmp_path: Path, key: str) -> None:
    line = dict(GOOD, image_id="b", **{key: 10 ** 400})
    path = _file(tmp_path, json.dumps(line).encode())
    with pytest.raises(LostregError, match=rf"^{path}:2: "):
        read_predictions(path)


def test_a_huge_box_coordinate_is_one_line_for_the_reports(tmp_path: Path) -> None:
    line = dict(GOOD, image_id="b", box=[0, 0, 10 ** 400, 5])
    path = _file(tmp_path, json.dumps(line).encode())
    with pytest.raises(LostregError, match=rf"^{path}:2: "):
        read_predictions(path)


def test_a_deep_line_is_a_bad_line_for_the_run(tmp_path: Path) -> None:
    """The run's reader keeps reading: the deep line is a problem of kind ``bad`` (quarantined
    and its image recomputed by the run), the good line is kept."""
    path = _file(tmp_path, DEEP)
    reading = _Reading(Expected.of(None))
    for number, raw in enumerate(path.read_bytes().split(b"\n")[:2], start=1):
        reading.add(path, number, raw)
    assert [(p.line, p.kind) for p in reading.problems] == [(2, "bad")]
    assert "nested more than" in reading.problems[0].reason

"""The leaderboard skips what it cannot read (one line per folder, with the reason) and builds
the rest; wrong types are reported the same way, never as a traceback (issue 14)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from run_folders import MISS_BOX, edit_json, edit_line, write_run

from lostreg.errors import LostregError
from lostreg.reports import leaderboard as lb


def _config(key, value):
    return lambda run: edit_json(run / "config.json", **{key: value})


def _metrics(key, value):
    return lambda run: edit_json(run / "metrics.json", **{key: value})


def _line(**changes):
    return lambda run: edit_line(run / "predictions.jsonl", 2, **changes)


def _drop_from_line(key):
    def damage(run: Path) -> None:
        path = run / "predictions.jsonl"
        lines = path.read_text().splitlines()
        record = json.loads(lines[1])
        del record[key]
        lines[1] = json.dumps(record)
        path.write_text("\n".join(lines) + "\n")
    return damage


def _write(name: str, text: str):
    return lambda run: (run / name).write_text(text)


def _append(text: str):
    def damage(run: Path) -> None:
        with open(run / "predictions.jsonl", "a") as handle:
            handle.write(text)
    return damage


def _duplicate_line(run: Path) -> None:
    path = run / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[0]]) + "\n")


# (case, damage, what the skip line must say)
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("metrics not JSON", _write("metrics.json", "{not json"), r"metrics.json: not readable JSON"),
    ("metrics an array", _write("metrics.json", "[1, 2]"), r"metrics.json: expected a JSON object"),
    ("config missing", lambda run: (run / "config.json").unlink(), r"config.json: missing"),
    ("predictions missing", lambda run: (run / "predictions.jsonl").unlink(),
     r"predictions.jsonl: missing"),
    ("n_images a string", _metrics("n_images", "abc"),
     r"metrics.json: 'n_images' must be a whole number >= 0, not 'abc'"),
    ("n_hits a float", _metrics("n_hits", 1.5), r"'n_hits' must be a whole number"),
    ("n_hits disagrees", _metrics("n_hits", 0), r"predictions.jsonl: 1/2 hits/images but"),
    ("finished not a date", _metrics("finished", "yesterday"), r"'finished' is not an ISO"),
    ("finished a number", _metrics("finished", 5), r"'finished' must be a non-empty string"),
    ("seconds a string", _metrics("seconds", {"total": "1.5"}), r"'total' must be a finite"),
    ("metrics of another run", _metrics("run_id", "other"),
     r"'run_id' is 'other' but config.json says 'r'"),
    ("smoke_run a string", _metrics("smoke_run", "false"), r"'smoke_run' must be true or false"),
    ("num_registers a string", _config("num_registers", "4"),
     r"config.json: 'num_registers' must be a whole number >= 0, not '4'"),
    ("no_hard a string", _config("no_hard", "no"), r"'no_hard' must be true or false"),
    ("gram_bias a string", _config("method_params", {"k_patches": 100, "gram_bias": "0"}),
     r"'gram_bias' must be a finite number, not '0'"),
    ("method_params a list", _config("method_params", [100, 0]),
     r"'method_params' must be a JSON object"),
    ("method_params nested", _config("method_params", {"k_patches": 100, "gram_bias": 0,
                                                       "x": {"y": 1}}),
     r"'method_params.x' must be a string, number"),
    ("layer a string", _config("layer", "-1"), r"'layer' must be a whole number"),
    ("layer true", _config("layer", True), r"'layer' must be a whole number, not True"),
    ("identity a list", _config("identity", []), r"'identity' must be a JSON object"),
    ("limit a string", _config("identity", {"limit": "5"}), r"'limit' must be a whole number"),
    ("weights a list", _config("weights", ["hub"]), r"'weights' must be a JSON object"),
    ("hit a string", _line(hit="false"), r"predictions.jsonl:2: 'hit' must be true or false"),
    ("hit without its box", _line(hit=True, box=MISS_BOX, best_iou=0.9),
     r"predictions.jsonl:2: 'hit' is true but the box's best IoU .* is 0.0000"),
    ("line without hit", _drop_from_line("hit"), r"predictions.jsonl:2: missing key 'hit'"),
    ("width a string", _line(width="100"), r"'width' must be a whole number >= 1"),
    # NaN is not JSON (issue 20 row 11): the line is refused before its fields are read
    ("box with NaN", _line(box=[1, 2, float("nan"), 4]), r"not valid JSON \(NaN is not JSON"),
    ("inverted box", _line(box=[50, 2, 10, 4]), r"'box' must be \[x1, y1, x2, y2\]"),
    ("inverted GT box", _line(gt_boxes=[[60, 50, 10, 10]]), r"'gt_boxes' must be a list"),
    ("image_id a number", _line(image_id=7), r"'image_id' must be a non-empty string"),
    ("garbage line", _append("#$%garbage\n"), r"predictions.jsonl:3: not valid JSON"),
    ("a line not an object", _append("[1]\n"), r"predictions.jsonl:3: not a JSON object"),
    ("duplicated line", _duplicate_line, r"predictions.jsonl:3: image_id '000000' appears more"),
]


@pytest.mark.parametrize(("case", "damage", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_damaged_folder_is_skipped_with_its_reason_and_the_rest_is_built(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
        damage: Callable[[Path], None], reason: str) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_run(runs, "good", [True, True, False])
    damage(write_run(runs, "r", [False, True], dataset="voc12"))
    assert lb.main(["--runs", str(runs), "--out", str(out)]) == 0, case
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"skipped {runs / 'r'}: "), lines[0]
    assert pd.Series(lines).str.contains(reason).all(), (reason, lines[0])
    assert "skipped 1 unreadable run folder(s)" in captured.out
    assert list(pd.read_csv(out / "leaderboard.csv")["run_id"]) == ["good"]


def test_every_damaged_folder_gets_its_own_line(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "good", [True])
    for index, (_, damage, _) in enumerate(CASES[:5]):
        damage(write_run(runs, f"bad{index}", [True, False]))
    lines: list[str] = []
    board = lb.collect(runs, report=lines.append)
    assert [run.run_id for run in board.runs] == ["good"]
    assert lines == board.skipped and len(lines) == 5
    assert [line.split(":")[0] for line in lines] == [f"skipped {runs / f'bad{i}'}"
                                                      for i in range(5)]


def test_a_good_folder_reads_cleanly(tmp_path: Path) -> None:
    """The control for the cases above: the undamaged folder is read, with nothing skipped."""
    lines: list[str] = []
    board = lb.collect(write_run(tmp_path / "runs", "r", [False, True]).parent,
                       report=lines.append)
    assert [run.run_id for run in board.runs] == ["r"] and lines == []


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6)
CONFIG_KEYS = ["identity", "model", "timm_name", "family", "num_registers", "dataset", "split",
               "no_hard", "feature", "precision", "weights", "method", "method_params", "layer",
               "normalize", "pos_interp", "test_time_registers", "k_patches", "gram_bias",
               "num_params", "patch_size", "device_name", "git_commit", "smoke_run"]
METRICS_KEYS = ["n_images", "n_hits", "finished", "seconds", "run_id", "smoke_run", "weights",
                "model", "dataset", "feature", "method_params", "layer"]
LINE_KEYS = ["image_id", "width", "height", "box", "gt_boxes", "best_iou", "hit", "file"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(["config", "metrics", "line"]), index=st.integers(0, 100),
       value=JSON_VALUES, legacy=st.booleans())
def test_any_wrong_value_is_a_one_line_error_or_accepted(where: str, index: int, value,
                                                         legacy: bool) -> None:
    """Whatever JSON value replaces whichever key, reading the folder either works (and then
    the hits agree with metrics.json) or raises LostregError: never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        run = write_run(Path(folder), "r", [True, False, True], legacy=legacy)
        if where == "config":
            edit_json(run / "config.json", **{CONFIG_KEYS[index % len(CONFIG_KEYS)]: value})
        elif where == "metrics":
            edit_json(run / "metrics.json", **{METRICS_KEYS[index % len(METRICS_KEYS)]: value})
        else:
            edit_line(run / "predictions.jsonl", 1 + index % 3,
                      **{LINE_KEYS[index % len(LINE_KEYS)]: value})
        try:
            loaded = lb.load_run(run)
        except LostregError as exc:
            assert "\n" not in str(exc) and str(run) in str(exc)
            return
        assert int(loaded.predictions["hit"].sum()) == loaded.metrics["n_hits"]
        assert all(math.isfinite(v) for v in loaded.predictions["best_iou"])
        lb.leaderboard_row(loaded)  # and the row it gives can be built


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads files without permission")
def test_an_unreadable_file_is_skipped(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "good", [True])
    bad = write_run(runs, "bad", [True])
    (bad / "predictions.jsonl").chmod(0)
    lines: list[str] = []
    assert [run.run_id for run in lb.collect(runs, report=lines.append).runs] == ["good"]
    assert len(lines) == 1 and "predictions.jsonl: cannot read" in lines[0]


def _box(draw_values) -> list[float]:
    x1, y1, w, h = draw_values
    return [x1, y1, x1 + w, y1 + h]


COORD = st.integers(0, 60).map(float) | st.floats(0, 60, allow_nan=False)
SIDE = st.integers(0, 40).map(float) | st.floats(0, 40, allow_nan=False)
BOXES = st.tuples(COORD, COORD, SIDE, SIDE).map(_box)


@settings(max_examples=200, deadline=None)
@given(images=st.lists(st.tuples(BOXES, st.lists(BOXES, max_size=4)), max_size=12))
def test_batched_iou_equals_the_per_image_metric_to_the_bit(images) -> None:
    """The leaderboard's batched recomputation against lostreg.evaluation.iou.best_iou, image by
    image (integer and float corners, touching and zero-area boxes, images without GT)."""
    from lostreg.evaluation.iou import best_iou, best_ious

    boxes = np.array([box for box, _ in images], dtype=np.float64).reshape(-1, 4)
    gts = np.array([gt for _, gt_list in images for gt in gt_list],
                   dtype=np.float64).reshape(-1, 4)
    counts = np.array([len(gt_list) for _, gt_list in images], dtype=np.int64)
    batched = best_ious(boxes, gts, counts)
    expected = [best_iou(box, gt_list) if gt_list else 0.0 for box, gt_list in images]
    assert batched.tolist() == expected


def test_an_iou_of_exactly_one_half_is_a_hit(tmp_path: Path) -> None:
    """[0,0,10,10] against [0,0,20,10]: IoU 100/200 = 0.5 exactly, a hit (CorLoc's >=)."""
    run = write_run(tmp_path, "r", [True])
    edit_line(run / "predictions.jsonl", 1, box=[0, 0, 10, 10], gt_boxes=[[0, 0, 20, 10]],
              best_iou=0.5, hit=True)
    predictions = lb.load_run(run).predictions
    assert predictions["best_iou"].tolist() == [0.5] and predictions["hit"].tolist() == [True]
    edit_line(run / "predictions.jsonl", 1, hit=False)
    with pytest.raises(LostregError, match=r"predictions.jsonl:1: 'hit' is false but .* 0.5000"):
        lb.load_run(run)


def test_ctrl_c_during_a_build_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys) -> None:
    from lostreg.reports import leaderboard as board

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(board, "build", interrupted)
    assert board.main(["--runs", str(tmp_path), "--output", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted:"), err

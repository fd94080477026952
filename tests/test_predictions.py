"""Predictions read back: validated line by line, hit/best_iou recomputed, bad lines
quarantined (only their images recomputed), lines of another run refused by file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets.base import ImageRecord
from lostreg.errors import LostregError
from lostreg.run import main
from lostreg.runs import distributed
from lostreg.runs.predictions import (
    PREDICTIONS,
    QUARANTINE,
    LineProblem,
    evaluate_lines,
    load_predictions,
    merge_predictions,
    prediction_line,
    quarantine,
    schema_problem,
)

ROOT = Path("/data/voc")
RECORDS = [ImageRecord(f"img{i}", ROOT / "JPEGImages" / f"img{i}.jpg", 100, 80,
                       ((10.0, 10.0, 50.0, 40.0), (60.0, 0.0, 100.0, 30.0)))
           for i in range(4)]
HIT_BOX = [10, 10, 50, 40]  # IoU 1 with the first GT box
MISS_BOX = [0, 50, 20, 80]  # IoU 0


def line(i: int, box=HIT_BOX, **changes) -> dict:
    return {**prediction_line(RECORDS[i], box, (1, 2), ROOT, smoke=True), **changes}


def dumps(*lines: dict) -> str:
    return "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the line format -----------------------------------------------------------------------


def test_prediction_line_passes_its_own_schema() -> None:
    """The runs write their lines with ``prediction_line``; each passes the validator."""
    for box in (HIT_BOX, MISS_BOX, [0, 0, 100, 80]):
        ours = prediction_line(RECORDS[1], box, (3, 4), ROOT, smoke=False)
        assert schema_problem(ours) is None
    assert prediction_line(RECORDS[0], HIT_BOX, None, ROOT, True)["seed"] is None


@pytest.mark.parametrize("change, reason", [
    ({"hit": "false"}, "hit: expected true or false"),
    ({"hit": 1}, "hit: expected true or false"),
    ({"best_iou": "0.5"}, "best_iou: expected a number"),
    ({"best_iou": float("nan")}, "best_iou: expected a number"),
    ({"width": True}, "width: expected a positive integer"),
    ({"height": 0}, "height: expected a positive integer"),
    ({"box": [1, 2, 3]}, "box: expected 4 integers"),
    ({"box": [1.5, 2, 3, 4]}, "box: expected 4 integers"),
    ({"box": [60, 10, 50, 40]}, "is not inside its 100x80 image"),
    ({"box": [0, 0, 101, 80]}, "is not inside its 100x80 image"),
    ({"seed": [1, -2]}, "seed: expected null or [row, col]"),
    ({"seed": "3,4"}, "seed: expected null or [row, col]"),
    ({"gt_boxes": [[1, 2, 3]]}, "gt_boxes: expected a list of"),
    ({"image_id": 7}, "image_id: expected a non-empty string"),
    ({"file": ""}, "file: expected a non-empty string"),
    ({"weights": "hub"}, "weights: expected"),
    ({"score": 1.0}, "unknown key score"),
])
def test_schema_names_what_is_wrong(change, reason) -> None:
    assert reason in schema_problem({**line(0), **change})


def test_a_missing_key_and_a_non_object_are_named() -> None:
    no_hit = line(0)
    del no_hit["hit"]
    assert schema_problem(no_hit) == "missing hit"
    assert schema_problem([1, 2]) == "expected a JSON object, got list"


@st.composite
def image_and_box(draw):
    """A record with 0-3 GT boxes (COCO-like floats or VOC-like integers) and a box inside it."""
    width, height = draw(st.integers(1, 600)), draw(st.integers(1, 600))

    def box(as_float: bool):
        x1, x2 = sorted(draw(st.integers(0, width)) for _ in range(2))
        y1, y2 = sorted(draw(st.integers(0, height)) for _ in range(2))
        return tuple(float(v) + (0.25 if as_float and v else 0.0) for v in (x1, y1, x2, y2))

    gts = tuple(box(draw(st.booleans())) for _ in range(draw(st.integers(0, 3))))
    record = ImageRecord("img", ROOT / "img.jpg", width, height, gts)
    return record, [int(v) for v in box(False)]


@settings(max_examples=200, deadline=None)
@given(image_and_box(), st.booleans())
def test_every_line_the_writer_makes_reads_back_unchanged(tmp_path_factory, case, smoke) -> None:
    """Writer and validator agree on every convention (types, rounding of best_iou, the hit
    threshold): a line run writes is valid and never "corrected"."""
    record, box = case
    written = prediction_line(record, box, (0, 1), ROOT, smoke)
    assert schema_problem(written) is None
    folder = tmp_path_factory.mktemp("run")
    write(folder / PREDICTIONS, dumps(written))
    loaded = load_predictions(folder, [record], root=ROOT, repair=False)
    assert loaded.problems == [] and loaded.lines == {"img": json.loads(dumps(written))}


def test_the_distributed_helpers_validate_with_records_or_ids(tmp_path) -> None:
    write(tmp_path / PREDICTIONS, dumps(line(0), line(3)) + "garbage\n")
    assert distributed.done_ids(tmp_path, RECORDS, ROOT) == {"img0", "img3"}
    write(distributed.part_path(tmp_path, 0), dumps(line(1, image_id="stranger")))
    with pytest.raises(LostregError, match="predictions.rank0.jsonl:1: image 'stranger'"):
        distributed.merge_predictions(tmp_path, [r.image_id for r in RECORDS])


# --- reading a run folder ------------------------------------------------------------------


def test_bad_lines_are_quarantined_and_only_their_images_missing(tmp_path, capsys) -> None:
    no_hit = line(2)
    del no_hit["hit"]
    text = dumps(line(0), line(1, hit="false")) + "{garbage\n" + dumps(no_hit, line(3))
    path = write(tmp_path / PREDICTIONS, text)
    loaded = load_predictions(tmp_path, RECORDS, root=ROOT)
    assert sorted(loaded.lines) == ["img0", "img3"]  # img1, img2 and the garbage: recomputed
    bad = loaded.of_kind("bad")
    assert [(p.line, p.image_id) for p in bad] == [(2, "img1"), (3, None), (4, "img2")]
    assert "hit: expected true or false" in bad[0].reason and "not JSON" in bad[1].reason
    assert path.read_text() == dumps(line(0), line(3))  # moved out of the file...
    quarantined = [json.loads(x) for x in (tmp_path / QUARANTINE).read_text().splitlines()]
    assert [(q["source"], q["line"]) for q in quarantined] == [(PREDICTIONS, 2),
                                                               (PREDICTIONS, 3),
                                                               (PREDICTIONS, 4)]
    assert quarantined[1]["text"] == "{garbage"  # ...into the quarantine, with the reason
    assert "missing hit" in quarantined[2]["reason"]
    assert capsys.readouterr().err.count("warning:") == 1
    again = load_predictions(tmp_path, RECORDS, root=ROOT)  # now clean
    assert again.problems == [] and sorted(again.lines) == ["img0", "img3"]


def test_hit_and_best_iou_are_recomputed_never_read(tmp_path) -> None:
    forged = line(0, MISS_BOX, hit=True, best_iou=0.93)
    write(tmp_path / PREDICTIONS, dumps(forged, line(1)))
    loaded = load_predictions(tmp_path, RECORDS, repair=False)
    assert loaded.lines["img0"]["hit"] is False and loaded.lines["img0"]["best_iou"] == 0.0
    assert [p.kind for p in loaded.problems] == ["corrected"]
    assert evaluate_lines(loaded.lines, RECORDS[:2]) == {"corloc": 50.0, "n_hits": 1, "n_images": 2}
    # without the dataset nothing can be recomputed: only the types are checked
    assert load_predictions(tmp_path, None, repair=False).lines["img0"]["hit"] is True


def test_identical_duplicates_are_dropped(tmp_path) -> None:
    write(tmp_path / PREDICTIONS, dumps(line(0), line(1), line(0)))
    # a kill between the merge and the removal of the parts leaves the same line twice
    write(distributed.part_path(tmp_path, 1), dumps(line(1), line(2)))
    loaded = load_predictions(tmp_path, RECORDS)
    assert sorted(loaded.lines) == ["img0", "img1", "img2"]
    assert [(p.path.name, p.line) for p in loaded.of_kind("duplicate")] == [
        (PREDICTIONS, 3), ("predictions.rank1.jsonl", 1)]
    assert (tmp_path / PREDICTIONS).read_text() == dumps(line(0), line(1))
    assert not (tmp_path / QUARANTINE).exists()
    merged = merge_predictions(tmp_path, RECORDS[:3], root=ROOT)
    assert merged == [line(0), line(1), line(2)] and distributed.part_files(tmp_path) == []
    assert (tmp_path / PREDICTIONS).read_text() == dumps(*merged)


def test_a_conflicting_duplicate_is_an_error_naming_both_lines(tmp_path) -> None:
    text = dumps(line(0), line(1))
    write(tmp_path / PREDICTIONS, text)
    write(distributed.part_path(tmp_path, 0), dumps(line(1, MISS_BOX), line(2)))
    with pytest.raises(LostregError) as caught:
        load_predictions(tmp_path, RECORDS)
    message = str(caught.value)
    assert f"{tmp_path / 'predictions.rank0.jsonl'}:1: image 'img1'" in message
    assert f"than {tmp_path / PREDICTIONS}:2" in message
    assert (tmp_path / PREDICTIONS).read_text() == text  # nothing changed


@pytest.mark.parametrize("foreign, why", [
    (line(0, image_id="other7"), "image 'other7' is not an image of this run"),
    (line(0, gt_boxes=[[0, 0, 5, 5]]), "image 'img0' has other gt_boxes than the dataset's"),
    (line(0, file="JPEGImages/elsewhere.jpg"), "image 'img0' has file 'JPEGImages/elsewhere"),
])
def test_a_line_of_another_run_is_an_error_naming_it(tmp_path, foreign, why) -> None:
    write(tmp_path / PREDICTIONS, dumps(line(1), line(2), foreign))
    with pytest.raises(LostregError, match="another run") as caught:
        load_predictions(tmp_path, RECORDS, root=ROOT)
    assert str(caught.value).startswith(f"{tmp_path / PREDICTIONS}:3: {why}")


def test_a_torn_last_line_is_left_out_not_quarantined(tmp_path) -> None:
    write(tmp_path / PREDICTIONS, dumps(line(0)) + dumps(line(1))[:30])
    loaded = load_predictions(tmp_path, RECORDS)
    assert list(loaded.lines) == ["img0"] and loaded.problems == []
    assert not (tmp_path / QUARANTINE).exists()


def test_reading_without_repair_changes_nothing(tmp_path) -> None:
    text = dumps(line(0), line(0)) + "garbage\n"
    write(tmp_path / PREDICTIONS, text)
    loaded = load_predictions(tmp_path, RECORDS, repair=False)
    assert list(loaded.lines) == ["img0"] and len(loaded.problems) == 2
    assert (tmp_path / PREDICTIONS).read_text() == text and not (tmp_path / QUARANTINE).exists()


def test_quarantine_adds_a_line_once(tmp_path) -> None:
    """A kill between the quarantine append and the rewrite quarantines the line again."""
    problem = LineProblem(tmp_path / PREDICTIONS, 4, "bad", "not JSON", "{x")
    quarantine(tmp_path / QUARANTINE, [problem])
    quarantine(tmp_path / QUARANTINE, [problem])
    assert len((tmp_path / QUARANTINE).read_text().splitlines()) == 1


def test_merging_a_merged_run_rewrites_nothing(tmp_path) -> None:
    path = write(tmp_path / PREDICTIONS, dumps(line(0), line(1)))
    before = path.stat()
    assert merge_predictions(tmp_path, RECORDS[:2], root=ROOT) == [line(0), line(1)]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(LostregError, match="2 predictions missing .*first: img2"):
        merge_predictions(tmp_path, RECORDS, root=ROOT)


def test_corloc_counts_every_image_of_the_run() -> None:
    lines = {"img0": line(0), "img1": line(1, MISS_BOX)}
    assert evaluate_lines(lines, RECORDS[:2]) == {"corloc": 50.0, "n_hits": 1, "n_images": 2}
    with pytest.raises(LostregError, match="2 images have no prediction"):
        evaluate_lines(lines, RECORDS)


# --- through lostreg.run ---------------------------------------------------------------------

TINY = BackboneSpec("tiny_pred", "vit_small_patch16_224.dino", "dino", 16, 0, pos_embed="dino",
                    model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))
LIMIT = 6


@pytest.fixture
def finished_run(tmp_path, capsys):
    """A finished run: (its folder, a function rerunning it, its predictions lines, the
    summary line it printed)."""
    BACKBONES[TINY.name] = TINY
    argv = ["--model", TINY.name, "--weights", "random", "--dataset", "demo",
            "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
            "--num-workers", "0", "--no-progress", "--limit", str(LIMIT)]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    lines = (run_dir / PREDICTIONS).read_text().splitlines(keepends=True)
    yield run_dir, lambda: main(argv), lines, summary(capsys)
    BACKBONES.pop(TINY.name, None)


def summary(capsys) -> str:
    """The score part of the run's last line (what follows ``|`` says what the command did)."""
    (printed,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("CorLoc")]
    return printed.split(" | ")[0]


@pytest.mark.usefixtures("one_thread")
def test_a_duplicated_line_does_not_count_twice(finished_run, capsys) -> None:
    run_dir, rerun, lines, first = finished_run
    (run_dir / PREDICTIONS).write_text("".join(lines + lines[2:3]))
    assert rerun() == 0
    assert summary(capsys) == first and f"/{LIMIT})" in first
    assert (run_dir / PREDICTIONS).read_text() == "".join(lines)


@pytest.mark.usefixtures("one_thread")
def test_damaged_lines_are_quarantined_and_recomputed(finished_run, capsys) -> None:
    run_dir, rerun, lines, first = finished_run
    damaged = list(lines)
    as_string = json.loads(lines[1])
    as_string["hit"] = str(as_string["hit"]).lower()  # "false" was counted as a hit
    no_hit = json.loads(lines[3])
    del no_hit["hit"]  # was a KeyError traceback
    damaged[1], damaged[3] = dumps(as_string), dumps(no_hit)
    damaged[4] = "garbage\n"  # was: every line thrown away
    (run_dir / PREDICTIONS).write_text("".join(damaged))
    assert rerun() == 0
    assert summary(capsys) == first
    assert (run_dir / PREDICTIONS).read_text() == "".join(lines)
    assert len((run_dir / QUARANTINE).read_text().splitlines()) == 3
    computed = json.loads((run_dir / "metrics.json").read_text())["seconds"]
    assert computed["images_computed"] == 3  # only the damaged images


@pytest.mark.usefixtures("one_thread")
def test_a_line_of_another_run_stops_the_merge(finished_run, capsys) -> None:
    run_dir, rerun, lines, _ = finished_run
    stranger = {**json.loads(lines[0]), "image_id": "not_in_this_run"}
    (run_dir / PREDICTIONS).write_text("".join(lines) + dumps(stranger))
    (run_dir / "metrics.json").unlink()
    capsys.readouterr()
    assert rerun() == 2
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("warning: SMOKE")]
    assert err == [f"error: {run_dir / PREDICTIONS}:{LIMIT + 1}: image 'not_in_this_run' is "
                   "not an image of this run; this run folder holds lines of another run: "
                   "move it away or use another --output"]

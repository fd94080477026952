"""Mask runs read through summaries (issue 19 item, issue 20 "Load"): a mask run's lines are
read once per content of its files, the stored table is the very table its lines give, a
changed run is read again, and a damaged or forged summary is never trusted."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from mask_run_folders import REG, write_mask_run
from run_folders import edit_json

from lostreg.reports.leaderboard import saliency_runs
from lostreg.reports.leaderboard.saliency_runs import load_mask_run, scan_mask_runs
from lostreg.runs import summaries

SHIFTS = [(i % 5) - 2 for i in range(12)]


class Reads:
    """Counts the mask runs whose lines were read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs: list[str] = []
        real = saliency_runs._read_images

        def counting(path: Path, data: bytes | None = None) -> pd.DataFrame:
            self.runs.append(path.parent.name)
            return real(path, data)

        monkeypatch.setattr(saliency_runs, "_read_images", counting)

    def scan(self, runs: Path) -> dict[str, pd.DataFrame]:
        self.runs = []
        return {run.run_id: run.images for run in scan_mask_runs(runs).runs}


def _runs(root: Path) -> Path:
    write_mask_run(root, "mask", SHIFTS, empty_images=2)
    reg = write_mask_run(root, "mask-reg", [0] * 12, **REG)
    lines = [json.loads(line) for line in (reg / "predictions.jsonl").read_text().splitlines()]
    for line in lines[::2]:
        del line["file"]  # optional: a missing file is NA in the table, and so when stored
    (reg / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_a_mask_run_is_read_once_per_content_and_gives_the_same_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads, runs = Reads(monkeypatch), _runs(tmp_path / "runs")
    first = reads.scan(runs)
    assert sorted(reads.runs) == ["mask", "mask-reg"]
    again = reads.scan(runs)
    assert reads.runs == []  # every table from its summary
    for run_id, images in first.items():
        pd.testing.assert_frame_equal(again[run_id], images)  # values, dtypes, NaN, order
        pd.testing.assert_frame_equal(again[run_id], load_mask_run(runs / run_id).images)
    # a changed run (here its metrics.json) is read again, the other is not
    edit_json(runs / "mask" / "metrics.json", seconds={"total": 5.0})
    reads.scan(runs)
    assert reads.runs == ["mask"]
    reads.scan(runs)
    assert reads.runs == []


def _edit_stored(runs: Path, change) -> None:
    path = runs / summaries.STORE_FOLDER / "mask.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _forge(data: dict, column: str, value) -> None:
    """Change a stored column and recompute the digest: only the checks can tell."""
    data["images"][column][0] = value
    data.pop("digest")
    data["digest"] = summaries.payload_digest(data)


DAMAGE = {
    "digest": lambda data: data["images"]["width"].__setitem__(0, 31),
    "format": lambda data: data.__setitem__("format", "other/1"),
    "forged width type": lambda data: _forge(data, "width", True),
    "forged id": lambda data: _forge(data, "image_id", ""),
    "forged file": lambda data: _forge(data, "file", 7),
    "forged IoU": lambda data: _forge_float(data, "sal_iou", 5, 0.999),  # metrics.json differs
    "forged 0/0 IoU": lambda data: _forge_float(data, "sal_iou", 0, 1.0),  # was NaN
    "forged vector": lambda data: (data["images"].__setitem__("sal_acc", "%%%"),
                                   _forge_digest(data)),
    "not a table": lambda data: (data.__setitem__("images", []), _forge_digest(data)),
}


def _forge_digest(data: dict) -> None:
    data.pop("digest")
    data["digest"] = summaries.payload_digest(data)


def _forge_float(data: dict, column: str, index: int, value: float) -> None:
    values = summaries.decode_vector(data["images"][column], "float", data["n_images"]).copy()
    values[index] = value
    data["images"][column] = summaries.encode_vector(values, "float")
    _forge_digest(data)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_or_forged_mask_summary_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    reads, runs = Reads(monkeypatch), _runs(tmp_path / "runs")
    first = reads.scan(runs)
    _edit_stored(runs, DAMAGE[damage])
    again = reads.scan(runs)
    assert reads.runs == ["mask"], damage
    pd.testing.assert_frame_equal(again["mask"], first["mask"])
    reads.scan(runs)
    assert reads.runs == []  # stored again, trusted again


def test_a_mask_summary_is_no_box_summary_and_the_box_reader_ignores_it(tmp_path: Path) -> None:
    runs = _runs(tmp_path / "runs")
    scan_mask_runs(runs)
    result, store = summaries.scan_summaries(runs, report=None)
    assert result.runs == [] and result.other_targets == 2
    assert (runs / summaries.STORE_FOLDER / "mask.json").is_file()  # not pruned


def test_a_run_skipped_for_its_metrics_stores_no_summary_and_none_is_rewritten(
        tmp_path: Path) -> None:
    """Review finding: the summary was stored before ``_run_means`` held the lines against
    metrics.json, so a skipped run had one, written anew (a new inode) by every build."""
    runs = _runs(tmp_path / "runs")
    edit_json(runs / "mask" / "metrics.json", acc=12.5)  # not what the lines give
    stored = runs / summaries.STORE_FOLDER
    lines: list[str] = []
    assert [run.run_id for run in scan_mask_runs(runs, report=lines.append).runs] == ["mask-reg"]
    assert len(lines) == 1 and "'acc' is 12.5" in lines[0], lines
    assert sorted(path.name for path in stored.iterdir()) == ["mask-reg.json"]
    before = (stored / "mask-reg.json").stat()
    assert len(scan_mask_runs(runs, report=lines.append).runs) == 1
    assert sorted(path.name for path in stored.iterdir()) == ["mask-reg.json"]
    after = (stored / "mask-reg.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


class PredictionOpens:
    """Counts every opening of a ``predictions.jsonl`` (``open`` however it is reached)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real_open, real_os_open = builtins.open, os.open

        def counted(path: object) -> None:
            if isinstance(path, (str, os.PathLike)) and Path(path).name == "predictions.jsonl":
                self.count += 1

        def opening(file, *args, **kwargs):
            counted(file)
            return real_open(file, *args, **kwargs)

        def os_opening(path, *args, **kwargs):
            counted(path)
            return real_os_open(path, *args, **kwargs)

        for module, name, patched in ((builtins, "open", opening), (io, "open", opening),
                                      (os, "open", os_opening)):
            monkeypatch.setattr(module, name, patched)


def test_a_cold_mask_run_reads_its_predictions_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: a cold run's predictions were read three times (hashed, hashed again,
    parsed) and a fourth to check they had not changed; now the hashed bytes are parsed."""
    runs = tmp_path / "runs"
    write_mask_run(runs, "mask", SHIFTS, empty_images=2)
    expected = load_mask_run(runs / "mask").images  # no store: read from the file
    opens = PredictionOpens(monkeypatch)
    images = scan_mask_runs(runs).runs[0].images
    assert opens.count == 1
    pd.testing.assert_frame_equal(images, expected)
    stored = json.loads((runs / summaries.STORE_FOLDER / "mask.json").read_text())
    data = (runs / "mask" / "predictions.jsonl").read_bytes()
    assert stored["files"]["predictions.jsonl"] == hashlib.sha256(data).hexdigest()
    opens.count = 0
    scan_mask_runs(runs)  # warm: known by its stat, or read once for its hash
    assert opens.count <= 1

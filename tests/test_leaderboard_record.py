"""The build record (``lostreg.reports.leaderboard.record``): a leaderboard whose runs,
options, published figures, code and outputs are all as the last build left them is not built
again, and anything else is: each change below must lead to a full build, and a rebuild must
leave the very bytes a cold build writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from run_folders import REG, edit_json, pair_hits, write_run

from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard import drawing, record
from lostreg.runs import summaries


@pytest.fixture
def quick_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """PNGs as a function of what they show, without drawing (the record's tests count
    builds, not pixels; ``test_a_rebuild_writes_nothing...`` draws for real)."""
    monkeypatch.setattr(drawing, "figure_png", lambda figure: b"figure")


def _runs(root: Path) -> Path:
    base, other = pair_hits(5, 2, 10, 3)
    write_run(root, "plain", base)
    write_run(root, "reg", other, **REG)
    return root


class Builds:
    """Counts the builds that collected the runs (a skipped build collects nothing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.collected = 0
        real = lb.collect

        def counting(*args, **kwargs):
            self.collected += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(lb, "collect", counting)

    def build(self, runs: Path, out: Path, **kwargs) -> bool:
        """Build; True when the runs were collected (a full build)."""
        before = self.collected
        lb.build(runs, out, report=None, **kwargs)
        return self.collected > before


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_rebuild_writes_nothing_and_leaves_a_cold_build_s_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = Builds(monkeypatch)
    runs, out = _runs(tmp_path / "runs"), tmp_path / "out"
    assert builds.build(runs, out)
    first = _stats(out)
    assert record.RECORD in first
    line = lb.summary_line(lb.build(runs, out, report=None), out)
    assert builds.collected == 1 and _stats(out) == first  # nothing read, nothing written
    assert line == lb.summary_line(lb.build_summary(lb.collect(runs, report=None)), out)
    cold_runs = tmp_path / "cold-runs"
    shutil.copytree(runs, cold_runs, ignore=shutil.ignore_patterns(summaries.STORE_FOLDER))
    assert builds.build(cold_runs, tmp_path / "cold")
    assert _files(out) == _files(tmp_path / "cold")  # the record included


def _touch_back(path: Path, text: str) -> None:
    """Rewrite a file with content of the same size and its old modification time."""
    stat = path.stat()
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _edit_predictions_in_place(runs: Path) -> None:
    path = runs / "plain" / "predictions.jsonl"
    text = path.read_text()
    _touch_back(path, text.replace('"seed": [1, 1]', '"seed": [2, 1]', 1))


CHANGES = {
    "metrics.json edited": lambda runs, out: edit_json(runs / "plain" / "metrics.json",
                                                       seconds={"total": 7.0}),
    "config.json edited": lambda runs, out: edit_json(runs / "plain" / "config.json",
                                                      created="2026-01-01T00:00:01+00:00"),
    "predictions edited, same size and time": lambda runs, out: _edit_predictions_in_place(runs),
    "a new run": lambda runs, out: write_run(runs, "alone", [True, False], dataset="voc12"),
    "a run removed": lambda runs, out: shutil.rmtree(runs / "reg"),
    "a new unfinished folder": lambda runs, out: (runs / "pending").mkdir(),
    "an output edited": lambda runs, out: (out / "comparison.md").write_text("edited"),
    "an output removed": lambda runs, out: (out / "leaderboard.csv").unlink(),
    "a figure linked": lambda runs, out: _link(out / "figures" / "iou" / "plain.svg"),
    "a stray figure": lambda runs, out: (out / "figures" / "iou" / "gone.svg").write_bytes(b"x"),
    "a figure of an older build": lambda runs, out: (out / "figures" / "iou" / "plain.png"
                                                     ).write_bytes(b"x"),
    "a stray mask overview": lambda runs, out: (out / "figures" / "saliency_iou.png"
                                               ).write_bytes(b"x"),
    "the record damaged": lambda runs, out: _edit_record(out),
    "the record linked": lambda runs, out: _link(out / record.RECORD),
}


def _link(path: Path) -> None:
    target = path.with_name("target" + path.suffix)
    shutil.copyfile(path, target)
    path.unlink()
    path.symlink_to(target)


def _edit_record(out: Path) -> None:
    path = out / record.RECORD
    data = json.loads(path.read_text())
    data["summary"]["runs"] = 99  # its digest no longer holds
    path.write_text(json.dumps(data))


@pytest.mark.usefixtures("quick_figures")
@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_builds_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 change: str) -> None:
    """Predictions files recorded by their stat (settled: not changed in the 2 s before the
    build, as a finished run's are)."""
    monkeypatch.setattr(record, "settled", lambda stat, before: True)
    builds = Builds(monkeypatch)
    runs, out = _runs(tmp_path / "runs"), tmp_path / "out"
    builds.build(runs, out)
    assert not builds.build(runs, out)
    CHANGES[change](runs, out)
    assert builds.build(runs, out), change
    assert not builds.build(runs, out), change  # recorded again
    assert lb.build(runs, out, report=None).runs == 2 + (change == "a new run") - (
        change == "a run removed")


@pytest.mark.usefixtures("quick_figures")
def test_a_just_written_predictions_file_is_recorded_by_its_hash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = Builds(monkeypatch)
    runs, out = _runs(tmp_path / "runs"), tmp_path / "out"
    builds.build(runs, out)
    entry = json.loads((out / record.RECORD).read_text())["inputs"]["runs"]["plain"]
    assert set(entry["predictions"]) == {"sha256"}  # written under 2 s ago: its stat proves
    assert not builds.build(runs, out)  # nothing yet, its hash does
    _edit_predictions_in_place(runs)
    assert builds.build(runs, out)


@pytest.mark.usefixtures("quick_figures")
def test_options_published_figures_and_code_are_inputs(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    builds = Builds(monkeypatch)
    runs, out = _runs(tmp_path / "runs"), tmp_path / "out"
    published = tmp_path / "published.csv"
    shutil.copyfile(lb.DEFAULT_PUBLISHED, published)
    builds.build(runs, out, published=published)
    assert not builds.build(runs, out, published=published)
    assert builds.build(runs, out)  # the default published file: another input
    assert builds.build(runs, out, include_smoke=True)
    assert not builds.build(runs, out, include_smoke=True)
    published.write_text("".join(published.read_text().splitlines(keepends=True)[:-1]))
    assert builds.build(runs, out, published=published)
    assert not builds.build(runs, out, published=published)
    titles = lb.method_titles()
    monkeypatch.setattr(lb, "method_titles", lambda: {**titles, "zz_plugin": "Z"})
    assert builds.build(runs, out, published=published)  # a plugin's method in this process
    assert not builds.build(runs, out, published=published)
    monkeypatch.setattr(record, "code_digest", lambda: "another version")
    assert builds.build(runs, out, published=published)


@pytest.mark.usefixtures("quick_figures")
def test_a_build_that_reported_something_or_raced_a_change_is_not_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = Builds(monkeypatch)
    runs, out = _runs(tmp_path / "runs"), tmp_path / "out"
    (runs / "broken").mkdir()
    (runs / "broken" / "metrics.json").write_text("{")
    builds.build(runs, out)
    assert not (out / record.RECORD).exists() and builds.build(runs, out)
    shutil.rmtree(runs / "broken")
    real = lb.write_outputs

    def racing(board, out_dir):  # a run changes while the build writes
        edit_json(runs / "plain" / "metrics.json", seconds={"total": 9.0})
        return real(board, out_dir)

    monkeypatch.setattr(lb, "write_outputs", racing)
    builds.build(runs, out)
    assert not (out / record.RECORD).exists()


@pytest.mark.usefixtures("quick_figures")
@pytest.mark.parametrize("folder", ["figures", "figures/iou", "figures/saliency_iou"])
def test_a_linked_figures_folder_is_one_line_and_nothing_outside_changes(
        tmp_path: Path, folder: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A figures folder that was a link to a folder of the user's: the build wrote its figures
    there and removed every other .svg and .png in it, as figures of runs no longer listed."""
    runs = _runs(tmp_path / "runs")
    out = tmp_path / "out"
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (elsewhere / "holiday.svg").write_bytes(b"<svg>mine</svg>")
    (elsewhere / "notes.png").write_bytes(b"mine")
    (out / folder).parent.mkdir(parents=True, exist_ok=True)
    (out / folder).symlink_to(elsewhere, target_is_directory=True)
    assert lb.main(["--runs", str(runs), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out / folder}: is a symbolic link; the leaderboard writes its figures there "
        "and removes those of runs no longer listed, so it never follows a link out of "
        "--output: remove the link")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["holiday.svg", "notes.png"]
    assert not (out / record.RECORD).exists()
    (out / folder).unlink()  # the link removed: the build goes through
    assert lb.main(["--runs", str(runs), "--output", str(out)]) == 0
    assert (out / "figures" / "iou" / "plain.svg").is_file()

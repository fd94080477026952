"""``python -m lostreg.leaderboard --reread`` (issue 20, "Load" follow-up): every run is read
from its predictions as on a first build, whatever the summary store and the build record
say. With honest summaries it writes a normal build's very bytes; a summary forged together
with metrics.json (each digest and key recomputed, so every check of a normal build passes)
is trusted by a normal build, and named, counted and not believed by a ``--reread`` build, for
box and mask runs alike."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mask_run_folders import REG as MASK_REG
from mask_run_folders import write_mask_run
from run_folders import REG, edit_json, pair_hits, write_run

from lostreg.evaluation import saliency
from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard import drawing, record, saliency_runs
from lostreg.runs import summaries


@pytest.fixture(autouse=True)
def quick_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """PNG figures as their redraw key, without matplotlib: their bytes still change with
    what they show (the forged builds below must differ there too), in milliseconds."""

    def figure(self: drawing.FigureWriter, name: str, inputs, draw) -> None:
        key = drawing.source_key(name, inputs)
        if not self._kept(name, key):
            self._write(name, key, key.encode("ascii"))

    monkeypatch.setattr(drawing.FigureWriter, "figure", figure)


def _runs(root: Path) -> Path:
    """A box register pair of 100 images and a mask register pair of 12."""
    base, other = pair_hits(20, 8, 30, 42)
    write_run(root, "box", base)
    write_run(root, "box-reg", other, **REG)
    write_mask_run(root, "mask", [(i % 5) - 2 for i in range(12)], empty_images=2)
    write_mask_run(root, "mask-reg", [(i % 3) - 1 for i in range(12)], **MASK_REG)
    return root


def _files(out: Path) -> dict[str, bytes]:
    """Every file a build wrote; of the build record, what it says of the outputs and the
    summary line (its inputs record a predictions file by stat or by hash depending on how
    long ago it was written, ``record._predictions``: a matter of timing, not of content)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes()
             for p in sorted(out.rglob("*")) if p.is_file()}
    if record.RECORD in files:
        data = json.loads(files[record.RECORD])
        files[record.RECORD] = json.dumps([data["outputs"], data["summary"]]).encode()
    return files


class Reads:
    """The runs whose predictions were read and checked (box and mask readers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs: list[str] = []
        real_box, real_mask = summaries.summarise, saliency_runs._read_images

        def box(header, key, data):
            self.runs.append(header.run_dir.name)
            return real_box(header, key, data)

        def mask(path: Path, data: bytes | None = None):
            self.runs.append(path.parent.name)
            return real_mask(path, data)

        monkeypatch.setattr(summaries, "summarise", box)
        monkeypatch.setattr(saliency_runs, "_read_images", mask)

    def build(self, runs: Path, out: Path, lines: list[str], **kwargs) -> lb.BuildSummary:
        self.runs = []
        return lb.build(runs, out, report=lines.append, **kwargs)


ALL = ["box", "box-reg", "mask", "mask-reg"]


def _stored(runs: Path) -> dict[str, tuple[dict, int]]:
    """Each run's stored summary (without its digest and where its predictions file was when
    read: ``predictions_stat`` is null for a file written less than 2 s before) and inode."""
    stored = {}
    for run in ALL:
        path = runs / summaries.STORE_FOLDER / f"{run}.json"
        data = json.loads(path.read_text())
        del data["digest"], data["predictions_stat"]
        stored[run] = (data, path.stat().st_ino)
    return stored


def test_with_honest_summaries_a_reread_build_writes_a_normal_build_s_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads, runs, lines = Reads(monkeypatch), _runs(tmp_path / "runs"), []
    normal = reads.build(runs, tmp_path / "normal", lines)
    assert sorted(reads.runs) == ALL and lines == []
    written, before = _files(tmp_path / "normal"), _stored(runs)
    reads.build(runs, tmp_path / "normal", lines)
    assert reads.runs == []  # the record: nothing changed, nothing read
    # the record never skips a --reread build: every run read, nothing differed
    reread = reads.build(runs, tmp_path / "normal", lines, reread=True)
    assert sorted(reads.runs) == ALL and lines == []
    assert reread.reread == (4, 0) and normal.reread is None
    assert _files(tmp_path / "normal") == written
    after = _stored(runs)
    for run in ALL:  # each summary written anew, with the same content
        assert after[run][0] == before[run][0] and after[run][1] != before[run][1]
    line = lb.summary_line(reread, Path("OUT"))
    assert line == lb.summary_line(normal, Path("OUT")) + (
        "; --reread: every run read from its predictions, 0 of 4 stored summaries differed "
        "from them")
    # a copied runs folder (other inodes, the same contents) into a new folder: nothing
    # differs, and every output is drawn and written anew with a normal build's bytes
    shutil.copytree(runs, tmp_path / "copy")
    assert reads.build(tmp_path / "copy", tmp_path / "copied", lines, reread=True).reread == (
        4, 0) and lines == []
    assert _files(tmp_path / "copied") == written


# --- forgeries: a stored summary and, where needed, metrics.json, every check recomputed -----


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _forge_summary(runs: Path, name: str, change: Callable[[dict], None]) -> None:
    """Edit run ``name``'s stored summary, then make it pass every check: its key names the
    run's files as they are now (metrics.json may have been forged too), its digest is
    recomputed."""
    path = runs / summaries.STORE_FOLDER / f"{name}.json"
    data = json.loads(path.read_text())
    data.pop("digest")
    change(data)
    data["files"]["metrics.json"] = _sha(runs / name / "metrics.json")
    data["digest"] = summaries.payload_digest(data)
    path.write_text(json.dumps(data))


def _set_hits(data: dict, hits: np.ndarray) -> None:
    """A box summary's hit bits and bootstrap totals, as ``summaries`` computes them."""
    metric, n = data["metrics"]["corloc"], hits.size
    metric["values"] = summaries.encode_vector(hits, "bool")
    totals = summaries.resampled_totals(hits[:, None], n)[:, 0]
    metric["totals"] = base64.b64encode(
        totals.astype(summaries._totals_dtype(n)).tobytes()).decode("ascii")
    metric["result"] = {**metric["result"], "corloc": 100.0 * hits.sum() / n}


def _hits(data: dict) -> np.ndarray:
    return summaries.decode_vector(data["metrics"]["corloc"]["values"], "bool",
                                   data["n_images"]).copy()


def moved_hits(runs: Path) -> None:
    """Two of the baseline's images trade hit and miss: its CorLoc stays, its pairing not."""
    def change(data: dict) -> None:
        hits = _hits(data)
        hits[[0, 25]] = hits[[25, 0]]  # a miss->hit image and a hit->miss one
        _set_hits(data, hits)

    _forge_summary(runs, "box", change)


def corloc_99(runs: Path) -> None:
    """CorLoc 99: metrics.json's hit count and the summary's hits forged together."""
    edit_json(runs / "box" / "metrics.json", n_hits=99, corloc=99.0)
    _forge_summary(runs, "box", lambda data: _set_hits(data, np.arange(100) < 99))


def _set_ious(data: dict, change: Callable[[np.ndarray], None]) -> np.ndarray:
    images = data["images"]
    ious = summaries.decode_vector(images["sal_iou"], "float", data["n_images"]).copy()
    change(ious)
    images["sal_iou"] = summaries.encode_vector(ious, "float")
    return ious


def moved_iou(runs: Path) -> None:
    """Two mask images trade 0.05 of IoU: the run's mean stays, its pairing not."""
    def change(ious: np.ndarray) -> None:
        ious[2] += 0.05
        ious[3] -= 0.05

    _forge_summary(runs, "mask", lambda data: _set_ious(data, change))


def iou_99(runs: Path) -> None:
    """IoU 99: metrics.json's IoU and the summary's per-image IoUs forged together (on the
    twin: the baseline has 0/0 images, whose NaN makes TokenCut's IoU mean null)."""
    def change(data: dict) -> None:
        ious = _set_ious(data, lambda ious: ious.__setitem__(~np.isnan(ious), 0.99))
        mean = saliency.sequential_mean(ious.tolist())
        edit_json(runs / "mask-reg" / "metrics.json", iou=round(100 * mean, 4),
                  iou_empty_as_one=round(100 * saliency.sequential_mean(
                      [1.0 if np.isnan(v) else v for v in ious]), 4))

    _forge_summary(runs, "mask-reg", change)


# forgery -> (the run, what the normal build shows that its predictions do not give, or
# None when only the pairing moved; then what the --reread build's line skipping the run
# says, formatted with the run's honest metrics.json)
FORGERIES = {
    "box hits moved": (moved_hits, "box", None),
    "box CorLoc 99": (corloc_99, "box",
                      ("corloc", 99.0, "{n_hits}/100 hits/images but metrics.json says 99/100")),
    "mask IoU moved": (moved_iou, "mask", None),
    "mask IoU 99": (iou_99, "mask-reg",
                    ("iou", 99.0, "'iou' is 99.0 but the predictions give {iou:.4f}")),
}


def _row(out: Path, run: str) -> dict[str, str] | None:
    import csv

    with (out / "leaderboard.csv").open(newline="") as handle:
        return next((row for row in csv.DictReader(handle) if row["run_id"] == run), None)


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_consistent_forgery_is_trusted_by_a_normal_build_and_named_by_reread(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], forgery: str) -> None:
    forge, run, shown = FORGERIES[forgery]
    runs = _runs(tmp_path / "runs")
    lb.build(runs, tmp_path / "honest", report=None)
    honest = _files(tmp_path / "honest")
    honest_metrics = json.loads((runs / run / "metrics.json").read_text())
    forge(runs)
    assert lb.main(["--runs", str(runs), "--output", str(tmp_path / "trusting")]) == 0
    assert capsys.readouterr().err == ""  # every check of a normal build passed
    trusting = _files(tmp_path / "trusting")
    assert trusting != honest
    if shown is not None:
        column, figure, _ = shown
        assert float(_row(tmp_path / "trusting", run)[column]) == figure
    assert lb.main(["--runs", str(runs), "--output", str(tmp_path / "reread"), "--reread"]) == 0
    out, err = capsys.readouterr()
    stored = runs / summaries.STORE_FOLDER / f"{run}.json"
    named = [line for line in err.splitlines() if line.startswith(f"{stored}: ")]
    assert len(named) == 1, err
    assert out.rstrip("\n").endswith(
        "; --reread: every run read from its predictions, 1 of 4 stored summaries differed "
        "from them (named above)")
    if shown is None:  # metrics.json untouched: the true figures, byte for byte
        assert "differs from what the predictions give (forged or damaged)" in named[0]
        assert _files(tmp_path / "reread") == {
            name: data for name, data in honest.items() if name != record.RECORD}
        return
    # metrics.json forged: the run is skipped as on a first build, its line giving the
    # predictions' figure, and its forged summary is not kept to be trusted again
    assert _row(tmp_path / "reread", run) is None
    skipped = [line for line in err.splitlines() if line.startswith(f"skipped {runs / run}")]
    assert len(skipped) == 1, err
    assert shown[2].format(**honest_metrics) in skipped[0], skipped[0]
    assert named[0].endswith("a stored summary, but the run's files give none (the line "
                             f"skipping {runs / run} says why); removed"), named[0]
    assert not stored.exists()
    lb.build(runs, tmp_path / "after", report=None)
    assert _row(tmp_path / "after", run) is None  # the next normal build believes it no more


@pytest.mark.parametrize("damage", ["stale", "unreadable", "digest"])
def test_a_stale_or_damaged_summary_is_named_with_what_is_wrong(tmp_path: Path,
                                                                damage: str) -> None:
    runs = _runs(tmp_path / "runs")
    lb.build(runs, tmp_path / "first", report=None)
    stored = runs / summaries.STORE_FOLDER / "box-reg.json"
    if damage == "stale":  # the summary of the run's older files: the store was not updated
        old = stored.read_bytes()
        edit_json(runs / "box-reg" / "config.json", device_name="another gpu")
        lb.build(runs, tmp_path / "second", report=None)
        stored.write_bytes(old)
    elif damage == "unreadable":
        stored.write_bytes(b"{")
    else:
        stored.write_text(stored.read_text().replace('"n_images": 100', '"n_images": 101'))
    lines: list[str] = []
    summary = lb.build(runs, tmp_path / "reread", report=lines.append, reread=True)
    reason = {"stale": "summarises other contents of the run's files (stale)",
              "unreadable": "cannot be read as a summary (damaged)",
              "digest": "does not match its own digest (damaged)"}[damage]
    assert lines == [f"{stored}: {reason}; this build uses what "
                     f"{runs / 'box-reg' / 'predictions.jsonl'} gives"]
    assert summary.reread == (4, 1) and summary.skipped == 0
    assert summaries.scan_summaries(runs, report=None)[1].recomputed == []  # rewritten


def test_a_run_skipped_for_its_metrics_is_counted_once_by_reread(tmp_path: Path) -> None:
    """Review finding: a mask run whose metrics.json disagrees with its lines had its summary
    stored anyway, so ``--reread`` compared it on writing and again on skipping it: "1 of 5"
    for 4 runs. Its honest summary of older files is now the one stale summary."""
    runs = _runs(tmp_path / "runs")
    lb.build(runs, tmp_path / "first", report=None)
    stored = runs / summaries.STORE_FOLDER / "mask.json"
    honest = stored.stat()
    edit_json(runs / "mask" / "metrics.json", acc=12.5)
    for out in ("second", "third"):  # skipped by each build, its summary left as it was
        lines: list[str] = []
        assert lb.build(runs, tmp_path / out, report=lines.append).skipped == 1
        assert len(lines) == 1 and lines[0].startswith(f"skipped {runs / 'mask'}"), lines
        assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == (
            honest.st_ino, honest.st_mtime_ns)
    lines = []
    summary = lb.build(runs, tmp_path / "reread", report=lines.append, reread=True)
    assert summary.reread == (4, 1) and not stored.exists()
    assert lb.summary_line(summary, Path("OUT")).endswith(
        "; --reread: every run read from its predictions, 1 of 4 stored summaries differed "
        "from them (named above)")
    assert [line for line in lines if line.startswith(f"{stored}: ")] == [
        f"{stored}: a stored summary, but the run's files give none (the line skipping "
        f"{runs / 'mask'} says why); removed"]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_store_that_is_no_folder_is_said_once(tmp_path: Path, kind: str) -> None:
    """Review finding: mask runs had a second store over the same folder, so a ``.summaries``
    that is a file or a link was said twice; one store per build says it once."""
    runs = _runs(tmp_path / "runs")
    folder = runs / summaries.STORE_FOLDER
    if kind == "file":
        folder.write_text("not a folder")
    else:
        (tmp_path / "elsewhere").mkdir()
        folder.symlink_to(tmp_path / "elsewhere")
    lines: list[str] = []
    summary = lb.build(runs, tmp_path / "out", report=lines.append)
    assert summary.runs == 4 and summary.skipped == 0
    said = [line for line in lines if "run summaries not stored" in line]
    assert len(said) == 1 and said[0].startswith(f"{folder}: "), lines
    if kind == "file":
        assert folder.read_text() == "not a folder"
    else:
        assert list((tmp_path / "elsewhere").iterdir()) == []

"""The leaderboard at scale (issue 20, "Load"): per-run summaries computed once per content of
a run's files, never trusted when damaged, giving outputs byte-identical to the leaderboard
that read every run's predictions (``tests/fixtures/leaderboard_0b4749c``), and figures
redrawn only when what they show changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from leaderboard_cases import FIXTURE_RUNS, GOLDEN, OUTPUTS, build, corloc_part, write_cases
from run_folders import REG, edit_json, edit_line, pair_hits, write_run

from lostreg.evaluation import stats
from lostreg.evaluation.registry import METRICS, MetricSpec
from lostreg.evaluation.targets import LineField
from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard import drawing
from lostreg.reports.leaderboard.histogram_svg import histogram_svg
from lostreg.runs import summaries
from lostreg.runs.store import load_run, read_predictions


def _outputs(out: Path) -> dict[str, bytes]:
    """The CorLoc outputs (``corloc_part``: the saliency columns, empty for box runs, and
    comparison.md's saliency part taken out), as 0b4749c wrote them."""
    return {name: corloc_part(name, (out / name).read_bytes()) for name in OUTPUTS}


def _golden(name: str) -> dict[str, bytes]:
    return {output: (GOLDEN / name / output).read_bytes() for output in OUTPUTS}


@pytest.mark.parametrize("case", ["generated", "runs_6415c89"])
def test_outputs_are_byte_identical_to_the_leaderboard_that_read_every_line(
        tmp_path: Path, case: str) -> None:
    """Cold (no summaries), then warm (every run from its stored summary): the same bytes as
    0b4749c wrote, whose leaderboard read every prediction line of every run."""
    if case == "generated":
        runs, smoke = write_cases(tmp_path / "runs"), False
    else:
        runs, smoke = tmp_path / "runs", True
        shutil.copytree(FIXTURE_RUNS, runs)
    line = (GOLDEN / case / "summary.txt").read_text().strip()
    for attempt in ("cold", "warm"):
        assert build(runs, tmp_path / attempt, smoke) == line, attempt
        assert _outputs(tmp_path / attempt) == _golden(case), attempt
    stored = sorted(path.stem for path in (runs / summaries.STORE_FOLDER).glob("*.json")
                    if not path.name.startswith("."))  # the store's own files (pvalues)
    finished = sorted(p.name for p in runs.iterdir() if (p / "metrics.json").is_file())
    assert stored == finished  # every finished run summarised, smoke runs included


def _scan(runs: Path) -> summaries.SummaryStore:
    return summaries.scan_summaries(runs, report=None)[1]


def test_an_unchanged_run_is_never_read_again_and_a_changed_one_always_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    base, other = pair_hits(5, 2, 10, 3)
    write_run(runs, "plain", base)
    write_run(runs, "reg", other, **REG)
    assert sorted(_scan(runs).recomputed) == ["plain", "reg"]
    reads: list[Path] = []
    monkeypatch.setattr(summaries, "box_columns",
                        lambda data, real=summaries.box_columns: reads.append(data) or real(data))
    store = _scan(runs)
    assert (store.recomputed, store.reused, reads) == ([], 2, [])
    os.utime(runs / "plain" / "predictions.jsonl", (1, 1))  # a new time, the same content
    assert _scan(runs).recomputed == []
    # a line changed consistently (box, hit and counts): the run is read again
    edit_line(runs / "plain" / "predictions.jsonl", 1, box=[12, 11, 60, 50], hit=True,
              best_iou=0.9)
    edit_json(runs / "plain" / "metrics.json", n_hits=sum(base) + 1)
    assert _scan(runs).recomputed == ["plain"] and len(reads) == 1
    board = lb.collect(runs, report=None)
    assert board.table.set_index("run_id").loc["plain", "n_hits"] == sum(base) + 1
    edit_json(runs / "reg" / "config.json", device_name="another gpu")  # any file counts
    assert _scan(runs).recomputed == ["reg"]


def _stored(runs: Path, name: str) -> Path:
    return runs / summaries.STORE_FOLDER / f"{name}.json"


def _resign(data: dict) -> dict:
    """A forged summary: edited, then its digest recomputed."""
    payload = {k: v for k, v in data.items() if k != "digest"}
    return {**payload, "digest": summaries.payload_digest(payload)}


def _flip_first_hit(data: dict) -> dict:
    metric = data["metrics"]["corloc"]
    bits = bytearray(summaries.base64.b64decode(metric["values"]))
    bits[0] ^= 0x80
    metric["values"] = summaries.base64.b64encode(bytes(bits)).decode()
    return data


TAMPERING = {
    "a bit flipped": lambda data: _flip_first_hit(data),
    "a bit flipped, digest forged": lambda data: _resign(_flip_first_hit(data)),
    "CorLoc edited": lambda data: {**data, "metrics": {"corloc": {
        **data["metrics"]["corloc"], "result": {"corloc": 99.0}}}},
    "another run's key": lambda data: _resign({**data, "files": {
        **data["files"], "predictions.jsonl": "0" * 64}}),
    "image count forged": lambda data: _resign({**data, "n_images": data["n_images"] + 1}),
    "totals cut short": lambda data: _resign({**data, "metrics": {"corloc": {
        **data["metrics"]["corloc"], "totals": data["metrics"]["corloc"]["totals"][:40]}}}),
    "histogram forged": lambda data: _resign({**data, "histograms": {"best_iou": [2] * 20}}),
    "unknown metric": lambda data: _resign({**data, "metrics": {
        "nope": data["metrics"]["corloc"]}}),
    "older format": lambda data: _resign({**data, "format": "lostreg-run-summary/0"}),
    "other resamples": lambda data: _resign({**data, "resamples": [100, 0]}),
}
RAW_TAMPERING = {"not JSON": b"{", "an array": b"[]", "deeply nested": b"[" * 100_000,
                 "empty": b""}


@pytest.mark.parametrize("damage", [*TAMPERING, *RAW_TAMPERING])
def test_a_damaged_or_forged_summary_is_never_trusted(tmp_path: Path, damage: str) -> None:
    runs = tmp_path / "runs"
    base, other = pair_hits(6, 1, 9, 4)
    write_run(runs, "plain", base)
    write_run(runs, "reg", other, **REG)
    build(runs, tmp_path / "first")
    path = _stored(runs, "plain")
    if damage in TAMPERING:
        path.write_text(json.dumps(TAMPERING[damage](json.loads(path.read_text()))))
    else:
        path.write_bytes(RAW_TAMPERING[damage])
    assert _scan(runs).recomputed == ["plain"]
    build(runs, tmp_path / "second")
    assert _outputs(tmp_path / "second") == _outputs(tmp_path / "first")
    assert summaries.summary_from_payload(
        json.loads(path.read_text()), *_header_and_key(runs / "plain")) is not None


def _header_and_key(run_dir: Path) -> tuple:
    header = summaries.read_header(run_dir)
    return header, summaries.run_file_key(run_dir, (run_dir / "predictions.jsonl").read_bytes())


def test_the_store_is_never_written_through_a_link(tmp_path: Path) -> None:
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    write_run(runs, "plain", [True, False, True])
    elsewhere.mkdir()
    (runs / summaries.STORE_FOLDER).symlink_to(elsewhere, target_is_directory=True)
    lines: list[str] = []
    store = summaries.scan_summaries(runs, report=lines.append)[1]
    assert list(elsewhere.iterdir()) == [] and store.written == 0
    assert len(lines) == 1 and "run summaries not stored (it is a link" in lines[0]
    (runs / summaries.STORE_FOLDER).unlink()
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    (runs / summaries.STORE_FOLDER).mkdir()
    _stored(runs, "plain").symlink_to(outside)  # a linked file: replaced, never written into
    assert _scan(runs).recomputed == ["plain"]
    assert outside.read_text() == "keep" and not _stored(runs, "plain").is_symlink()


def test_summaries_of_deleted_runs_are_removed_and_the_store_is_no_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "a", [True, False])
    write_run(runs, "b", [True, True])
    _scan(runs)
    shutil.rmtree(runs / "b")
    result, _ = summaries.scan_summaries(runs, report=None)
    assert [run.run_id for run in result.runs] == ["a"] and result.unfinished == 0
    assert sorted(p.name for p in (runs / summaries.STORE_FOLDER).iterdir()) == ["a.json"]


@pytest.mark.parametrize("sizes", [(0, 1, 2, 7, 40, 40, 40), (257, 300, 300, 300)])
def test_batched_totals_give_each_run_s_and_each_pair_s_bootstrap_to_the_bit(
        monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, ...]) -> None:
    """Every run's interval equals ``stats.bootstrap_corloc_ci`` of its hits, and every
    pair's equals ``stats.paired_bootstrap_diff_ci``, also when the runs of one image count
    are split into several blocks."""
    monkeypatch.setattr(summaries, "_BLOCK_BYTES", 8 * 300 * 2)  # at most 2 runs per block
    rng = np.random.default_rng(5)
    metrics = [summaries.MetricSummary("corloc", "hit", "bool", rng.random(n) < 0.4, {})
               for n in sizes]
    holders = [type("Held", (), {"metric_summaries": {"corloc": m}})() for m in metrics]
    summaries.add_totals(holders)
    for metric in metrics:
        expected = stats.bootstrap_corloc_ci(metric.values)
        assert metric.interval == expected or (np.isnan(expected).all()
                                               and np.isnan(metric.interval).all())
    a, b = metrics[-2], metrics[-1]
    diff = 100.0 * ((b.totals.astype(np.float64) - a.totals) / a.values.size)
    assert stats._percentile_interval(diff, 0.95) == stats.paired_bootstrap_diff_ci(
        a.values, b.values)


def test_paired_statistics_from_summaries_equal_the_joined_predictions(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    base, other = pair_hits(13, 6, 20, 11)
    write_run(runs, "plain", base)
    write_run(runs, "reg", other, **REG)
    result, _ = summaries.scan_summaries(runs, report=None)
    by_id = {run.run_id: run for run in result.runs}
    fast = summaries.paired_statistics(by_id["plain"], by_id["reg"])
    plain = summaries.paired_statistics(load_run(runs / "plain"), load_run(runs / "reg"))
    assert fast == plain and fast.n_paired == 50 and (fast.miss_to_hit, fast.hit_to_miss) == (
        13, 6)


def test_iou_histogram_from_counts_is_the_histogram_of_every_image(tmp_path: Path) -> None:
    """The IoU histogram drawn from a summary's bin counts shows, bar for bar, every image's
    best IoU binned as before summaries, with the run's CorLoc computed from its hits."""
    runs = write_cases(tmp_path / "runs")
    board = lb.collect(runs, report=None)
    for run in board.runs[:3]:
        full = load_run(run.run_dir)
        ious = full.predictions["best_iou"].to_numpy(dtype=float)
        histogram = lb.iou_histogram(run)
        assert histogram.counts == tuple(np.histogram(ious, np.linspace(0.0, 1.0, 21))[0])
        assert f"CorLoc {stats.corloc_percent(full.predictions['hit']):.1f} on {ious.size} " \
               "images" in histogram.title
        assert histogram.threshold == 0.5 and histogram.smoke == bool(full.smoke)
        assert lb.iou_svg(run) == histogram_svg(lb.iou_histogram(full)), run.run_id


def _inodes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_ino
            for p in sorted((out / "figures").rglob("*.*")) if p.suffix in (".png", ".svg")}


def test_figures_are_redrawn_only_when_what_they_show_changed(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, other = pair_hits(5, 2, 10, 3)
    write_run(runs, "plain", base)
    write_run(runs, "reg", other, **REG)
    write_run(runs, "alone", [True, False, False], dataset="voc12")
    build(runs, out)
    first, pngs = _inodes(out), {p: (out / p).read_bytes() for p in _inodes(out)}
    build(runs, out)
    assert _inodes(out) == first  # nothing rewritten
    edit_line(runs / "alone" / "predictions.jsonl", 2, box=[12, 11, 60, 50], hit=True,
              best_iou=0.9)
    edit_json(runs / "alone" / "metrics.json", n_hits=2)
    build(runs, out)
    changed = {name for name, inode in _inodes(out).items() if first[name] != inode}
    assert changed == {"figures/iou/alone.svg"}
    (out / "figures" / "iou" / "plain.svg").write_bytes(b"edited")
    (out / "figures" / "corloc_registers.png").unlink()
    build(runs, out)
    assert (out / "figures" / "iou" / "plain.svg").read_bytes() == pngs["figures/iou/plain.svg"]
    assert (out / "figures" / "corloc_registers.png").read_bytes() == pngs[
        "figures/corloc_registers.png"]
    (out / "figures" / drawing.MANIFEST).write_text("[" * 50_000)  # a damaged record
    before = _inodes(out)
    build(runs, out)
    assert all(before[name] != inode for name, inode in _inodes(out).items())  # all redrawn
    assert (out / "figures" / "iou" / "reg.svg").read_bytes() == pngs["figures/iou/reg.svg"]


def test_histograms_of_an_older_build_and_of_removed_runs_are_removed(tmp_path: Path) -> None:
    """PNG histograms (lostreg before SVG) and those of runs no longer listed go; other files
    in the folder are not touched."""
    runs, out = write_cases(tmp_path / "runs"), tmp_path / "out"
    build(runs, out)
    folder = out / "figures" / "iou"
    listed = sorted(path.name for path in folder.iterdir())
    assert listed and all(name.endswith(".svg") for name in listed)
    (folder / "old-run.svg").write_text("<svg/>")
    (folder / listed[0].replace(".svg", ".png")).write_bytes(b"png of an older lostreg")
    (folder / "notes.txt").write_text("mine")
    build(runs, out)
    assert sorted(path.name for path in folder.iterdir()) == sorted([*listed, "notes.txt"])


def test_predictions_are_read_on_demand_and_must_be_what_was_summarised(tmp_path: Path
                                                                        ) -> None:
    """The notebook reads a run's predictions through the board; a file changed since the
    summary was made is one line, not a silent mix."""
    runs = tmp_path / "runs"
    write_run(runs, "plain", [True, False, True, True])
    board = lb.collect(runs, report=None)
    (run,) = board.runs
    assert isinstance(run, summaries.RunSummary) and run._predictions is None
    assert run.predictions.equals(read_predictions(runs / "plain" / "predictions.jsonl"))
    stale = lb.collect(runs, report=None).runs[0]
    edit_line(runs / "plain" / "predictions.jsonl", 2, box=[12, 11, 60, 50], hit=True,
              best_iou=0.9)
    with pytest.raises(lb.LostregError, match="changed while it was being read"):
        stale.predictions  # noqa: B018


def test_a_float_metric_with_nulls_is_summarised_without_special_code(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mask run's ``sal_iou`` (floats, null for TokenCut's 0/0) goes through the same
    summary as CorLoc's hits: registry-driven, vector and result stored and read back."""

    class Mean:
        def __init__(self) -> None:
            self.values: list[float | None] = []

        def update(self, scores) -> None:
            self.values.append(scores["toy_iou"])

        def result(self) -> dict:
            kept = [v for v in self.values if v is not None]
            return {"toy_mean": sum(kept) / len(kept), "toy_nan": float("nan")}

    spec = MetricSpec(name="toy", title="Toy", target="boxes", reads=("box",),
                      fields={"toy_iou": LineField(lambda v: True, "a number or null")},
                      score=lambda line, target: {}, aggregate=Mean, per_image="toy_iou",
                      paired_test="bootstrap", headline="toy_mean", definition="a test",
                      describe=lambda result: "")
    monkeypatch.setitem(METRICS, "toy", spec)
    metric = summaries.summarise_metric(spec, {"toy_iou": [0.5, None, 1.0]})
    assert metric.kind == "float" and metric.result == {"toy_mean": 0.75, "toy_nan": None}
    assert np.array_equal(metric.values, [0.5, np.nan, 1.0], equal_nan=True)
    entry = {"per_image": "toy_iou", "kind": "float", "result": metric.result, "totals": None,
             "values": summaries.encode_vector(metric.values, "float")}
    back = summaries._metric_from_payload("toy", json.loads(json.dumps(entry)), 3)
    assert back is not None and np.array_equal(back.values, metric.values, equal_nan=True)
    assert summaries._metric_from_payload("toy", entry, 4) is None  # another image count


def test_a_settled_unchanged_predictions_file_is_not_even_read(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A file whose stat (size, times, inode) is the one recorded when it was hashed, and
    which had settled then, is not read again; any write changes its ctime, which no user can
    set back, so an edit of the same size with its old mtime restored is read again."""
    runs = tmp_path / "runs"
    path = write_run(runs, "plain", [True, False, True, True]) / "predictions.jsonl"
    assert summaries.file_stat(path)  # a fresh file has not settled: no stat recorded yet
    _scan(runs)
    assert json.loads(_stored(runs, "plain").read_text())["predictions_stat"] is None
    monkeypatch.setattr(summaries, "RACY_NS", 0)  # as if the file were 2 s old
    reads: list[Path] = []
    real = summaries.read_bounded
    monkeypatch.setattr(summaries, "read_bounded",
                        lambda p, *a, **k: reads.append(Path(p)) or real(p, *a, **k))
    _scan(runs)  # hashed once more, and now its stat is recorded
    assert json.loads(_stored(runs, "plain").read_text())["predictions_stat"] == (
        summaries.file_stat(path))
    reads.clear()
    assert _scan(runs).recomputed == [] and path not in reads
    old = path.stat()
    path.write_bytes(path.read_bytes().replace(b'"width": 100', b'"width": 101', 1))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # same size, same mtime
    assert path.stat().st_size == old.st_size and path.stat().st_mtime_ns == old.st_mtime_ns
    assert _scan(runs).recomputed == ["plain"] and path in reads

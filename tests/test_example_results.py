"""The shipped ``results/example/`` (from ``scripts/make_example.sh``) must look like what the
leaderboard writes today and must never pass for a result: if the columns change, or a row
or figure loses its SMOKE mark, this fails and the example is rebuilt with the script."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from lostreg.reports.leaderboard.tables import COMPARISON_COLUMNS, LEADERBOARD_COLUMNS

EXAMPLE = Path(__file__).resolve().parents[1] / "results" / "example"
REBUILD = "rebuild it with: bash scripts/make_example.sh --out results/example"


def _rows(name: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(EXAMPLE / name, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_example_leaderboard_has_todays_columns_and_only_smoke_rows() -> None:
    header, rows = _rows("leaderboard.csv")
    assert header == LEADERBOARD_COLUMNS, REBUILD
    assert {row["method"] for row in rows} == {"lost", "tokencut", "dinoseg"}
    assert rows and all(row["smoke"] == "True" and row["weights_source"] == "random"
                        for row in rows)


def test_example_comparison_marks_every_ours_row_smoke() -> None:
    header, rows = _rows("comparison.csv")
    assert header == COMPARISON_COLUMNS, REBUILD
    ours = [row for row in rows if row["source"] == "ours"]
    assert {row["registers"] for row in ours} == {"trained", "test-time"}
    assert all(row["smoke"] == "True" for row in ours)
    text = (EXAMPLE / "comparison.md").read_text(encoding="utf-8")
    ours_lines = [line for line in text.splitlines() if "| ours |" in line]
    assert len(ours_lines) == len(ours) and all("SMOKE" in line for line in ours_lines)


def test_example_figures_exist_for_every_run() -> None:
    _, rows = _rows("leaderboard.csv")
    figures = EXAMPLE / "figures"
    with Image.open(figures / "corloc_registers.png") as image:
        assert image.width > 400 and image.height > 200
    box_runs = {row["run_id"] for row in rows if row["corloc"] != ""}
    mask_runs = {row["run_id"] for row in rows if row["iou"] != ""}
    assert box_runs and mask_runs and not box_runs & mask_runs  # a run is scored one way
    assert {path.name for path in (figures / "iou").iterdir()} == {f"{run}.svg" for run in box_runs}
    assert {path.name for path in (figures / "saliency_iou").iterdir()} == {
        f"{run}.svg" for run in mask_runs}
    for histogram in [*(figures / "iou").iterdir(), *(figures / "saliency_iou").iterdir()]:
        assert ">SMOKE (random weights): not a result</text>" in histogram.read_text(), (
            histogram, REBUILD)
    for name in ("saliency_iou.png", "saliency_f_curves.png"):
        with Image.open(figures / name) as image:
            assert image.width > 400 and image.height > 200

"""Issue 20, row 3, for mask runs: what the leaderboard says about a mask run whose
metrics.json is unreadable or not its predictions' is the same hint as for a box run (it said
"rerun the run to rewrite it"), and it is true: the run's own command rewrites the file and the
run is read again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import TINY, only_folder

from lostreg.datasets.mask_demo import generate_mask_tree
from lostreg.reports import leaderboard as lb
from lostreg.run import main
from lostreg.runs.store import REWRITE_HINT

IMAGES = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def command(root: Path) -> list[str]:
    return ["--model", TINY.name, "--weights", "random", "--dataset", "ecssd", "--data-root",
            str(root / "data"), "--runs", str(root / "runs"), "--num-workers", "0",
            "--no-progress", "--device", "cpu", "--allow-partial-dataset"]


@pytest.mark.parametrize("damage", ["count", "unreadable"])
def test_the_mask_leaderboard_hint_is_true(tmp_path, tiny_model, capsys, damage) -> None:
    generate_mask_tree(tmp_path / "data", "ecssd", IMAGES, seed=1, sizes=(40, 60))
    assert main(command(tmp_path)) == 0
    folder = only_folder(tmp_path / "runs")
    metrics = folder / "metrics.json"
    if damage == "count":  # a count that disagrees with the lines
        metrics.write_text(json.dumps({**json.loads(metrics.read_text()),
                                       "n_images": IMAGES + 1}))
    else:
        metrics.write_text("{\"n_images\": ")
    skipped: list[str] = []
    board = lb.collect(tmp_path / "runs", include_smoke=True, report=skipped.append)
    assert board.runs == [] and board.saliency.runs == []
    (line,) = skipped  # an unreadable file is reported by the box reader, a count by the mask one
    assert line.endswith(f"; {REWRITE_HINT} metrics.json from its predictions"), line
    capsys.readouterr()
    assert main(command(tmp_path)) == 0
    assert "| metrics.json rewritten from the predictions: " in capsys.readouterr().out
    skipped.clear()
    board = lb.collect(tmp_path / "runs", include_smoke=True, report=skipped.append)
    (run,) = board.saliency.runs
    assert skipped == [] and run.run_dir == folder

"""``benchmarks/bench_leaderboard.py`` keeps working: its generated runs are valid run folders
(every read recomputes their hits) in register pairs, and its child does the command's work.
No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_leaderboard  # noqa: E402
from lostreg.reports import leaderboard as lb  # noqa: E402
from lostreg.runs.store import load_run  # noqa: E402


def test_generated_runs_read_back_in_pairs(tmp_path: Path) -> None:
    bench_leaderboard.generate_runs(tmp_path / "runs", 5, n_images=40, seed=3)
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 5
    run = load_run(folders[0])  # raises if a stored hit disagreed with its box
    assert run.summary["n"] == 40 and 0 < run.summary["n_hits"] < 40
    board = lb.collect(tmp_path / "runs", report=None)
    assert len(board.table) == 5 and (board.comparison["model_reg"].notna()).sum() == 2
    lines = (folders[0] / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 40 and lines[0].startswith('{"best_iou": ')


def test_the_child_does_the_command_s_work_and_reports_its_phases(
        tmp_path: Path, monkeypatch, capsys) -> None:
    bench_leaderboard.generate_runs(tmp_path / "runs", 2, n_images=30, seed=1)
    monkeypatch.setattr(sys, "argv", ["-c", str(tmp_path / "runs"), str(tmp_path / "out")])
    exec(compile(bench_leaderboard.CHILD, "child", "exec"), {"__name__": "__main__"})
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [phase["phase"].split(":")[0] for phase in report["phases"]] == [
        "import lostreg.reports.leaderboard (pandas)", "build record checked", "collect",
        "write", "peak RSS after the build"]
    assert report["phases"][-1]["peak_rss_mib"] > 0
    assert report["line"].startswith("2 runs (0 smoke)") and "1 register pairs" in report["line"]
    assert (tmp_path / "out" / "leaderboard.csv").is_file()


def test_the_time_goals_are_judged_only_at_their_size() -> None:
    """A 100-run build that fits 30 s says nothing about 500 runs: not measured, never MET."""
    from benchmarks.bench_leaderboard import goal_verdicts

    fast = {"seconds": 1.0, "peak_rss_mib": 100.0}
    small = goal_verdicts(100, 5011, fast, fast)
    assert small["cold"].startswith("not measured") and small["rebuild"].startswith("not measured")
    assert small["rss"] == "MET"
    assert goal_verdicts(500, 5011, {"seconds": 40.0, "peak_rss_mib": 2000.0}, fast) == \
        {"cold": "NOT MET", "rebuild": "MET", "rss": "NOT MET"}

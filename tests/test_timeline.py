"""Start-up timeline: steps in order, in seconds since the process started, recorded by runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from lostreg import timeline

REPO = Path(__file__).resolve().parents[1]


def test_marks_keep_the_first_time_and_grow() -> None:
    timeline.mark("test step a")
    first = timeline.marks()["test step a"]
    time.sleep(0.02)
    timeline.mark("test step b")
    timeline.mark("test step a")  # a second mark of the same step changes nothing
    marks = timeline.marks()
    assert marks["test step a"] == first and marks["test step b"] >= first + 0.015


def test_since_start_counts_from_the_process_start_not_from_the_import() -> None:
    """A child sleeps before importing lostreg: the clock must include that second."""
    code = ("import time; time.sleep(1.0); from lostreg import timeline; "
            "print(timeline.since_start())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert 1.0 <= float(out) < 60


def test_a_run_records_its_startup_steps(tmp_path) -> None:
    from lostreg.run import main

    assert main(["--model", "timm:vit_tiny_patch16_224", "--weights", "random", "--dataset",
                 "demo", "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "r"),
                 "--num-workers", "0", "--no-progress", "--limit", "2"]) == 0
    (run_dir,) = (tmp_path / "r").iterdir()
    startup = json.loads((run_dir / "metrics.json").read_text())["startup"]
    steps = ["dataset indexed", "backbone described", "first batch decoded",
             "first batch through the methods", "first run finished"]
    assert all(step in startup for step in steps)
    assert [startup[s] for s in steps] == sorted(startup[s] for s in steps)


def test_each_printed_mark_is_one_whole_write(monkeypatch) -> None:
    """Marks come from two threads (the warm start imports timm in the background); a line
    written in pieces interleaves with the other thread's and the benchmark loses the mark."""
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setenv("LOSTREG_TIMELINE", "1")
    monkeypatch.setattr(sys, "stderr", Recorder())
    monkeypatch.setattr(timeline, "_MARKS", {})
    timeline.mark("a step only this test reaches")
    assert len(writes) == 1
    assert writes[0].startswith("timeline:") and writes[0].endswith(
        "a step only this test reaches\n")


def test_importing_the_run_leaves_the_heavy_packages_for_later() -> None:
    """timm (seconds) is imported by the warm-start thread while the dataset is indexed, and
    scipy, pandas and matplotlib only by the stages that use them; none on the import path."""
    code = ("import sys, lostreg.run; "
            "print(','.join(m for m in ('timm', 'scipy', 'pandas', 'matplotlib') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""

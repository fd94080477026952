"""A protocol study measures LOST's CorLoc: a saliency set (scored on masks) is refused in one
line before any run starts, never run into a grid whose CorLoc tables cannot read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lostreg.reports.protocol import main


@pytest.mark.parametrize("flags", [["--dataset", "ecssd"],
                                   ["--dataset", "voc07", "--select-on", "duts_te"]])
def test_a_saliency_set_is_one_line_before_any_work(tmp_path: Path, capsys, flags) -> None:
    runs = tmp_path / "runs"
    assert main(["--model", "dino_vits16", "--weights", "random", "--data-root",
                 str(tmp_path / "data"), "--runs", str(runs), "--output",
                 str(tmp_path / "protocol"), "--no-download", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "a protocol study measures LOST's CorLoc on a box dataset" in err[0]
    assert "scored on masks (saliency)" in err[0]
    assert not runs.exists() and not (tmp_path / "protocol").exists()

"""Run folders written before the evaluation-layer redesign stay valid: the fixture under
``tests/fixtures/runs_6415c89`` was written by lostreg at commit 6415c89 (the last commit
before it) with

    python -m lostreg.run --dataset demo --weights random --device cpu --limit 5 \\
        --model dinov2_vits14_reg4 --method lost,tokencut,dinoseg

Today's code must find those folders (same run ids), call them finished without changing a
byte, and, when their results are deleted, write byte-identical predictions again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lostreg.run import main

FIXTURE = Path(__file__).parent / "fixtures" / "runs_6415c89"


def _command(tmp_path: Path) -> list[str]:
    return ["--dataset", "demo", "--data-root", str(tmp_path / "data"), "--weights", "random",
            "--output", str(tmp_path / "runs"), "--no-progress", "--device", "cpu",
            "--model", "dinov2_vits14_reg4", "--method", "lost,tokencut,dinoseg", "--limit", "5",
            "--num-workers", "0"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.usefixtures("one_thread")
def test_old_folders_are_finished_and_recomputed_byte_for_byte(tmp_path, capsys) -> None:
    shutil.copytree(FIXTURE, tmp_path / "runs")
    before = _files(tmp_path / "runs")
    assert main(_command(tmp_path)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CorLoc")]
    assert len(lines) == 3 and all("| already finished: " in line for line in lines)
    assert _files(tmp_path / "runs") == before  # not a byte changed
    for run_dir in (tmp_path / "runs").iterdir():
        (run_dir / "predictions.jsonl").unlink()
        (run_dir / "metrics.json").unlink()
    assert main(_command(tmp_path)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CorLoc")]
    assert len(lines) == 3 and all("| new: " in line for line in lines)
    after = _files(tmp_path / "runs")
    for name, data in before.items():
        if name.endswith("predictions.jsonl"):
            assert after[name] == data, name
    assert sorted(after) == sorted(before)  # the same folders, found under their old ids

"""A real run killed with SIGKILL mid-way resumes to the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lostreg.datasets import load_dataset
from lostreg.io import read_jsonl
from lostreg.run import main

REPO = Path(__file__).resolve().parents[1]
MODEL = "dinov2_vits14_reg4"


pytestmark = pytest.mark.usefixtures("one_thread")


def args(root: Path, out: str) -> list[str]:
    return ["--model", MODEL, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / out),
            "--batch-size", "1", "--num-workers", "0", "--no-progress"]


def complete_lines(path: Path) -> int:
    return len(list(read_jsonl(path))) if path.exists() else 0


def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path) -> None:
    # generated here, before the subprocess starts; 24 images leave time to kill it
    total = len(load_dataset("demo", tmp_path / "data").records)
    command = [sys.executable, "-m", "lostreg.run", *args(tmp_path, "killed")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    predictions = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp_path / "killed").glob("*/predictions.jsonl"))
            if found and complete_lines(found[0]) >= 3:
                predictions = found[0]
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and predictions is None:
            proc.kill()
        proc.wait(timeout=60)
    assert predictions is not None, f"run ended before it could be killed: {proc.stderr.read()}"
    assert proc.returncode == -signal.SIGKILL
    run_dir = predictions.parent
    before = complete_lines(predictions)
    assert 3 <= before < total and not (run_dir / "metrics.json").exists()

    assert main(args(tmp_path, "killed")) == 0  # the same command again
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["seconds"]["images_computed"] + before == total
    assert metrics["resumed_with"] == before

    assert main(args(tmp_path, "whole")) == 0
    (whole,) = (tmp_path / "whole").iterdir()
    assert whole.name == run_dir.name
    assert predictions.read_bytes() == (whole / "predictions.jsonl").read_bytes()
    reference = json.loads((whole / "metrics.json").read_text())
    for key in ("corloc", "n_hits", "n_images", "run_id"):
        assert metrics[key] == reference[key]

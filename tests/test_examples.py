"""``examples/own_backbone.py`` runs offline as documented: a ViT with registers defined in the
file, scored on the demo scenes by the API (smoke runs) and in a training loop (scratch runs),
and by the CLI through ``--model py:examples/own_backbone.py:build``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lostreg.runs.store import scan_runs

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_the_own_backbone_example_scores_its_model(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "examples/own_backbone.py", "--data-root", str(tmp_path / "data"),
         "--output", str(tmp_path / "runs")], cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.count("[SMOKE RUN (weights: random)") == 3 and "step 4: loss" in out
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert [f.split("-")[0] for f in folders].count("smoke") == 3
    scratch = [f for f in folders if f.startswith("scratch-demo-tiny_reg_vit-lost-keys-")]
    assert len(scratch) == 2  # one per look: the weights changed between them
    config = json.loads((tmp_path / "runs" / scratch[0] / "config.json").read_text())
    assert config["plugin"]["adapter"] == "qkv" and config["num_registers"] == 4
    assert config["plugin"]["num_prefix_tokens"] == 5 and config["identity"]["limit"] == 12
    scan = scan_runs(tmp_path / "runs", report=None)
    assert scan.runs == [] and scan.smoke_excluded == 3 and scan.scratch_excluded == 2

    cli = subprocess.run(
        [sys.executable, "-m", "lostreg.run", "--model", "py:examples/own_backbone.py:build",
         "--dataset", "demo", "--weights", "random", "--data-root", str(tmp_path / "data"),
         "--output", str(tmp_path / "cli"), "--limit", "6", "--no-progress"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "py:examples/own_backbone.py:build k lost limit=6 | new:" in cli.stdout

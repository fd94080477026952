"""``benchmarks/bench_api.py`` keeps working: its core on a tiny tree and model (correctness
only: every image scored, the repeated call finds its folder; never a timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_api  # noqa: E402
from benchmarks.common import sample_sizes, write_voc_tree  # noqa: E402


def test_bench_api_core_on_a_tiny_tree(tmp_path, one_thread) -> None:
    index = write_voc_tree(tmp_path / "data" / "VOC2007", sample_sizes(5, 0, 0.15), 0)
    model = bench_api.tiny_vit("vit_tiny_patch16_224", 1, torch.device("cpu"))
    result = bench_api.measure(index, model, torch.device("cpu"), tmp_path, batch_size=2,
                               repeats=1)
    assert result["n_images"] == 5 and result["already_finished_status"] == "already finished"
    assert len(result["seconds"]["evaluate"]) == 1 and result["state_hash_seconds"] >= 0
    runs = sorted((tmp_path / "runs-0").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("scratch-voc07-module_vit_tiny_patch16_224")

"""bench_lost's stage comparisons (components, row blocks) run and check what they claim."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_lost  # noqa: E402
from benchmarks.common import sample_sizes  # noqa: E402
from lostreg.methods import lost as lost_module  # noqa: E402

CPU = torch.device("cpu")


def test_every_component_path_gives_the_same_components() -> None:
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(6, 13, 17, generator=gen) < 0.6
    seed_rc = torch.stack([torch.randint(0, 13, (6,), generator=gen),
                           torch.randint(0, 17, (6,), generator=gen)], dim=1)
    results = {name: fn(mask, seed_rc) for name, fn in bench_lost.COMPONENT_PATHS.items()}
    assert set(results) == {"propagation", "dilation", "host scipy"}
    for component in results.values():
        assert torch.equal(component, results["host scipy"])


def test_round_and_step_counters() -> None:
    snake = torch.zeros(1, 5, 5, dtype=torch.bool)
    snake[0, ::2] = True
    snake[0, 1, 4] = snake[0, 3, 0] = True  # one path of 17 pixels
    # a dilation from one end walks the path pixel by pixel
    assert bench_lost._dilation_steps(snake, torch.tensor([[0, 0]])) == 16
    assert 1 <= bench_lost.propagation_rounds(snake) <= 4
    assert bench_lost.propagation_rounds(torch.zeros(1, 3, 3, dtype=torch.bool)) == 1


def test_stage_measurements_report_identical_outputs() -> None:
    batches = bench_lost.make_batches(sample_sizes(5, seed=1, scale=0.2), 16, 12, 3, CPU)
    rows, same = bench_lost.measure_components(batches, 100, 0.0, CPU, rounds=1)
    assert same and dict(rows)["components: identical in all paths"] == "yes"
    rows, same = bench_lost.measure_blocking((9, 11), 2, 16, 8, 20, 0.1, CPU, rounds=1, seed=0)
    table = dict(rows)
    assert same and table["blocking: same degrees, seeds, M bits"] == "yes"
    # a 99-patch image fits any budget: the comparison lowers it to a quarter of N x N floats
    assert table["blocking: row blocks"].startswith("2 of 50 rows")
    assert lost_module.CHUNK_BYTES == {"cpu": 8 << 20, "cuda": 1 << 30}  # restored


def test_large_grid_option(capsys) -> None:
    assert bench_lost.grid_arg("48x64") == (48, 64)
    for bad in ("48", "0x5", "ax3", "4x5x6"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_lost.grid_arg(bad)
    code = bench_lost.main(["--images", "4", "--dim", "8", "--size-scale", "0.1", "--rounds",
                            "1", "--large-grid", "8x9", "--large-images", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "RATIO dilation / propagation time" in out and "RATIO blocked / unblocked time" in out
    assert bench_lost.main(["--large-images", "-1"]) == 2
    assert bench_lost.main(["--block-bytes", "0"]) == 2
    rows, same = bench_lost.measure_blocking((9, 11), 1, 16, 8, 20, 0.0, CPU, rounds=1, seed=0,
                                             block_bytes=1)
    assert same and dict(rows)["blocking: row blocks"].startswith("2 of 50 rows")

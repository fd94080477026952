"""The CUDA paths, run for real where a GPU exists (skipped elsewhere, e.g. in CPU-only CI).

CPU-only machines check these paths with mocks (``test_cuda_paths.py``); these tests are the
first thing to run on a machine with a GPU: ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lostreg.io import read_jsonl
from lostreg.methods.geometry import seed_component
from lostreg.methods.lost import lost, lost_reference
from lostreg.run import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
P = 14


def test_lost_on_the_gpu_equals_the_per_image_reference() -> None:
    """Whole batches on the GPU (dilation components, one chunk) vs scipy per image on CPU."""
    gen = torch.Generator().manual_seed(0)
    for rows, cols, batch, k, bias in [(27, 36, 8, 100, 0.0), (36, 27, 5, 50, 0.3),
                                       (1, 9, 3, 4, -0.5), (20, 20, 16, 400, 0.0)]:
        feats = torch.randn(batch, rows * cols, 64, generator=gen)
        sizes = [(rows * P - 3, cols * P - 5)] * batch
        out = lost(feats.to(CUDA), (rows, cols), P, sizes, k, bias)
        assert out.box.device.type == "cuda"
        for i in range(batch):
            ref = lost_reference(feats[i], (rows, cols), P, sizes[i], k, bias)
            assert out.box[i].tolist() == ref.box and int(out.seed[i]) == ref.seed
            assert torch.equal(out.degrees[i].cpu(), ref.degrees)


def test_seed_component_on_the_gpu_equals_the_cpu() -> None:
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(32, 40, 30, generator=gen) > 0.45
    seeds = torch.stack([torch.randint(0, 40, (32,), generator=gen),
                         torch.randint(0, 30, (32,), generator=gen)], dim=1)
    assert torch.equal(seed_component(masks.to(CUDA), seeds.to(CUDA)).cpu(),
                       seed_component(masks, seeds))


def _run(tmp_path: Path, *extra: str) -> list[dict]:
    args = ["--model", "dinov2_vits14_reg4", "--weights", "random", "--dataset", "demo",
            "--data-root", str(tmp_path.parent / "data"), "--output", str(tmp_path),
            "--num-workers", "2", "--no-progress", *extra]
    assert main(args) == 0
    (run_dir,) = list(tmp_path.iterdir())
    return list(read_jsonl(run_dir / "predictions.jsonl"))


def test_cuda_run_batching_changes_no_result_and_records_the_gpu(tmp_path) -> None:
    one = _run(tmp_path / "b1", "--device", "cuda", "--batch-size", "1")
    many = _run(tmp_path / "b8", "--device", "cuda", "--batch-size", "8")
    assert [(p["box"], p["seed"]) for p in one] == [(p["box"], p["seed"]) for p in many]
    (run_dir,) = list((tmp_path / "b8").iterdir())
    config = json.loads((run_dir / "config.json").read_text())
    assert "cuda" in json.dumps(config["device"]) and config["numerics"]["tf32_matmul"] is False


def test_cuda_run_matches_the_cpu_run(tmp_path) -> None:
    """Same images, same random weights: fp32 without TF32 on the GPU gives the CPU's boxes
    (a difference here means a near-zero similarity flipped sign; look at that image)."""
    gpu = _run(tmp_path / "gpu", "--device", "cuda", "--batch-size", "8")
    cpu = _run(tmp_path / "cpu", "--device", "cpu", "--batch-size", "8")
    differ = [g["image_id"] for g, c in zip(gpu, cpu, strict=True) if g["box"] != c["box"]]
    assert not differ, differ

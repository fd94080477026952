"""notebooks/analysis.ipynb runs top to bottom, headless, on generated run folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analysis.ipynb"


def write_run(root: Path, name: str, hits: list[bool], *, model: str, timm_name: str,
              registers: int = 0, smoke: bool = False, data_root: Path | None = None,
              n_objects: int = 1) -> None:
    """A finished run folder in lostreg.run's format (config, predictions, metrics)."""
    identity = {"lostreg_version": "0.1.0", "model": model, "timm_name": timm_name,
                "pos_embed": "dinov2", "weights": "random" if smoke else "sha256:" + "cd" * 32,
                "dataset": "demo", "split": "trainval", "no_hard": False, "limit": None,
                "feature": "k", "k_patches": 100, "gram_bias": 0.0, "precision": "fp32"}
    config = {"run_id": name, "identity": identity, "model": model, "timm_name": timm_name,
              "family": "dinov2", "patch_size": 14, "num_registers": registers,
              "num_params": 10, "smoke_run": smoke,
              "weights": {"source": "random" if smoke else "hub", "path": None,
                          "sha256": None if smoke else "cd" * 32, "hub_id": None},
              "dataset": "demo", "split": "trainval", "data_root": str(data_root or root),
              "no_hard": False, "feature": "k", "k_patches": 100, "gram_bias": 0.0,
              "precision": "fp32", "device": "cpu", "device_name": "cpu",
              "lostreg_version": "0.1.0", "git_commit": None}
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    with open(run_dir / "predictions.jsonl", "w") as handle:
        for i, hit in enumerate(hits):
            # image i: GT boxes of growing size so the object-size bins are populated
            side = 8 + 4 * (i % 10)
            gts = [[4.0 + j, 4.0, 4.0 + j + side, 4.0 + side] for j in range(n_objects + i % 3)]
            box = [4, 4, 4 + side, 4 + side] if hit else [60, 60, 63, 63]
            handle.write(json.dumps({
                "image_id": f"demo_{i:03d}", "file": f"JPEGImages/demo_{i:03d}.jpg",
                "width": 64, "height": 64, "box": box, "seed": [0, 0], "gt_boxes": gts,
                "best_iou": 0.9 if hit else 0.0, "hit": hit}) + "\n")
    metrics = {"run_id": name, "corloc": 100 * sum(hits) / len(hits), "n_images": len(hits),
               "n_hits": sum(hits), "smoke_run": smoke,
               "weights": "random" if smoke else "pretrained", "seconds": {"total": 2.0},
               "finished": "2026-01-01T00:00:00+00:00"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def execute(runs: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every cell with the venv's python3 kernel; return all text and markdown output."""
    monkeypatch.setenv("LOSTREG_RUNS", str(runs))
    # the kernel imports this checkout's lostreg, not whichever one the venv has installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(NOTEBOOK.parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error"
            texts.append(output.get("text", ""))
            data = output.get("data", {})
            texts += [data.get("text/markdown", ""), data.get("text/plain", "")]
    return "\n".join(texts)


def test_notebook_on_smoke_runs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "smoke-demo-a", [True, False, False, True, False, True] * 4,
              model="dinov2_vits14", timm_name="vit_small_patch14_dinov2.lvd142m", smoke=True)
    text = execute(runs, monkeypatch)
    assert "Only SMOKE runs" in text
    assert "1 runs from" in text
    assert "no register pairs among the runs" in text


def test_notebook_on_a_register_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, data = tmp_path / "runs", tmp_path / "data"
    (data / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 120, 60)).save(data / "JPEGImages" / "demo_001.jpg")
    base = [i % 3 == 0 for i in range(30)]
    other = [i % 3 != 2 for i in range(30)]  # 10 images miss -> hit, none hit -> miss
    write_run(runs, "demo-plain", base, model="dinov2_vits14",
              timm_name="vit_small_patch14_dinov2.lvd142m", data_root=data)
    write_run(runs, "demo-reg", other, model="dinov2_vits14_reg4",
              timm_name="vit_small_patch14_reg4_dinov2.lvd142m", registers=4, data_root=data)
    write_run(runs, "smoke-demo-x", base, model="dinov2_vitb14",
              timm_name="vit_base_patch14_dinov2.lvd142m", smoke=True)
    text = execute(runs, monkeypatch)
    assert "Only SMOKE runs" not in text
    assert "2 runs from" in text  # the smoke run is left out once real runs exist
    assert "33.3 → 66.7 (+33.3)" in text
    assert "dinov2_vits14 vs dinov2_vits14_reg4" in text
    assert "demo_001" in text  # a flipped image listed

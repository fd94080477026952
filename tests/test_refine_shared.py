"""The refined saliency runs of one pass share each image's decoded original and prepared
bilateral solver (``mask_lines.ImageRefinement``), and still write exactly the lines they
write alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lostreg.methods.bilateral as bilateral
import lostreg.runs.sweep as sweep
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets.base import ImageRecord
from lostreg.datasets.mask_demo import generate_mask_tree
from lostreg.errors import LostregError
from lostreg.run import main
from lostreg.runs.mask_lines import ImageRefinement, refined

IMAGES = 5
SPEC = BackboneSpec("tiny_shared", "vit_small_patch16_224.dino", "dino", 16, 0,
                    pos_embed="dino", model_kwargs=dict(depth=2, embed_dim=48, num_heads=6))


def cli(root: Path, out: str, *extra: str) -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", "ecssd",
            "--data-root", str(root / "data"), "--output", str(root / out), "--num-workers", "0",
            "--no-progress", "--allow-partial-dataset", "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    BACKBONES[SPEC.name] = SPEC
    root = tmp_path_factory.mktemp("shared")
    generate_mask_tree(root / "data", "ecssd", IMAGES, seed=3, sizes=(40, 72))
    yield root
    BACKBONES.pop(SPEC.name, None)


def predictions(out: Path) -> dict[tuple[str, str], bytes]:
    found = {}
    for run_dir in out.iterdir():
        config = json.loads((run_dir / "config.json").read_text())
        found[(config["method"], config["refine"])] = (run_dir / "predictions.jsonl").read_bytes()
    return found


def counting(monkeypatch) -> dict[str, int]:
    """Count the solver's image halves and target halves built during a pass."""
    calls = {"prepare_solver": 0, "solve": 0}
    for name in calls:
        original = getattr(bilateral, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(bilateral, name, wrapped)
    return calls


@pytest.mark.parametrize("threads", [1, 3])
def test_refined_runs_of_one_pass_write_the_lines_they_write_alone(tree, monkeypatch,
                                                                    threads) -> None:
    """Four refined runs (LOST and TokenCut, soft and binary) and two plain ones in one pass,
    on one thread and on three: the solver's image half is built once per image, one solve
    serves a method's soft and binary runs, and every run's file is byte for byte the file
    the run writes in a pass of its own."""
    if threads == 1:  # the runs alone, once
        for method, refine in (("tokencut", "bilateral"), ("lost", "bilateral-binary")):
            assert main(cli(tree, f"alone-{method}-{refine}", "--method", method,
                            "--refine", refine)) == 0
    monkeypatch.setattr(sweep, "mask_threads", lambda device_type: threads)
    calls = counting(monkeypatch)
    out = f"together-{threads}"
    assert main(cli(tree, out, "--method", "lost,tokencut",
                    "--refine", "none,bilateral,bilateral-binary")) == 0
    assert calls["prepare_solver"] == IMAGES  # not 4 x IMAGES
    assert IMAGES <= calls["solve"] <= 2 * IMAGES  # one per distinct target, not 4 per image
    together = predictions(tree / out)
    assert len(together) == 6
    for method, refine in (("tokencut", "bilateral"), ("lost", "bilateral-binary")):
        (alone,) = predictions(tree / f"alone-{method}-{refine}").values()
        assert together[(method, refine)] == alone
    assert together[("tokencut", "bilateral")] != together[("tokencut", "none")]


def test_image_refinement_gives_a_fresh_solves_arrays(tmp_path, monkeypatch) -> None:
    """Soft output and corrected binary mask equal ``bilateral_refine``'s bit for bit; a
    second run with the same target reuses the solve (read-only), another target solves
    again on the same prepared image; a mask of another size is one clear line."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    pixels[8:22, 10:30] = (200, 40, 40)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    record = ImageRecord(image_id="image", path=path, width=44, height=30, boxes=())
    first, second = np.zeros((30, 44)), np.zeros((30, 44))
    first[6:20, 8:28] = 1.0
    second[10:24, 12:32] = 1.0
    calls = counting(monkeypatch)
    shared = ImageRefinement(record, 10**6)
    soft = refined(record, first, "bilateral", 10**6, shared)
    binary = refined(record, first.copy(), "bilateral-binary", 10**6, shared)
    other = refined(record, second, "bilateral", 10**6, shared)
    assert calls == {"prepare_solver": 1, "solve": 2} and len(shared._solved) == 2
    assert np.array_equal(soft, bilateral.bilateral_refine(pixels, first).soft)
    assert not soft.flags.writeable
    largest = bilateral.bilateral_refine(pixels, first, component_rule="largest").binary
    assert np.array_equal(binary, largest.astype(np.float64))
    assert np.array_equal(other, bilateral.bilateral_refine(pixels, second).soft)
    assert np.array_equal(refined(record, first, "bilateral", 10**6), soft)  # unshared
    with pytest.raises(LostregError, match="masks of 40x30 and 44x30 for one image"):
        refined(record, np.zeros((30, 40)), "bilateral", 10**6, shared)
    with pytest.raises(LostregError, match="decodes to 44x30, its mask was upsampled to 40x30"):
        refined(record, np.zeros((30, 40)), "bilateral", 10**6)


def test_bench_saliency_refine_all_runs_four_refined_runs(tree, tmp_path) -> None:
    """``bench_saliency.py --refine all``: LOST and TokenCut each plain, soft and binary."""
    from benchmarks import bench_saliency

    assert bench_saliency.main(["--model", SPEC.name, "--images", "2", "--sides", "40,48",
                                "--size-scale", "1", "--num-workers", "0", "--refine", "all",
                                "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["runs"]) == {f"{m}/{r}" for m in ("lost", "tokencut")
                                   for r in ("none", "bilateral", "bilateral-binary")} | {
        "dinoseg/none"}

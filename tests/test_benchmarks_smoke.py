"""Keep the benchmarks in ``benchmarks/`` from rotting: each one's core runs on a tiny input.

These tests check the correctness parts only (paths give identical boxes, reruns equal
uncached runs, the memory child reports real numbers); they never assert a timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import (  # noqa: E402
    bench_cache,
    bench_extraction,
    bench_lost,
    bench_memory,
    bench_precision,
)
from benchmarks.common import sample_sizes, write_voc_tree  # noqa: E402
from lostreg.backbones import BackboneSpec, create_backbone  # noqa: E402
from lostreg.features.extract import padded_size  # noqa: E402
from lostreg.methods.lost import lost_reference  # noqa: E402

CPU = torch.device("cpu")
TINY = BackboneSpec("tiny_bench", "vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0,
                    pos_embed="dinov2", model_kwargs=dict(depth=2, embed_dim=64, num_heads=2))
# a real timm model small enough for child processes (no registry entry needed there)
TIMM_TINY = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def tiny_backbone():
    return create_backbone(TINY, "random", CPU)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    return write_voc_tree(root / "data", sample_sizes(7, seed=3, scale=0.12), seed=3)


def test_generated_sizes_and_tree_are_voc_like(tiny_tree) -> None:
    sizes = sample_sizes(200, seed=1)
    assert all(max(h, w) == 500 for h, w in sizes)  # VOC's long side
    assert sizes.count((375, 500)) > 40  # the most common VOC shape dominates
    assert sample_sizes(200, seed=1) == sizes  # repeatable
    assert len(tiny_tree.records) == 7
    for record in tiny_tree.records:
        assert record.path.is_file() and record.boxes
        for x1, y1, x2, y2 in record.boxes:
            assert 0 <= x1 < x2 <= record.width and 0 <= y1 < y2 <= record.height


@pytest.mark.parametrize(("kind", "gram_bias", "k_patches"),
                         [("structured", 0.0, 100), ("noise", 0.0, 7), ("noise", -3.0, 20)])
def test_lost_paths_give_identical_boxes(kind, gram_bias, k_patches) -> None:
    sizes = sample_sizes(10, seed=2, scale=0.15) + [(5, 40), (40, 5)]  # one-patch-wide images
    batches = bench_lost.make_batches(sizes, 16, 24, 4, CPU, seed=2, kind=kind)
    grids = {b.grid for b in batches}
    assert all(b.feats.shape == (len(b.positions), b.grid[0] * b.grid[1], 24) for b in batches)
    assert {tuple(d // 16 for d in padded_size(h, w, 16)) for h, w in sizes} == grids
    preds = {name: bench_lost.PATHS[name](batches, 16, k_patches, gram_bias)
             for name in ("batched", "reference", "literal", "bf16_filter")}
    counts = bench_lost.agreement(preds)
    for name in ("batched", "literal", "bf16_filter"):
        assert counts[name]["same_both"] == len(sizes), (name, counts[name])


def test_bf16_margin_bounds_the_cosine_error_and_filters_separated_features() -> None:
    """The certified margin must exceed the bf16 cosine's real error (else a sign could flip
    unseen), and features far from orthogonal leave few rows to recompute exactly."""
    generator = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 300, 384, generator=generator) * torch.rand(4, 300, 1, generator=generator)
    unit = feats / feats.norm(dim=-1, keepdim=True)
    approx = torch.bmm(unit.bfloat16(), unit.bfloat16().transpose(1, 2)).double()
    exact = torch.bmm(unit.double(), unit.double().transpose(1, 2))
    assert float((approx - exact).abs().max()) < bench_lost.BF16_MARGIN
    # two tight clusters pointing apart: every cosine is far from 0, so nothing is ambiguous
    direction = torch.randn(384, generator=generator)
    clusters = torch.where(torch.arange(120).view(1, -1, 1) < 30, -direction, direction)
    separated = clusters + 0.05 * torch.randn(2, 120, 384, generator=generator)
    out = bench_lost.lost_bf16_filter(separated, (10, 12), 16, [(160, 192)] * 2, k_patches=10)
    reference = [lost_reference(f, (10, 12), 16, (160, 192), k_patches=10) for f in separated]
    assert out.seed.tolist() == [r.seed for r in reference]
    assert out.box.tolist() == [r.box for r in reference]
    assert int((out.degrees >= 0).sum(dim=1).max()) <= 30  # only the small cluster's rows


def test_lost_structured_features_plant_a_findable_object() -> None:
    """The generated features make LOST's seed land on the planted object, like real keys."""
    generator = torch.Generator().manual_seed(0)
    feats = bench_lost.synthetic_features((24, 32), (375, 500), 16, 64, generator)
    seed = bench_lost.lost_reference(feats, (24, 32), 16, (375, 500)).seed
    # object patches point away from the background direction: their mean differs
    background = feats.mean(dim=0)
    assert float(feats[seed] @ background) < 0


def test_lost_measure_and_cli(capsys) -> None:
    sizes = sample_sizes(6, seed=0, scale=0.1)
    batches = bench_lost.make_batches(sizes, 16, 16, 3, CPU)
    result = bench_lost.measure(batches, 16, 100, 0.0, CPU,
                                ["batched", "reference", "gram_only"], 2)
    assert result["n_images"] == 6
    assert all(len(v) == 2 and min(v) > 0 for v in result["seconds"].values())
    assert result["predictions"]["batched"] == result["predictions"]["reference"]
    code = bench_lost.main(["--images", "6", "--dim", "16", "--size-scale", "0.1", "--rounds", "1",
                            "--profile"])
    out = capsys.readouterr().out
    assert code == 0
    assert "batched: same box+seed as reference   : 6/6" in out
    assert "SPEEDUP batched vs reference" in out and "connected component" in out
    assert bench_lost.main(["--paths", "batched,nope"]) == 2


def test_extraction_run_does_the_same_work_as_the_bare_loop(tiny_tree, tiny_backbone,
                                                            tmp_path) -> None:
    result = bench_extraction.measure(tiny_tree, tiny_backbone, CPU, tmp_path, batch_size=3,
                                      num_workers=0, repeats=1, check=True)
    n = len(tiny_tree.records)
    assert result["n_images"] == n
    assert result["same_boxes"] == (n, n)
    batches = bench_extraction.prepare_batches(tiny_tree, tiny_backbone, 3)
    assert sorted(p for b in batches for p in b.positions) == list(range(n))
    for batch in batches:  # one padded size per batch, as lostreg.run batches
        assert batch.images.shape[0] == len(batch.positions) <= 3
        assert all(padded_size(h, w, 14) == tuple(batch.images.shape[-2:]) for h, w in batch.sizes)


def test_cache_reruns_skip_the_backbone_and_match_uncached_runs(tiny_tree, tmp_path) -> None:
    config = bench_cache.cache_config(tiny_tree, TIMM_TINY, "random", "cpu", tmp_path, 4, "fp32",
                                      0)
    result = bench_cache.measure(tiny_tree, config, rerun_k=3, rerun_bias=0.5, check=True)
    n = len(tiny_tree.records)
    assert result["rerun_backbone_images"] == {"rerun_k": 0, "rerun_bias": 0}
    assert result["run_seconds"]["first"]["backbone_images"] == n
    assert result["same_boxes_as_uncached"] == {"rerun_k": (n, n), "rerun_bias": (n, n)}


def test_memory_child_reports_peak_rss(tmp_path) -> None:
    # one child only: each costs an interpreter start (the ratio logic is plain division)
    results = bench_memory.measure(tmp_path, [5], model=TIMM_TINY, batch_size=2,
                                   num_workers=0, scale=0.05)
    assert results[5]["n_images"] == 5
    assert results[5]["peak_rss_mib"] > 100  # torch + a model are loaded: a real number


def test_precision_compare_counts_changes(tiny_tree, tiny_backbone, tmp_path) -> None:
    def line(box, seed=(0, 0), hit=False):
        return {"box": box, "seed": list(seed), "hit": hit}

    base = {"a": line([0, 0, 10, 10]), "b": line([0, 0, 4, 4], hit=True), "c": line([1, 1, 2, 2])}
    other = {"a": line([0, 0, 10, 10], (1, 0)), "b": line([0, 0, 4, 2]), "c": line([1, 1, 2, 2])}
    got = bench_precision.compare(base, other)
    assert (got["box_differs"], got["seed_differs"], got["hits_delta"]) == (1, 1, -1)
    assert got["share_box_differs"] == pytest.approx(1 / 3)
    assert got["mean_iou_of_changed"] == pytest.approx(0.5)

    result = bench_precision.measure(tiny_tree, tiny_backbone, tmp_path, "cpu",
                                     ["fp32", "bf16"], batch_size=4, num_workers=0)
    share = result["vs_fp32"]["bf16"]
    assert share["images"] == len(tiny_tree.records)
    assert 0 <= share["share_box_differs"] <= 1


def test_pipeline_benchmark_gives_identical_predictions_across_worker_counts(tmp_path) -> None:
    from benchmarks import bench_pipeline

    index = write_voc_tree(tmp_path / "data", sample_sizes(4, seed=2, scale=0.2), seed=2)
    result = bench_pipeline.measure(index, CPU, tmp_path, batch_size=2, workers=[0, 1],
                                    repeats=1)
    assert result["identical"] and result["n_images"] == 4
    seconds = result["results"][0]["seconds"][0]
    assert {"load_wait", "transfer", "features", "method", "write"} <= set(seconds)
    assert all(seconds[k] >= 0 for k in ("load_wait", "features", "method", "write"))


def test_methods_and_fingerprint_benchmarks_run_on_tiny_inputs(tmp_path, capsys) -> None:
    from benchmarks import bench_fingerprint, bench_methods

    assert bench_methods.main(["--images", "2", "--size-scale", "0.2", "--threads", "1",
                               "--device", "cpu"]) == 0
    assert bench_fingerprint.main(["--images", "3", "--rounds", "1",
                                   "--workdir", str(tmp_path / "fp")]) == 0
    assert "RATIO" in capsys.readouterr().out

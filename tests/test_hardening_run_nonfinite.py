"""Issue 20, row 1: non-finite features gave boxes, exit 0 and a non-smoke run. Now every feature
map is checked on the device once per batch; an image with a NaN or inf value gets no
prediction (a ``nonfinite`` line, scored as a failure), the run stops with one line when there
are more such images than ``--max-nonfinite`` (default 0), and a finished run names them in
``metrics.json``. LOST, TokenCut and DINO-seg; computed and cached features; box and mask runs;
reduced precision says which images overflowed and suggests ``--precision fp32``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY, tiny_command

from lostreg.backbones import build_model
from lostreg.datasets.demo import generate_demo
from lostreg.datasets.mask_demo import generate_mask_tree
from lostreg.evaluation.rle import foreground
from lostreg.features import pipeline
from lostreg.features.pipeline import FeatureBatch, finite_images
from lostreg.io import read_jsonl
from lostreg.reports.leaderboard.saliency_runs import scan_mask_runs
from lostreg.run import main
from lostreg.runs.nonfinite import NAMED_IN_METRICS, nonfinite_fields
from lostreg.runs.store import load_run
from lostreg.runs.summaries import scan_summaries

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ["--method", "lost,tokencut,dinoseg"]
POISONED = {1, 3}  # dataset positions whose features are made non-finite



@pytest.fixture
def poison(monkeypatch):
    """Put one non-finite value (``poison["value"]``) into the feature map of each image at
    ``poison["positions"]``, as a broken checkpoint or an overflowing fp16 forward would."""
    state = {"positions": set(POISONED), "value": math.nan}
    real = pipeline.FeatureSource._forward

    def forward(self, backbone, positions, group, needs):
        out = []
        for batch in real(self, backbone, positions, group, needs):
            feats = batch.feats.clone()
            for j, position in enumerate(batch.positions):
                if position in state["positions"]:
                    feats[j, (5 * j) % feats.shape[1], j % feats.shape[2]] = state["value"]
            out.append(FeatureBatch(batch.request, feats, batch.grid, batch.positions,
                                    batch.sizes))
        return out

    monkeypatch.setattr(pipeline.FeatureSource, "_forward", forward)
    return state


def folders(runs: Path) -> dict[str, Path]:
    """Run folders by method."""
    return {json.loads((f / "config.json").read_text())["method"]: f for f in runs.iterdir()}


def lines(run_dir: Path) -> list[dict]:
    return list(read_jsonl(run_dir / "predictions.jsonl"))


def test_the_check_flags_exactly_the_images_with_a_non_finite_value() -> None:
    feats = torch.zeros(5, 6, 4)
    feats[1, 2, 3], feats[2, 0, 0], feats[3, 5, 1] = math.nan, math.inf, -math.inf
    feats[4] = 3e38  # large but finite
    assert finite_images(feats).tolist() == [True, False, False, False, True]
    assert finite_images(torch.zeros(0, 6, 4)).tolist() == []


def test_non_finite_features_give_no_box_and_stop_the_run(tmp_path, tiny_model, poison,
                                                          capsys) -> None:
    generate_demo(tmp_path / "data")
    poison["positions"] = set()
    assert main(tiny_command(tmp_path / "data", tmp_path / "clean", *METHODS, limit=6)) == 0
    poison["positions"] = set(POISONED)
    capsys.readouterr()
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs", *METHODS, limit=6)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert "non-finite" in err[-1] and "--max-nonfinite 2" in err[-1], err[-1]
    assert "(and 2 more runs)" in err[-1]  # all three runs refused in one line
    clean, runs = folders(tmp_path / "clean"), folders(tmp_path / "runs")
    for method in ("lost", "tokencut", "dinoseg"):
        assert not (runs[method] / "metrics.json").exists(), method
        got, want = lines(runs[method]), lines(clean[method])
        for position, (line, reference) in enumerate(zip(got, want, strict=True)):
            if position in POISONED:  # no box, no seed, a miss: never a silent box
                assert line["nonfinite"] is True and line["box"] is None, (method, line)
                assert (line["seed"], line["hit"], line["best_iou"]) == (None, False, 0.0)
                assert line["image_id"] == reference["image_id"]
            else:  # one image's NaN changes no other image's prediction
                assert line == reference, (method, position)
        files = [line["file"] for line in got if line.get("nonfinite")]
        if method == "lost":  # the first refused run (in the pass's order) names its images
            assert f"{runs[method]}: 2 of 6 images have non-finite k features (NaN or inf" \
                in err[-1]
            assert all(file in err[-1] for file in files)

    # allowed: the same command finishes from the saved lines, counting them as failures
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs", *METHODS, "--max-nonfinite",
                             "2", limit=6)) == 0
    captured = capsys.readouterr()
    for method, run_dir in runs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        reference = json.loads((clean[method] / "metrics.json").read_text())
        ids = [line["image_id"] for line in lines(run_dir) if line.get("nonfinite")]
        assert metrics["nonfinite_images"] == 2 and metrics["nonfinite_examples"] == ids
        assert metrics["max_nonfinite"] == 2 and "nonfinite_note" not in metrics
        assert metrics["n_images"] == 6 and metrics["seconds"]["images_computed"] == 0
        lost_hits = sum(line["hit"] for p, line in enumerate(lines(clean[method]))
                        if p in POISONED)
        assert metrics["n_hits"] == reference["n_hits"] - lost_hits
        config = json.loads((run_dir / "config.json").read_text())
        assert config["max_nonfinite"] == 2 and config["settings"]["max_nonfinite"] == 2
        board = load_run(run_dir).summary  # the leaderboard's reader takes the no-box lines
        assert (board["n"], board["n_hits"]) == (6, metrics["n_hits"])
    scanned, _ = scan_summaries(tmp_path / "runs", include_smoke=True, report=None)
    assert scanned.skipped == [] and len(scanned.runs) == 3  # the leaderboard reads them
    for run in scanned.runs:
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        assert (run.summary["n"], run.summary["n_hits"]) == (6, metrics["n_hits"])
    summaries = [line for line in captured.out.splitlines() if line.startswith("CorLoc")]
    assert len(summaries) == 3
    assert all("[2 image(s) with non-finite features scored as failures]" in line
               for line in summaries)
    assert captured.err.count("had non-finite features: no prediction for them") == 3


def test_reduced_precision_names_the_overflow_and_suggests_fp32(tmp_path, tiny_model, poison,
                                                               capsys) -> None:
    generate_demo(tmp_path / "data")
    poison["value"] = math.inf
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs", "--precision", "bf16",
                             limit=5)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the backbone overflowed under --precision bf16 on 2 of 5 images (k features not " \
           "finite: " in err
    assert "rerun with --precision fp32, or with --max-nonfinite 2" in err
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs", "--precision", "bf16",
                             "--max-nonfinite", "5", limit=5)) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["nonfinite_note"].startswith("the backbone overflowed under --precision bf16 "
                                                "on 2 image(s)")
    assert "--precision fp32 avoids it" in capsys.readouterr().err


def scaled_weights(path: Path, scale: float | None = None, nan: bool = False) -> Path:
    """The tiny model's seeded random weights with the last block's qkv weight scaled (keys
    too large for fp16 on some images) or holding one NaN (every image's keys NaN)."""
    torch.manual_seed(0)
    state = build_model(TINY).state_dict()
    if scale is not None:
        state["blocks.1.attn.qkv.weight"] *= scale
    if nan:
        state["blocks.1.attn.qkv.weight"][60, 7] = math.nan  # a key channel (rows 48..95)
    torch.save(state, path)
    return path


def with_weights(argv: list[str], weights: Path) -> list[str]:
    argv = list(argv)
    argv[argv.index("random")] = str(weights)
    return argv


def test_a_real_fp16_overflow_is_caught_and_fp32_runs_clean(tmp_path, tiny_model, capsys) -> None:
    """Weights large enough that fp16 keys overflow on some images (not all), and not in fp32:
    the probe's case, without any patching."""
    generate_demo(tmp_path / "data")
    weights = scaled_weights(tmp_path / "big.pth", scale=1e5)
    argv = with_weights(tiny_command(tmp_path / "data", tmp_path / "runs", limit=24), weights)
    assert main([*argv, "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the backbone overflowed under --precision fp16 on " in err
    (fp16,) = (tmp_path / "runs").iterdir()
    bad = [line for line in lines(fp16) if line.get("nonfinite")]
    assert 0 < len(bad) < 24 and all(line["box"] is None for line in bad)
    assert f"on {len(bad)} of 24 images" in err and bad[0]["file"] in err
    assert main(argv) == 0  # fp32: a run of its own, every feature finite
    fp32 = next(f for f in (tmp_path / "runs").iterdir() if f != fp16)
    assert json.loads((fp32 / "metrics.json").read_text())["nonfinite_images"] == 0


def test_a_cached_nan_is_as_bad_and_a_nan_checkpoint_stops_every_method(tmp_path, tiny_model,
                                                                       model_builds,
                                                                       capsys) -> None:
    generate_demo(tmp_path / "data")
    weights = scaled_weights(tmp_path / "nan.pth", nan=True)
    cache = ["--cache-features", str(tmp_path / "cache")]
    argv = with_weights(tiny_command(tmp_path / "data", tmp_path / "runs", *METHODS, *cache,
                                     limit=4), weights)
    assert main(argv) == 2
    assert "4 of 4 images have non-finite" in capsys.readouterr().err
    assert model_builds == [TINY.name]
    # another LOST setting reads the keys from the cache: the model is not built, the cached
    # NaN keys are flagged the same way
    assert main([*argv, "--k-patches", "50", "--method", "lost"]) == 2
    assert model_builds == [TINY.name]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lost-keys-k50" in err and "4 of 4 images have non-finite k features" in err
    assert main([*argv, "--k-patches", "50", "--method", "lost", "--max-nonfinite", "4"]) == 0
    k50 = next(f for f in (tmp_path / "runs").iterdir() if "-k50-" in f.name)
    metrics = json.loads((k50 / "metrics.json").read_text())
    assert (metrics["corloc"], metrics["nonfinite_images"]) == (0.0, 4)
    assert model_builds == [TINY.name]  # the k50 run's features all came from the cache


def test_a_mask_run_scores_a_non_finite_image_as_an_empty_mask(tmp_path, tiny_model, poison,
                                                              capsys) -> None:
    generate_mask_tree(tmp_path / "data", "ecssd", 4, seed=1, sizes=(40, 72))
    argv = tiny_command(tmp_path / "data", tmp_path / "runs", "--allow-partial-dataset",
                        limit=4)
    argv[argv.index("demo")] = "ecssd"
    assert main(argv) == 2
    assert "2 of 4 images have non-finite k features" in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    for position, line in enumerate(lines(run_dir)):
        assert (line.get("nonfinite") is True) == (position in POISONED)
        if position in POISONED:  # no box, and scored as the empty mask
            assert line["box"] is None and foreground(line["pred_mask_rle"]) == 0, line
    assert main([*argv, "--max-nonfinite", "2"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["nonfinite_images"] == 2 and metrics["n_images"] == 4
    scanned = scan_mask_runs(tmp_path / "runs", include_smoke=True, report=None)
    assert scanned.skipped == [] and len(scanned.runs) == 1  # the saliency reports read it


def test_lines_from_a_rank_part_are_counted_as_well(tmp_path, tiny_model, poison, capsys) -> None:
    """Under torchrun each rank appends to its own part; rank 0 merges and counts. A part
    holding the non-finite lines is counted like the merged file."""
    generate_demo(tmp_path / "data")
    argv = tiny_command(tmp_path / "data", tmp_path / "runs", limit=5)
    assert main(argv) == 2
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run_dir / "predictions.jsonl").rename(run_dir / "predictions.rank1.jsonl")
    capsys.readouterr()
    assert main(argv) == 2  # merged from the part, counted again: still refused
    assert "2 of 5 images have non-finite k features" in capsys.readouterr().err
    assert not (run_dir / "predictions.rank1.jsonl").exists()


def test_a_null_box_needs_the_nonfinite_mark_and_the_mark_no_box(tmp_path, tiny_model,
                                                                capsys) -> None:
    """A line edited to drop its box (or to give a nonfinite image one) is bad: quarantined,
    and the image recomputed."""
    generate_demo(tmp_path / "data")
    argv = tiny_command(tmp_path / "data", tmp_path / "runs", limit=3)
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    original = (run_dir / "predictions.jsonl").read_bytes()
    for change in ({"box": None}, {"nonfinite": True}, {"box": None, "nonfinite": True,
                                                         "seed": [0, 0]}):
        edited = lines(run_dir)
        edited[1].update(change)
        (run_dir / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in edited))
        (run_dir / "metrics.json").unlink()
        assert main(argv) == 0
        assert "repaired 1 bad line(s)" in capsys.readouterr().err, change
        assert (run_dir / "predictions.jsonl").read_bytes() == original


def test_metrics_name_a_bounded_number_of_images(tmp_path) -> None:
    many = [{"image_id": f"{i:04d}", "file": f"{i}.jpg", "nonfinite": True} for i in range(50)]
    fields = nonfinite_fields(many, tmp_path, {"precision": "fp32", "feature": "k"}, 50)
    assert fields["nonfinite_images"] == 50
    assert fields["nonfinite_examples"] == [f"{i:04d}" for i in range(NAMED_IN_METRICS)]

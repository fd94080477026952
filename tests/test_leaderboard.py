"""Leaderboard, register pairing and comparison tables on generated run folders (no models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from lostreg import leaderboard as lb
from lostreg import stats
from lostreg.errors import LostregError

GT = [10.0, 10.0, 60.0, 50.0]  # a 50x40 box in a 100x80 image: area share 0.25
HIT_BOX, MISS_BOX = [12, 11, 60, 50], [70, 60, 99, 79]


def write_run(root: Path, name: str, hits, *, model: str = "dinov2_vits14",
              timm_name: str = "vit_small_patch14_dinov2.lvd142m", family: str = "dinov2",
              registers: int = 0, dataset: str = "voc07", feature: str = "k",
              precision: str = "fp32", limit: int | None = None, smoke: bool = False,
              finished: str = "2026-01-02T00:00:00+00:00", image_ids=None,
              sha: str = "ab" * 32, finish: bool = True) -> Path:
    """A run folder in the format lostreg.run writes, with the given per-image hits."""
    hits = [bool(h) for h in hits]
    ids = image_ids or [f"{i:06d}" for i in range(len(hits))]
    identity = {"lostreg_version": "0.1.0", "model": model, "timm_name": timm_name,
                "pos_embed": "timm", "weights": "random" if smoke else f"sha256:{sha}",
                "dataset": dataset, "split": "trainval", "no_hard": False, "limit": limit,
                "feature": feature, "k_patches": 100, "gram_bias": 0.0, "precision": precision}
    weights = {"source": "random" if smoke else "hub", "path": None,
               "sha256": None if smoke else sha, "hub_id": None}
    config = {"run_id": name, "identity": identity, "settings": {}, "model": model,
              "timm_name": timm_name, "family": family, "patch_size": 14,
              "num_registers": registers, "num_params": 1234, "weights": weights,
              "smoke_run": smoke, "dataset": dataset, "split": "trainval",
              "data_root": str(root / "data"), "no_hard": False, "feature": feature,
              "k_patches": 100, "gram_bias": 0.0, "precision": precision, "device": "cpu",
              "device_name": "cpu", "lostreg_version": "0.1.0", "git_commit": "abc123",
              "created": "2026-01-01T00:00:00+00:00"}
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    lines = []
    for image_id, hit in zip(ids, hits, strict=True):
        line = {"image_id": image_id, "file": f"JPEGImages/{image_id}.jpg", "width": 100,
                "height": 80, "box": HIT_BOX if hit else MISS_BOX, "seed": [1, 1],
                "gt_boxes": [GT], "best_iou": 0.8 if hit else 0.0, "hit": hit}
        if smoke:
            line["weights"] = "random"
        lines.append(json.dumps(line) + "\n")
    (run_dir / "predictions.jsonl").write_text("".join(lines))
    if finish:
        metrics = {"run_id": name, "corloc": 100 * sum(hits) / len(hits), "n_images": len(hits),
                   "n_hits": sum(hits), "smoke_run": smoke,
                   "weights": "random" if smoke else "pretrained",
                   "seconds": {"total": 1.5}, "finished": finished, "model": model,
                   "dataset": dataset, "feature": feature}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


REG = {"model": "dinov2_vits14_reg4", "timm_name": "vit_small_patch14_reg4_dinov2.lvd142m",
       "registers": 4}


def pair_hits(b: int, c: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    """base/other hits with b miss->hit and c hit->miss images."""
    base = [False] * b + [True] * c + [True] * both + [False] * neither
    other = [True] * b + [False] * c + [True] * both + [False] * neither
    return base, other


def read_board(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "leaderboard.csv")


def test_leaderboard_columns_corloc_and_ci(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    hits = [True] * 30 + [False] * 10
    write_run(runs, "a", hits)
    write_run(runs, "b", [True] * 25, dataset="voc12")
    write_run(runs, "unfinished", [True] * 5, dataset="coco20k", finish=False)
    table = lb.build_leaderboard(runs, out)
    board = read_board(out)
    assert list(board.columns) == lb.LEADERBOARD_COLUMNS
    assert len(board) == len(table) == 2  # the run without metrics.json is not listed
    row = board.set_index("run_id").loc["a"]
    assert (row["corloc"], row["n_hits"], row["n_images"]) == (75.0, 30, 40)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        stats.bootstrap_corloc_ci(np.array(hits)), abs=1e-4)
    assert row["ci_low"] < 75.0 < row["ci_high"]
    all_hits = board.set_index("run_id").loc["b"]
    assert (all_hits["corloc"], all_hits["ci_low"], all_hits["ci_high"]) == (100.0, 100.0, 100.0)
    assert row["weights_sha256"] == "ab" * 32 and row["weights_source"] == "hub"
    assert row["device"] == "cpu" and row["seconds"] == 1.5 and not row["smoke"]
    assert list(board["dataset"]) == ["voc07", "voc12"]
    for name in ("comparison.csv", "comparison.md", "figures/corloc_registers.png",
                 "figures/iou/a.png", "figures/iou/b.png"):
        assert (out / name).is_file(), name


def test_identical_settings_are_one_row_newest_wins(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    # "z-old" sorts after "a-new" on disk: the choice must follow 'finished', not folder order
    write_run(runs, "z-old", [True] * 4 + [False] * 6, finished="2026-01-01T00:00:00+00:00")
    write_run(runs, "a-new", [True] * 8 + [False] * 2, finished="2026-03-01T00:00:00+00:00")
    write_run(runs, "other-precision", [True] * 5 + [False] * 5, precision="bf16")
    board = lb.build_leaderboard(runs, out)
    assert sorted(board["run_id"]) == ["a-new", "other-precision"]
    assert board.set_index("run_id").loc["a-new", "n_hits"] == 8
    assert len(read_board(out)) == 2


def test_smoke_runs_excluded_or_flagged(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "real", [True, False, True])
    write_run(runs, "smoke-x", [False, False, True], smoke=True)
    assert list(lb.build_leaderboard(runs, tmp_path / "a")["run_id"]) == ["real"]
    assert not (tmp_path / "a" / "figures" / "iou" / "smoke-x.png").exists()
    board = lb.build_leaderboard(runs, tmp_path / "b", include_smoke=True).set_index("run_id")
    assert bool(board.loc["smoke-x", "smoke"]) and not bool(board.loc["real", "smoke"])
    assert read_board(tmp_path / "b")["smoke"].tolist().count(True) == 1


def test_register_pair_statistics(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, other = pair_hits(b=12, c=3, both=20, neither=15)
    ids = [f"img{i:03d}" for i in range(len(base))]
    write_run(runs, "plain", base, image_ids=ids)
    # the twin's predictions come in another order: pairing must join on image_id
    order = np.random.default_rng(0).permutation(len(ids))
    write_run(runs, "reg", [other[i] for i in order], image_ids=[ids[i] for i in order], **REG)
    # not twins: other feature, or other dataset
    write_run(runs, "reg-v", other, feature="v", **REG)
    write_run(runs, "plain-voc12", base, dataset="voc12")
    lb.build_leaderboard(runs, out)
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison.columns) == lb.COMPARISON_COLUMNS
    pairs = comparison[comparison["run_id_reg"].notna()]
    assert len(pairs) == 1
    row = pairs.iloc[0]
    assert (row["run_id"], row["run_id_reg"], row["dataset"]) == ("plain", "reg", "voc07")
    assert row["corloc"] == pytest.approx(100 * 23 / 50)
    assert row["corloc_reg"] == pytest.approx(100 * 32 / 50)
    assert row["diff"] == pytest.approx(18.0)
    assert (row["miss_to_hit"], row["hit_to_miss"], row["n_paired"]) == (12, 3, 50)
    hand = 2 * sum(math.comb(15, i) for i in range(4)) / 2**15
    assert row["mcnemar_p"] == pytest.approx(hand, rel=1e-3)
    assert row["mcnemar_p"] == pytest.approx(
        mcnemar([[20, 3], [12, 15]], exact=True).pvalue, rel=1e-3)
    low, high = stats.paired_bootstrap_diff_ci(np.array(base), np.array(other))
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((low, high), abs=1e-4)
    # the twin-less runs are still in the leaderboard
    assert len(read_board(out)) == 4
    markdown = (out / "comparison.md").read_text()
    assert "46.0 → 64.0 (+18.0)" in markdown
    assert "dinov2_vits14 vs dinov2_vits14_reg4" in markdown


def test_published_figures_beside_ours(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, other = pair_hits(b=6, c=2, both=10, neither=2)
    write_run(runs, "l14", base, model="dinov2_vitl14",
              timm_name="vit_large_patch14_dinov2.lvd142m")
    write_run(runs, "l14-reg", other, model="dinov2_vitl14_reg4",
              timm_name="vit_large_patch14_reg4_dinov2.lvd142m", registers=4)
    write_run(runs, "deit", [True, False, False, False], model="deit3_vitb16",
              timm_name="deit3_base_patch16_224.fb_in22k_ft_in1k", family="deit3",
              feature="v")
    write_run(runs, "dino-s16", [True, True, False, True], model="dino_vits16",
              timm_name="vit_small_patch16_224.dino", family="dino")
    lb.build_leaderboard(runs, out)
    comparison = pd.read_csv(out / "comparison.csv")
    ours = comparison[(comparison["run_id"] == "l14")].iloc[0]
    assert (ours["published_corloc"], ours["published_corloc_reg"]) == (35.3, 55.4)
    assert ours["corloc"] == pytest.approx(60.0) and ours["corloc_reg"] == pytest.approx(80.0)
    # published-only rows keep their own figures, ours left empty
    only = comparison[comparison["run_id"].isna() & (comparison["model"] == "dinov2_vitl14")]
    assert set(only["dataset"]) == {"voc12", "coco20k"}
    assert only["corloc"].isna().all()
    deit = comparison[comparison["run_id"] == "deit"].iloc[0]
    assert deit["corloc"] == 25.0 and math.isnan(deit["corloc_reg"])
    assert deit["published_corloc"] == 11.7
    markdown = (out / "comparison.md").read_text()
    dinov2_line = next(line for line in markdown.splitlines()
                       if "dinov2_vitl14 vs dinov2_vitl14_reg4" in line)
    cells = [cell.strip() for cell in dinov2_line.strip("|").split("|")]
    # VOC07 ours, VOC07 published, VOC12 ours, VOC12 published, ...
    assert cells[3:9] == ["60.0 → 80.0 (+20.0)", "35.3 → 55.4 (+20.1)", "",
                          "40.2 → 60.0 (+19.8)", "", "26.9 → 42.0 (+15.1)"]
    deit_line = next(line for line in markdown.splitlines() if "deit3_vitb16 only" in line)
    assert "25.0 → —" in deit_line and "11.7 → 27.1 (+15.4)" in deit_line
    assert any(line.startswith("| OpenCLIP (paper: OpenCLIP)") for line in markdown.splitlines())
    assert "Darcet et al." in markdown and "Siméoni et al." in markdown
    lost_line = next(line for line in markdown.splitlines()
                     if line.startswith("| DINO ViT-S/16 | dino_vits16"))
    assert "75.0 [" in lost_line and "61.9" in lost_line


def test_published_reference_file() -> None:
    published = lb.load_published()
    assert set(published["dataset"]) == set(lb.PAPER_DATASETS)
    assert published["source"].str.len().gt(0).all()
    lookup = published.set_index(["compare_with", "with_registers", "dataset"])["corloc"]
    assert lookup[("dino_vits16", False, "voc07")] == 61.9
    assert lookup[("dino_vitb16", False, "coco20k")] == 50.0
    assert lookup[("dinov2_vitl14", True, "voc12")] == 60.0
    assert lookup[("deit3_vitb16", True, "coco20k")] == 25.1
    assert published[published["family"] == "openclip"]["corloc"].isna().all()


def test_smoke_pairs_get_no_published_figures(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, other = pair_hits(2, 1, 3, 2)
    write_run(runs, "smoke-a", base, model="dinov2_vitl14",
              timm_name="vit_large_patch14_dinov2.lvd142m", smoke=True, dataset="demo")
    write_run(runs, "smoke-b", other, model="dinov2_vitl14_reg4",
              timm_name="vit_large_patch14_reg4_dinov2.lvd142m", registers=4, smoke=True,
              dataset="demo")
    lb.build_leaderboard(runs, out)
    assert not (pd.read_csv(out / "comparison.csv")["run_id"].notna()).any()
    lb.build_leaderboard(runs, out, include_smoke=True)
    comparison = pd.read_csv(out / "comparison.csv")
    smoke = comparison[comparison["run_id"] == "smoke-a"].iloc[0]
    assert smoke["smoke"] and smoke["run_id_reg"] == "smoke-b"
    assert math.isnan(smoke["published_corloc"])
    assert "SMOKE" in (out / "comparison.md").read_text()


def test_rebuild_is_idempotent_and_drops_stale_figures(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, other = pair_hits(5, 2, 10, 3)
    write_run(runs, "plain", base)
    write_run(runs, "reg", other, **REG)
    write_run(runs, "smoke-s", base, smoke=True)
    lb.build_leaderboard(runs, out, include_smoke=True)
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    lb.build_leaderboard(runs, out, include_smoke=True)
    second = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert first == second and len(first) == 7
    lb.build_leaderboard(runs, out)  # without smoke: its figure goes
    assert not (out / "figures" / "iou" / "smoke-s.png").exists()
    assert not list(out.rglob("*.tmp"))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, other = pair_hits(5, 2, 10, 3)
    write_run(runs, "plain", base)
    write_run(runs, "reg", other, **REG)
    assert lb.main(["--runs", str(runs), "--out", str(out)]) == 0
    assert "2 runs (0 smoke)" in capsys.readouterr().out
    assert len(read_board(out)) == 2
    assert lb.main(["--runs", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "runs folder not found" in capsys.readouterr().err


def test_bad_run_folders_name_the_file(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run_dir = write_run(runs, "r", [True, False])
    (run_dir / "metrics.json").write_text("{not json")
    with pytest.raises(LostregError, match=r"r/metrics.json: not readable JSON"):
        lb.collect(runs)
    write_run(runs / "x", "r2", [True, False, True])
    bad = runs / "x" / "r2"
    metrics = json.loads((bad / "metrics.json").read_text())
    (bad / "metrics.json").write_text(json.dumps({**metrics, "n_hits": 3}))
    with pytest.raises(LostregError, match="predictions.jsonl: 2/3 hits/images"):
        lb.collect(runs / "x")
    (bad / "metrics.json").write_text(json.dumps(metrics))
    (bad / "config.json").unlink()
    with pytest.raises(LostregError, match="config.json: missing"):
        lb.collect(runs / "x")


def test_object_size_and_count_columns(tmp_path: Path) -> None:
    run = lb.load_run(write_run(tmp_path, "r", [True, False]))
    assert run.predictions["area_share"].tolist() == [0.25, 0.25]
    assert run.predictions["n_objects"].tolist() == [1, 1]


def test_paper_suite() -> None:
    assert ("dino_vits16", "voc07") in lb.PAPER_SUITE
    assert ("dinov2_vitl14_reg4", "coco20k") in lb.PAPER_SUITE
    assert len(lb.PAPER_SUITE) == len(set(lb.PAPER_SUITE)) == 15
    assert {d for _, d in lb.PAPER_SUITE} == {"voc07", "voc12", "coco20k"}

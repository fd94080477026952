"""Leaderboard, register pairing and comparison tables on generated run folders (no models)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from run_folders import REG, pair_hits, write_run
from statsmodels.stats.contingency_tables import mcnemar

from lostreg.errors import LostregError
from lostreg.evaluation import stats
from lostreg.reports import leaderboard as lb


def read_board(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "leaderboard.csv")


def table_line(markdown: str, *needles: str) -> list[str]:
    """The cells of the one markdown table line that contains every needle."""
    (line,) = [line for line in markdown.splitlines()
               if line.startswith("|") and all(needle in line for needle in needles)]
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


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
    assert (row["method"], row["layer"], row["normalize"], row["pos_interp"]) == (
        "lost", -1, "none", "original")
    assert (row["k"], row["gram_bias"], row["test_time_registers"]) == (100, 0.0, 0)
    assert list(board["dataset"]) == ["voc07", "voc12"]
    for name in ("comparison.csv", "comparison.md", "figures/corloc_registers.png",
                 "figures/iou/a.svg", "figures/iou/b.svg"):
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
    assert (row["source"], row["registers"], row["method"]) == ("ours", "trained", "lost")
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
    cells = table_line(markdown, "dinov2_vits14 → dinov2_vits14_reg4", "| ours |")
    assert cells[3] == "trained registers" and cells[5] == "46.0 → 64.0 (+18.0)"
    assert cells[4].startswith("k, last layer, no added normalisation, k=100, bias=0, pos original")


def test_published_figures_are_rows_of_their_own(tmp_path: Path) -> None:
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
    ours = comparison[comparison["source"] == "ours"]
    assert set(ours["run_id"]) == {"l14", "deit", "dino-s16"}
    assert ours["paper"].isna().all() and ours["citation"].isna().all()
    published = comparison[comparison["source"] == "published"]
    assert published["run_id"].isna().all() and published["n_images"].isna().all()
    darcet = published[(published["paper"] == "registers") & (published["model"] == "dinov2_vitl14")
                       & (published["dataset"] == "voc07")].iloc[0]
    assert (darcet["corloc"], darcet["corloc_reg"], darcet["registers"]) == (35.3, 55.4, "trained")
    assert "keys" in darcet["protocol"] and "Darcet" in darcet["citation"]
    markdown = (out / "comparison.md").read_text()
    cells = table_line(markdown, "dinov2_vitl14 → dinov2_vitl14_reg4", "| ours |")
    assert cells[5:8] == ["60.0 → 80.0 (+20.0)", "", ""]
    cells = table_line(markdown, "published: registers", "DINOv2 ViT-L/14")
    assert cells[5:8] == ["35.3 → 55.4 (+20.1)", "40.2 → 60.0 (+19.8)", "26.9 → 42.0 (+15.1)"]
    assert cells[4].startswith("last-layer keys, no normalisation")
    deit = table_line(markdown, "| deit3_vitb16 |", "| ours |")  # ours, no twin: CorLoc with its interval
    assert deit[3] == "—" and deit[5].startswith("25.0 [")
    assert table_line(markdown, "published: registers", "| DeiT-III |")[5] == "11.7 → 27.1 (+15.4)"
    dino = table_line(markdown, "| dino_vits16 |", "| ours |")
    assert dino[5].startswith("75.0 [")
    assert table_line(markdown, "published: lost", "DINO ViT-S/16")[5] == "61.9"
    assert "Darcet et al." in markdown and "Siméoni et al." in markdown


def test_smoke_pairs_are_marked_and_published_rows_stay_apart(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, other = pair_hits(2, 1, 3, 2)
    write_run(runs, "smoke-a", base, model="dinov2_vitl14",
              timm_name="vit_large_patch14_dinov2.lvd142m", smoke=True, dataset="demo")
    write_run(runs, "smoke-b", other, model="dinov2_vitl14_reg4",
              timm_name="vit_large_patch14_reg4_dinov2.lvd142m", registers=4, smoke=True,
              dataset="demo")
    lb.build_leaderboard(runs, out)
    assert not (pd.read_csv(out / "comparison.csv")["source"] == "ours").any()
    lb.build_leaderboard(runs, out, include_smoke=True)
    comparison = pd.read_csv(out / "comparison.csv")
    smoke = comparison[comparison["run_id"] == "smoke-a"].iloc[0]
    assert smoke["smoke"] and smoke["run_id_reg"] == "smoke-b"
    assert pd.isna(smoke["paper"]) and pd.isna(smoke["citation"])
    markdown = (out / "comparison.md").read_text()
    assert "SMOKE" in table_line(markdown, "dinov2_vitl14 → dinov2_vitl14_reg4", "| ours |")[4]


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
    # 7 outputs, comparison_saliency.csv (the published saliency anchors) and
    # figures/.drawn.json: what each figure was drawn from (kept, not redrawn)
    assert first == second and len(first) == 9 and Path("figures/.drawn.json") in first
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


def test_object_size_and_count_columns(tmp_path: Path) -> None:
    run = lb.load_run(write_run(tmp_path, "r", [True, False]))
    assert run.predictions["area_share"].tolist() == [0.25, 0.25]
    assert run.predictions["n_objects"].tolist() == [1, 1]
    # IoU recomputed from the box: [12, 11, 60, 50] against [10, 10, 60, 50]
    assert run.predictions["best_iou"].tolist() == pytest.approx([48 * 39 / 2000, 0.0])


def test_load_run_raises_one_line_for_a_damaged_folder(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, "r", [True, False])
    (run_dir / "metrics.json").write_text("{not json")
    with pytest.raises(LostregError, match=r"r/metrics.json: not readable JSON"):
        lb.load_run(run_dir)


def test_paper_suite() -> None:
    assert ("dino_vits16", "voc07") in lb.PAPER_SUITE
    assert ("dinov2_vitl14_reg4", "coco20k") in lb.PAPER_SUITE
    assert len(lb.PAPER_SUITE) == len(set(lb.PAPER_SUITE)) == 15
    assert {d for _, d in lb.PAPER_SUITE} == {"voc07", "voc12", "coco20k"}


def test_public_names_stay_importable() -> None:
    """run.py, the notebook and other tools import these from lostreg.reports.leaderboard."""
    for name in ("PAPER_SUITE", "build_leaderboard", "collect", "comparison_markdown",
                 "figure_png", "iou_svg", "register_bar_figure", "settings_label", "RunData",
                 "load_run", "load_published", "main", "build_parser", "LEADERBOARD_COLUMNS",
                 "COMPARISON_COLUMNS", "find_pairs", "base_timm_name"):
        assert getattr(lb, name) is not None, name


def test_our_backbone_labels_name_the_size_as_published_rows_do() -> None:
    from lostreg.reports.leaderboard.tables import backbone_label

    assert backbone_label("dinov2", "vit_large_patch14_reg4_dinov2.lvd142m") == "DINOv2 ViT-L/14"
    assert backbone_label("deit3", "deit3_base_patch16_224.fb_in22k_ft_in1k") == \
        "DeiT-III ViT-B/16"
    assert backbone_label("dinov3", "vit_huge_plus_patch16_dinov3.lvd1689m") == "DINOv3 ViT-H+/16"
    assert backbone_label("dino", "resnet50") == "DINO" and backbone_label("x", None) == "x"

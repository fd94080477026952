"""Method and protocol as axes of the leaderboard, test-time registers beside trained ones, and
published rows with their protocols (issues 10, 11, 12), plus the smoke-only summary (15)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from run_folders import REG, TTR, pair_hits, write_run

from lostreg.errors import LostregError
from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard.markdown import method_title

TOKENCUT = {"tau": 0.2, "eps": 1e-5, "binary_graph": True}
DINOSEG_REFERENCE = {"head": 4, "mass": 0.6, "variant": "reference"}
DINOSEG_CORRECTED = {"head": 4, "mass": 0.6, "variant": "corrected"}


def rows_of(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "leaderboard.csv")


def test_old_run_folders_read_as_lost_with_the_schema_defaults(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_run(runs, "old", [True, False], legacy=True)
    row = lb.build_leaderboard(runs, out).iloc[0]
    assert (row["method"], json.loads(row["method_params"])) == (
        "lost", {"gram_bias": 0.0, "k_patches": 100})
    assert (row["layer"], row["normalize"], row["pos_interp"], row["test_time_registers"]) == (
        -1, "none", "original", 0)
    assert (row["k"], row["gram_bias"]) == (100, 0.0)


def test_runs_differing_only_in_method_or_parameters_are_separate_rows(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    hits = [True, False, True, True]
    write_run(runs, "lost", hits)
    write_run(runs, "tokencut", hits, method="tokencut", method_params=TOKENCUT)
    write_run(runs, "tokencut-tau3", hits, method="tokencut",
              method_params={**TOKENCUT, "tau": 0.3})
    write_run(runs, "lost-k50", hits, method_params={"k_patches": 50, "gram_bias": 0.0})
    lb.build_leaderboard(runs, out)
    board = rows_of(out).set_index("run_id")
    assert sorted(board.index) == ["lost", "lost-k50", "tokencut", "tokencut-tau3"]
    assert board.loc["tokencut", "method"] == "tokencut"
    assert json.loads(board.loc["tokencut-tau3", "method_params"])["tau"] == 0.3
    assert pd.isna(board.loc["tokencut", "k"]) and pd.isna(board.loc["tokencut", "gram_bias"])
    assert board.loc["lost-k50", "k"] == 50


@pytest.mark.parametrize(("setting", "base", "other"), [
    ("layer", -1, -2), ("normalize", "none", "l2"), ("pos_interp", "original", "timm"),
    ("feature", "k", "q"), ("method_params", {"k_patches": 100, "gram_bias": 0.0},
                            {"k_patches": 100, "gram_bias": -0.2}),
])
def test_runs_under_different_protocols_are_never_paired(tmp_path: Path, setting: str, base,
                                                          other) -> None:
    runs = tmp_path / "runs"
    hits, reg_hits = pair_hits(3, 1, 4, 2)
    write_run(runs, "plain", hits, **{setting: base})
    write_run(runs, "reg-other", reg_hits, **REG, **{setting: other})
    board = lb.collect(runs, report=None)
    assert not board.comparison["model_reg"].notna().any()
    write_run(runs, "reg-same", reg_hits, **REG, **{setting: base})
    pairs = lb.collect(runs, report=None).comparison.dropna(subset=["model_reg"])
    assert list(pairs["run_id_reg"]) == ["reg-same"]


def test_protocol_columns_in_the_leaderboard(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_run(runs, "r", [True], layer=-3, normalize="l2", pos_interp="timm", feature="q",
              method_params={"k_patches": 100, "gram_bias": -0.4})
    row = lb.build_leaderboard(runs, out).iloc[0]
    assert (row["feature"], row["layer"], row["normalize"], row["gram_bias"],
            row["pos_interp"]) == ("q", -3, "l2", -0.4, "timm")
    markdown_label = lb.settings_label(lb.collect(runs, report=None).runs[0].settings())
    assert markdown_label.startswith("q, layer -3, L2-normalised, k=100, bias=-0.4, pos timm")


def test_trained_and_test_time_registers_are_two_arrows_from_one_baseline(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    base, trained = pair_hits(6, 1, 10, 3)
    _, test_time = pair_hits(4, 2, 9, 5)
    write_run(runs, "plain", base)
    write_run(runs, "reg", trained, **REG)
    write_run(runs, "ttr", test_time, **TTR)
    lb.build_leaderboard(runs, out)
    comparison = pd.read_csv(out / "comparison.csv")
    arrows = comparison[(comparison["source"] == "ours")].set_index("registers")
    assert set(arrows.index) == {"trained", "test-time"}
    assert set(arrows["run_id"]) == {"plain"}
    assert (arrows.loc["trained", "run_id_reg"], arrows.loc["test-time", "run_id_reg"]) == (
        "reg", "ttr")
    assert arrows.loc["test-time", "model_reg"] == "dinov2_vits14+ttr"
    assert arrows.loc["trained", "corloc"] == arrows.loc["test-time", "corloc"] == 55.0
    markdown = (out / "comparison.md").read_text()
    lines = [line for line in markdown.splitlines()
             if line.startswith("| DINOv2 ViT-S/14 | ours |")]  # sized, as published rows
    assert [line.split("|")[4].strip() for line in lines] == ["trained registers",
                                                              "test-time register"]
    assert all("55.0 → " in line for line in lines)
    statistics = markdown.split("## Paired statistics")[1]
    assert "dinov2_vits14 → dinov2_vits14+ttr | test-time register" in statistics


def test_one_block_per_method_and_both_dino_seg_variants(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    base, other = pair_hits(3, 1, 4, 2)
    for method, params in (("lost", None), ("tokencut", TOKENCUT),
                           ("dinoseg", DINOSEG_REFERENCE), ("dinoseg", DINOSEG_CORRECTED)):
        tag = f"{method}-{(params or {}).get('variant', '')}"
        write_run(runs, f"{tag}-plain", base, method=method, method_params=params)
        write_run(runs, f"{tag}-reg", other, method=method, method_params=params, **REG)
    board = lb.collect(runs, report=None)
    markdown = lb.comparison_markdown(board)
    blocks = {name: markdown.split(f"## {method_title(name, board.published)}\n")[1]
              .split("\n## ")[0] for name in ("lost", "tokencut", "dinoseg")}
    assert "| ours |" in blocks["lost"] and "tau=0.2" in blocks["tokencut"]
    dinoseg = [line for line in blocks["dinoseg"].splitlines() if "| ours |" in line]
    assert len(dinoseg) == 2
    assert any("variant=reference" in line for line in dinoseg)
    assert any("variant=corrected" in line for line in dinoseg)
    assert "45.8" in blocks["dinoseg"] and "68.8" in blocks["tokencut"]  # published rows
    assert "tau=0.2" not in blocks["lost"] and "variant=" not in blocks["tokencut"]


def test_a_protocol_difference_inside_an_arrow_is_said(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    base, other = pair_hits(3, 1, 4, 2)
    write_run(runs, "plain", base, pos_resolved="dinov2")
    write_run(runs, "reg", other, pos_resolved="dinov2_reg", **REG)
    board = lb.collect(runs, report=None)
    row = board.comparison.dropna(subset=["model_reg"]).iloc[0]
    assert row["protocol_note"] == "position embeddings resampled differently: dinov2 vs dinov2_reg"
    line = next(line for line in lb.comparison_markdown(board).splitlines()
                if "| ours |" in line)
    assert "⚠ position embeddings resampled differently" in line
    write_run(runs, "reg-same", other, pos_resolved="dinov2", finished="2026-02-01T00:00:00+00:00",
              **{**REG, "sha": "cd" * 32})
    row = lb.collect(runs, report=None).comparison.dropna(subset=["model_reg"]).iloc[0]
    assert row["run_id_reg"] == "reg-same" and pd.isna(row["protocol_note"])
    # with an explicit interpolation both sides use it, whatever each model's own would be
    explicit = tmp_path / "explicit"
    write_run(explicit, "plain", base, pos_resolved="dinov2", pos_interp="timm")
    write_run(explicit, "reg", other, pos_resolved="dinov2_reg", pos_interp="timm", **REG)
    row = lb.collect(explicit, report=None).comparison.dropna(subset=["model_reg"]).iloc[0]
    assert row["run_id_reg"] == "reg" and pd.isna(row["protocol_note"])


def test_published_arrows_never_join_two_papers_or_protocols(tmp_path: Path) -> None:
    """Every published a -> b cell holds two figures of one paper under one protocol, as the
    reference file gives them (DINOv2 ViT-L/14 has a baseline in two papers: 35.3 and 32.2)."""
    board = lb.collect(write_run(tmp_path / "runs", "r", [True]).parent, report=None)
    published = board.published
    rows = board.comparison[board.comparison["source"] == "published"]
    arrows = rows.dropna(subset=["registers"])
    assert len(arrows) > 0
    for row in arrows.to_dict("records"):
        same = published[(published["paper"] == row["paper"])
                         & (published["protocol"] == row["protocol"])
                         & (published["compare_with"] == row["model"])
                         & (published["dataset"] == row["dataset"])].set_index("variant")
        assert row["corloc"] == same.loc["none", "corloc"]
        assert row["corloc_reg"] == same.loc[row["registers"], "corloc"]
    l14 = arrows[(arrows["model"] == "dinov2_vitl14") & (arrows["dataset"] == "voc07")]
    assert sorted(zip(l14["paper"], l14["registers"], l14["corloc"], l14["corloc_reg"],
                      strict=True)) == [("registers", "trained", 35.3, 55.4),
                                        ("ttr", "test-time", 32.2, 53.8),
                                        ("ttr", "trained", 32.2, 56.2)]
    assert rows["run_id"].isna().all() and rows["protocol"].str.len().gt(0).all()


def test_published_reference_file() -> None:
    published = lb.load_published()
    assert set(published["dataset"]) == set(lb.PAPER_DATASETS)
    for column in ("source", "protocol"):
        assert published[column].str.len().gt(0).all(), column
    lookup = published.set_index(["paper", "compare_with", "variant", "dataset"])["corloc"]
    assert lookup[("lost", "dino_vits16", "none", "voc07")] == 61.9
    assert lookup[("lost", "dino_vitb16", "none", "coco20k")] == 50.0
    assert lookup[("registers", "dinov2_vitl14", "trained", "voc12")] == 60.0
    assert lookup[("registers", "deit3_vitb16", "trained", "coco20k")] == 25.1
    assert lookup[("registers", "openclip_vitb16", "none", "voc07")] == 38.8
    tokencut = {(m, d): v for (p, m, _, d), v in lookup.items() if p == "tokencut"}
    assert [tokencut[("dino_vits16", d)] for d in lb.PAPER_DATASETS] == [68.8, 72.1, 58.8]
    assert [tokencut[("dino_vits8", d)] for d in lb.PAPER_DATASETS] == [67.3, 71.6, 60.7]
    assert [tokencut[("dino_vitb16", d)] for d in lb.PAPER_DATASETS] == [68.8, 72.4, 59.0]
    assert [lookup[("dinoseg", "dino_vits16", "none", d)] for d in lb.PAPER_DATASETS] == [
        45.8, 46.2, 42.0]
    assert [lookup[("ttr", "dinov2_vitl14", "test-time", d)] for d in lb.PAPER_DATASETS] == [
        53.8, 57.9, 41.9]
    assert [lookup[("ttr", "openclip_vitb16", "test-time", d)] for d in lb.PAPER_DATASETS] == [
        30.9, 35.9, 23.6]
    unverified = published[published["verified"] == "unverified"]
    assert set(unverified["paper"]) == {"dinoseg"}
    # the test-time-registers Table 5 cells were verified from the paper's text (arXiv v5)
    ttr = published[published["paper"] == "ttr"]
    assert (ttr["verified"] == "primary").all() and ttr["source"].str.contains("v5").all()
    # the registers paper's Table 3 used its authors' own trained models: said beside the rows
    registers = published[published["paper"] == "registers"]
    assert registers["protocol"].str.contains("own trained models, not the public").all()
    assert unverified["note"].str.startswith("Unverified:").all()
    suspect = published[published["note"].str.contains("Coincidence noted")]
    assert set(zip(suspect["paper"], suspect["compare_with"], suspect["variant"],
                   strict=True)) == {
        ("ttr", "openclip_vitb16", "none")}
    assert published.loc[published["paper"] == "ttr", "protocol"].str.contains(
        r"last 4 layers.*L2-normalised.*\[-1, 0\]").all()


@pytest.mark.parametrize(("column", "value", "message"), [
    ("verified", "yes", "row 2: verified must be one of primary, secondary, unverified"),
    ("test_time_registers", "one", "row 2: test_time_registers must be a whole number"),
    ("protocol", "", "row 2: 'protocol' is empty"),
    ("corloc", "101", "row 2: corloc '101' is not a number in [0, 100]"),
    ("with_registers", "maybe", "row 2: with_registers must be true or false"),
])
def test_a_bad_published_file_is_one_line(tmp_path: Path, column: str, value: str,
                                          message: str) -> None:
    frame = pd.read_csv(lb.DEFAULT_PUBLISHED, dtype=str, keep_default_na=False)
    frame.loc[0, column] = value
    path = tmp_path / "published.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(LostregError, match=f"{path}: " + message.replace("[", r"\[")
                       .replace("]", r"\]")):
        lb.load_published(path)
    duplicated = pd.concat([frame.iloc[1:2], frame.iloc[1:2]])
    duplicated.to_csv(path, index=False)
    with pytest.raises(LostregError, match="gives dino_vits16 \\(none\\) on voc12 twice"):
        lb.load_published(path)


def test_only_smoke_runs_says_what_was_skipped_and_how_to_see_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_run(runs, "smoke-a", [True], smoke=True)
    write_run(runs, "smoke-b", [True, False], smoke=True, feature="v")
    write_run(runs, "running", [True], finish=False)
    assert lb.main(["--runs", str(runs), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("0 runs (0 smoke)")
    assert "skipped 2 smoke run(s) (random weights): --include-smoke shows them" in line
    assert "1 unfinished run folder(s) (no metrics.json) not listed" in line
    assert lb.main(["--runs", str(runs), "--out", str(out), "--include-smoke"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("2 runs (2 smoke)") and "--include-smoke shows" not in line


def test_one_run_folder_as_runs_says_to_pass_its_parent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "one", [True, False])
    assert lb.main(["--runs", str(runs / "one"), "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out
    assert line.startswith("0 runs") and "is one run's folder" in line and f"({runs})" in line

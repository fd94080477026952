"""Issue 19 items 5 and 6: mask runs in the leaderboard, the comparison and its paired test.

Mask runs are generated in the saliency contract's format (``mask_run_folders``), with masks
whose IoU with the GT is known from their shift. What is held: one leaderboard row per run
(saliency columns for mask runs, CorLoc's for box runs), every stored per-image score and
figure checked against what the counts give (a damaged folder is one line, the rest still
read), the paired test equal to a plain bootstrap written out here, our figures beside an
anchor only under the anchor's definition, and smoke or partial runs never beside one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mask_run_folders import (
    ANCHOR,
    REG,
    TTR,
    rle_of,
    scene,
    write_mask_run,
)
from run_folders import edit_json, edit_line, write_run

from lostreg.evaluation import saliency
from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard.saliency import comparison_frame, paired_iou
from lostreg.reports.leaderboard.saliency_markdown import saliency_markdown
from lostreg.reports.leaderboard.saliency_runs import (
    load_mask_run,
    recompute_check,
    scan_mask_runs,
    tokencut_iou,
)
from lostreg.runs.store import scan_runs

LOST = {"method": "lost", "method_params": {"k_patches": 100, "gram_bias": 0.0},
        "mask_protocol": "lost-seed-component"}
BASE_SHIFTS = [(i % 5) - 2 for i in range(12)]
REG_SHIFTS = [(i % 3) - 1 for i in range(12)]


def iou_of(index: int, shift: int | None) -> float:
    """The per-image IoU of ``scene`` written out: two 14x12 rectangles ``|shift|`` apart
    (clipped at the image's right edge)."""
    gt, pred = scene(index, shift)
    gt = gt > 0
    return float((gt & pred).sum() / (gt | pred).sum())


def test_one_row_per_run_saliency_beside_corloc(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "box", [True, False, True])
    write_mask_run(runs, "mask", BASE_SHIFTS)
    write_mask_run(runs, "mask-bs", BASE_SHIFTS, refine="bilateral")
    lb.build_leaderboard(runs, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "leaderboard.csv", keep_default_na=False)
    assert list(table.columns) == lb.LEADERBOARD_COLUMNS and len(table) == 3
    rows = table.set_index("run_id")
    assert rows.loc["box", "corloc"] != "" and rows.loc["box", "acc"] == ""
    assert rows.loc["box", "refine"] == "" and rows.loc["box", "max_f"] == ""
    for name, refine in (("mask", "none"), ("mask-bs", "bilateral")):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        assert rows.loc[name, "corloc"] == "" and rows.loc[name, "n_hits"] == ""
        assert rows.loc[name, "refine"] == refine
        assert rows.loc[name, "mask_protocol"] == "tokencut-saliency"
        for key in ("acc", "iou", "max_f"):
            assert float(rows.loc[name, key]) == metrics[key]
    expected = 100 * np.mean([iou_of(i, shift) for i, shift in enumerate(BASE_SHIFTS)])
    assert float(rows.loc["mask", "iou"]) == pytest.approx(expected, abs=1e-4)


def test_the_store_leaves_mask_runs_to_the_saliency_reader(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "box", [True])
    write_mask_run(runs, "mask", BASE_SHIFTS)
    lines: list[str] = []
    boxes = scan_runs(runs, report=lines.append)
    masks = scan_mask_runs(runs, report=lines.append)
    assert [run.run_id for run in boxes.runs] == ["box"] and boxes.other_targets == 1
    assert [run.run_id for run in masks.runs] == ["mask"] and not lines


def test_per_image_scores_are_tokencuts_and_the_stored_figures_are_what_the_counts_give(
        tmp_path: Path) -> None:
    run_dir = write_mask_run(tmp_path, "mixed", [None, 0, 3, -2, None, 1], refine="bilateral",
                             grey=True, empty_images=2)
    run = load_mask_run(run_dir)
    recompute_check(run)  # every definition's figures and the F curve, recomputed
    assert run.iou_nan_images == 2 and run.figures["tokencut"]["iou"] is None
    for record in map(json.loads, (run_dir / "predictions.jsonl").read_text().splitlines()):
        counts = saliency.ImageCounts.from_json(record["sal_counts"])
        reference = saliency.per_image(counts, "tokencut")["iou"]
        tp, predicted, gt, _ = saliency.binary_stats(counts, "nonzero")
        mine = tokencut_iou(tp, predicted, gt)
        assert (math.isnan(mine) and math.isnan(reference)) or mine == reference
    # the 0/0 images count as 1 in the corrected IoU, and only there
    ious = run.images["sal_iou"].to_numpy()
    assert run.iou_empty_as_one == pytest.approx(
        100 * np.mean(np.where(np.isnan(ious), 1.0, ious)), abs=1e-4)


def _damage(run_dir: Path, what: str) -> None:
    predictions, metrics = run_dir / "predictions.jsonl", run_dir / "metrics.json"
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    if what == "sal_iou":
        edit_line(predictions, 3, sal_iou=0.99)
    elif what == "rle_size":
        edit_line(predictions, 2, pred_mask_rle={**lines[1]["pred_mask_rle"], "size": [24, 33]})
    elif what == "rle_other_mask":
        edit_line(predictions, 2, pred_mask_rle=rle_of(np.zeros((24, 32), dtype=bool)))
    elif what == "counts":
        edit_line(predictions, 4, sal_counts={**lines[3]["sal_counts"], "pred": [1]})
    elif what == "gt_size":
        edit_line(predictions, 1, gt_size=[24, 32])
    elif what == "iou":
        edit_json(metrics, iou=12.5)
    elif what == "max_f":
        edit_json(metrics, max_f=50.0)
    elif what == "f_curve":
        edit_json(metrics, f_curve=[0.5] * 10)
    elif what == "nan":
        metrics.write_text(metrics.read_text().replace('"acc": ', '"acc": NaN, "x": ', 1))
    elif what == "refine":
        edit_json(run_dir / "config.json", refine="crf")
    elif what == "variants":
        edit_json(metrics, saliency_variants={"move": {}})
    elif what == "images":
        predictions.write_text("".join(json.dumps(line) + "\n" for line in lines[:-1]))


@pytest.mark.parametrize(("what", "message"), [
    ("sal_iou", "predictions.jsonl:3: 'sal_iou' is 0.99 but its sal_counts give"),
    ("rle_size", "predictions.jsonl:2: 'pred_mask_rle': size [24, 33] is not the image's "
                 "[24, 32]"),
    ("rle_other_mask", "predictions.jsonl:2: 'pred_mask_rle' has 0 pixels but sal_counts has "
                       "168 above 0.5"),
    ("counts", "predictions.jsonl:4: 'sal_counts': bins, pred, gt (gt_half, gt_full) must be "
               "integer lists of one length"),
    ("gt_size", "predictions.jsonl:1: 'gt_size' [24, 32] is not the image's size [32, 24]"),
    ("iou", "metrics.json: 'iou' is 12.5 but the predictions give"),
    ("max_f", "metrics.json: 'max_f' is 50.0 but its f_curve gives"),
    ("f_curve", "metrics.json: 'f_curve' must be 255 numbers in [0, 1]"),
    ("nan", "metrics.json: not readable JSON (NaN is not JSON"),  # issue 20 row 11
    ("refine", "config.json: 'refine' must be one of none, bilateral, bilateral-binary"),
    ("variants", "metrics.json (saliency_variants.move): missing key 'acc'"),
    ("images", "predictions.jsonl: 11 images but metrics.json says 12"),
])
def test_a_damaged_mask_run_is_skipped_with_one_line(tmp_path: Path, what: str,
                                                     message: str) -> None:
    runs = tmp_path / "runs"
    write_mask_run(runs, "good", BASE_SHIFTS)
    bad = write_mask_run(runs, "bad", BASE_SHIFTS, **REG)
    _damage(bad, what)
    lines: list[str] = []
    board = lb.collect(runs, report=lines.append)
    assert list(board.table["run_id"]) == ["good"]
    assert len(lines) == 1 and lines[0].startswith(f"skipped {bad}: ") and message in lines[0]
    assert "\n" not in lines[0] and board.skipped == lines


def reference_paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000
                               ) -> tuple[float, float, float, float]:
    """A plain paired bootstrap of mean(b - a): one draw of every resample's indices from
    ``default_rng(0)`` (the stream ``stats.resample_indices`` documents), percentiles."""
    diff = b - a
    idx = np.random.default_rng(0).integers(0, diff.size, size=(resamples, diff.size))
    means = diff[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    side = min(np.mean(means <= 0), np.mean(means >= 0))
    return diff.mean(), low, high, min(1.0, 2 * max(side, 1 / resamples))


def test_the_pair_test_is_a_paired_bootstrap_on_per_image_iou(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    base = load_mask_run(write_mask_run(runs, "base", BASE_SHIFTS, empty_images=2))
    other = load_mask_run(write_mask_run(runs, "reg", REG_SHIFTS, empty_images=2, **REG))
    test = paired_iou(base, other)
    a = np.array([iou_of(i, s) for i, s in enumerate(BASE_SHIFTS)][2:])
    b = np.array([iou_of(i, s) for i, s in enumerate(REG_SHIFTS)][2:])
    assert test["n_paired"] == 10 and test["n_undefined"] == 2  # the two 0/0 images
    mean, low, high, p = reference_paired_bootstrap(a, b)
    assert test["iou_diff"] == pytest.approx(100 * mean, abs=1e-4)  # float32 IoUs
    assert test["iou_diff_ci_low"] == pytest.approx(100 * low, abs=1e-4)
    assert test["iou_diff_ci_high"] == pytest.approx(100 * high, abs=1e-4)
    assert test["bootstrap_p"] == pytest.approx(p)
    assert (test["iou_better"], test["iou_worse"]) == (int(np.sum(b > a + 1e-6)),
                                                      int(np.sum(b < a - 1e-6)))
    same = paired_iou(base, base)
    assert same["iou_diff"] == 0 and same["bootstrap_p"] == 1.0


def test_pairs_need_the_same_refinement_and_mask_protocol(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_mask_run(runs, "base", BASE_SHIFTS)
    write_mask_run(runs, "reg-bs", REG_SHIFTS, refine="bilateral", **REG)
    write_mask_run(runs, "reg-other", REG_SHIFTS, mask_protocol="other", **REG)
    write_mask_run(runs, "ttr", REG_SHIFTS, **TTR)
    board = lb.collect(runs)
    ours = board.saliency.comparison
    pairs = ours[ours["model_reg"].notna()]
    assert list(pairs["run_id_reg"]) == ["ttr"]


def test_anchors_stand_beside_our_runs_under_their_own_definition(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_mask_run(runs, "tokencut", BASE_SHIFTS, **ANCHOR)
    write_mask_run(runs, "lost", BASE_SHIFTS, **LOST, **ANCHOR)
    board = lb.collect(runs)
    frame = board.saliency.comparison
    lost = frame[(frame["method"] == "lost") & (frame["source"] == "ours")]
    assert set(lost["definition"]) == {"tokencut", "found"}  # FOUND's, for FOUND's LOST rows
    metrics = json.loads((runs / "lost" / "metrics.json").read_text())
    found = lost[lost["definition"] == "found"].iloc[0]
    variant = metrics["saliency_variants"]["found"]
    assert (found["acc"], found["iou"], found["max_f"]) == (
        variant["acc"], variant["iou"], variant["max_f_per_image"])
    tokencut = frame[(frame["method"] == "tokencut") & (frame["source"] == "ours")]
    assert list(tokencut["definition"]) == ["tokencut"]
    text = saliency_markdown(board.saliency)
    block = text.split("### Saliency: LOST, no refinement")[1].split("###")[0]
    assert "| DINO ViT-S/16 | ours | dino_vits16 | — | FOUND's" in block
    assert "| published: found (unverified) |" in block and "75.8 / 65.4 / 89.5" in block
    tokencut_block = text.split("### Saliency: TokenCut, no refinement")[1].split("###")[0]
    assert "80.3 / 71.2 / 91.8" in tokencut_block and "FOUND's" not in tokencut_block


def test_smoke_and_partial_runs_never_stand_beside_an_anchor(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_mask_run(runs, "smoke", BASE_SHIFTS, smoke=True, **ANCHOR)
    write_mask_run(runs, "first12", BASE_SHIFTS, limit=12, **ANCHOR)
    write_mask_run(runs, "partial", BASE_SHIFTS, dataset_images=12, dataset="duts_te",
                   **ANCHOR)
    board = lb.collect(runs, include_smoke=True)
    ours = board.saliency.comparison[board.saliency.comparison["source"] == "ours"]
    assert len(ours) == 3 and not ours["comparable"].any()
    text = saliency_markdown(board.saliency)
    blocks, apart = text.split("### Saliency runs not comparable with published figures")
    assert "| ours |" not in blocks
    for words in ("SMOKE (random weights)", "first 12", "partial dataset: 12"):
        assert words in apart.split("### Saliency: paired")[0]


def test_comparison_outputs_and_their_csv(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_mask_run(runs, "base", BASE_SHIFTS)
    write_mask_run(runs, "reg", REG_SHIFTS, **REG)
    assert lb.main(["--runs", str(runs), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs (0 smoke)" in printed and "; 1 register pairs ->" in printed
    frame = pd.read_csv(out / "comparison_saliency.csv")
    assert list(frame.columns) == list(comparison_frame([], lb.collect(runs).saliency.published
                                                        ).columns)
    assert len(frame[frame["source"] == "published"]) == 12
    pair = frame[frame["model_reg"].notna()].iloc[0]
    assert pair["n_paired"] == 12 and pair["bootstrap_p"] <= 1
    text = (out / "comparison.md").read_text()
    assert "## Saliency (masks)" in text and "### Saliency: paired statistics" in text
    for name in ("saliency_iou.png", "saliency_f_curves.png", "saliency_iou/base.svg",
                 "saliency_iou/reg.svg"):
        assert (out / "figures" / name).is_file(), name
    drawn = json.loads((out / "figures" / ".drawn.json").read_text())["figures"]
    assert {"saliency_iou.png", "saliency_iou/base.svg"} <= set(drawn)  # redrawn on change
    # a later build without the mask runs leaves no stale saliency figure behind
    for name in ("base", "reg"):
        for file in (runs / name).iterdir():
            file.unlink()
        (runs / name).rmdir()
    write_run(runs, "box", [True])
    lb.build_leaderboard(runs, out)
    assert not (out / "figures" / "saliency_iou.png").exists()
    assert not list((out / "figures" / "saliency_iou").iterdir())
    assert sorted(p.name for p in (out / "figures" / "iou").iterdir()) == ["box.svg"]


def test_the_paired_bootstrap_refuses_what_it_cannot_pair() -> None:
    from lostreg.evaluation.stats import paired_bootstrap_mean_diff

    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap_mean_diff([0.5, float("nan")], [0.5, 0.4])
    with pytest.raises(ValueError, match="equal in length"):
        paired_bootstrap_mean_diff([0.5], [0.5, 0.4])
    empty = paired_bootstrap_mean_diff([], [])
    assert empty.n == 0 and math.isnan(empty.mean_diff) and math.isnan(empty.p_value)
    # every resample on one side: the p floor is 2 / resamples, not 0
    assert paired_bootstrap_mean_diff([0.1] * 5, [0.9] * 5, n_resamples=100).p_value == 0.02


def test_the_saliency_csv_shows_a_formula_as_text(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_mask_run(runs, "odd", BASE_SHIFTS, mask_protocol="=HYPERLINK(1)", **ANCHOR)
    lb.build_leaderboard(runs, out)
    frame = pd.read_csv(out / "comparison_saliency.csv", dtype=str, keep_default_na=False)
    assert list(frame.loc[frame["source"] == "ours", "mask_protocol"]) == ["'=HYPERLINK(1)"]

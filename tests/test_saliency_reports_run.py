"""Issue 19 item 6 on real run folders: ``lostreg.run`` writes smoke mask runs on a generated
ECSSD tree (two tiny random models, without and with registers; TokenCut and LOST; no
refinement and the bilateral solver), and the reports read every one of them without a
skipped line, recompute their figures, pair them, keep them apart from the anchors (smoke and
partial) and draw them, the overlays on the dataset images."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from figure_checks import drawn_texts, text_problems

from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets.mask_demo import generate_mask_tree
from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard.saliency import find_mask_pairs
from lostreg.reports.leaderboard.saliency_figures import (
    f_curve_figure,
    iou_distribution_figure,
    mask_changes,
    overlay_figure,
    pair_title,
)
from lostreg.reports.leaderboard.saliency_markdown import saliency_markdown
from lostreg.reports.leaderboard.saliency_runs import recompute_check
from lostreg.run import main

TINY = {"pos_embed": "dinov2", "model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 6}}
SPECS = (BackboneSpec("tiny_sal_plain", "vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0,
                      **TINY),
         BackboneSpec("tiny_sal_reg4", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                      **TINY))
IMAGES = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saliency_reports")
    for spec in SPECS:
        BACKBONES[spec.name] = spec
    try:
        generate_mask_tree(root / "data", "ecssd", IMAGES, seed=3, sizes=(40, 72),
                           grey_borders=True)
        assert main(["--model", ",".join(spec.name for spec in SPECS), "--weights", "random",
                     "--dataset", "ecssd", "--data-root", str(root / "data"), "--runs",
                     str(root / "runs"), "--num-workers", "0", "--no-progress",
                     "--allow-partial-dataset", "--method", "tokencut,lost",
                     "--refine", "none,bilateral"]) == 0
    finally:
        for spec in SPECS:
            BACKBONES.pop(spec.name, None)
    return root / "runs"


def test_the_reports_read_every_real_mask_run(runs: Path) -> None:
    lines: list[str] = []
    board = lb.collect(runs, include_smoke=True, report=lines.append)
    assert not lines and len(board.saliency.runs) == 8 and len(board.table) == 8
    for run in board.saliency.runs:
        recompute_check(run)  # every definition's figures from the lines' counts
    table = board.table.set_index("run_id")
    assert table["corloc"].isna().all() and table[["acc", "max_f"]].notna().all().all()
    assert set(table["refine"]) == {"none", "bilateral"}
    comparison = board.saliency.comparison
    pairs = comparison[comparison["model_reg"].notna() & (comparison["definition"] == "tokencut")]
    assert len(pairs) == 4  # TokenCut and LOST, each refined and not
    assert (pairs["n_paired"] + pairs["n_undefined"] == IMAGES).all()
    ours = comparison[comparison["source"] == "ours"]
    assert not ours["comparable"].any()  # smoke, and 6 of ECSSD's 1000 images
    text = saliency_markdown(board.saliency)
    apart = text.split("### Saliency runs not comparable with published figures")[1]
    assert "partial dataset: 6 of 1000 images" in apart and "SMOKE" in apart
    out = runs.parent / "out"
    lb.build_leaderboard(runs, out, include_smoke=True)
    written = pd.read_csv(out / "leaderboard.csv")
    assert len(written) == 8 and written["corloc"].isna().all() and written["iou"].notna().all()
    assert text in (out / "comparison.md").read_text(encoding="utf-8")
    for name in ("saliency_iou.png", "saliency_f_curves.png"):
        assert (out / "figures" / name).is_file()
    assert len(list((out / "figures" / "saliency_iou").glob("*.svg"))) == 8


def test_real_mask_runs_are_drawn_and_overlaid_on_their_images(runs: Path) -> None:
    board = lb.collect(runs, include_smoke=True)
    mask_runs = board.saliency.runs
    base, other = find_mask_pairs(mask_runs)[0][0]
    chosen = mask_changes(base, other)
    assert len(chosen) == 4 and isinstance(chosen, pd.DataFrame)
    for figure in (iou_distribution_figure(mask_runs), f_curve_figure(mask_runs),
                   overlay_figure(base, other, chosen, pair_title(base, other))):
        texts = drawn_texts(figure)
        assert not text_problems(figure, texts=texts)
        assert any("SMOKE" in text.get_text() for text, _ in texts)
    words = " ".join(" ".join(text.get_text().split()) for text, _ in drawn_texts(figure))
    assert "on the dataset images" in words  # found under the run's --data-root

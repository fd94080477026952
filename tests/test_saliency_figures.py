"""Issue 19 item 6: the saliency figures read well with 2 runs and with 50.

IoU distributions, F-vs-threshold curves and the mask overlays are rendered from generated
mask runs (``mask_run_folders``) and held to ``figure_checks``' promises (every text inside
the canvas, none overlapping), a bounded size, the SMOKE mark on smoke runs, and the words
saying what a crowded figure left out; the overlays say whether they are drawn on the
dataset image, which is only read from under the run's data root. PNGs go to
``$LOSTREG_FIGURES_OUT`` when it is set, to look at them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from figure_checks import assert_svg_texts_fit, drawn_texts, svg_says, text_problems
from mask_run_folders import REG, write_mask_run

from lostreg.reports.leaderboard.figures import figure_png
from lostreg.reports.leaderboard.saliency import find_mask_pairs
from lostreg.reports.leaderboard.saliency_figures import (
    MAX_CURVES,
    MAX_RUNS,
    f_curve_figure,
    image_under_root,
    iou_distribution_figure,
    mask_changes,
    mask_iou_svg,
    overlay_figure,
    pair_changes,
    pair_title,
    run_names,
)
from lostreg.reports.leaderboard.saliency_runs import load_mask_run, read_masks, scan_mask_runs

MAX_PIXELS = 2000
DATASETS = ("ecssd", "duts_te", "dut_omron")


def generated(root: Path, pairs: int, smoke: bool = True, images: int = 10) -> list:
    """``2 * pairs`` mask runs (a baseline and its register twin per TokenCut tau, spread
    over the three datasets; every third pair refined), images written under the data root."""
    runs = root / "runs"
    for i in range(pairs):
        common = {"dataset": DATASETS[i % 3], "smoke": smoke, "data_root": root / f"data{i}",
                  "write_images": i == 0,
                  "method_params": {"tau": round(0.1 + 0.01 * i, 2), "eps": 1e-5,
                                    "binary_graph": True},
                  "refine": "bilateral" if i % 3 == 2 else "none"}
        write_mask_run(runs, f"p{i:03d}-base", [(j * (i + 2)) % 7 - 3 for j in range(images)],
                       **common)
        write_mask_run(runs, f"p{i:03d}-reg", [(j + i) % 3 - 1 for j in range(images)],
                       **common, **REG)
    return scan_mask_runs(runs, include_smoke=True).runs


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> list:
    return generated(tmp_path_factory.mktemp("many"), 25)


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> list:
    return generated(tmp_path_factory.mktemp("few"), 1)


def check(figure, name: str, smoke: bool = True) -> list:
    if os.environ.get("LOSTREG_FIGURES_OUT"):
        out = Path(os.environ["LOSTREG_FIGURES_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.png").write_bytes(figure_png(figure))
    texts = drawn_texts(figure)
    problems = text_problems(figure, texts=texts)
    assert not problems, f"{name}: " + "; ".join(problems)
    assert figure.bbox.width <= MAX_PIXELS and figure.bbox.height <= MAX_PIXELS, name
    assert any("SMOKE" in text.get_text() for text, _ in texts) == smoke, name
    return texts


def check_svg(svg: str, name: str, smoke: bool = True) -> None:
    """``check`` for a histogram written as SVG (``histogram_svg``)."""
    if os.environ.get("LOSTREG_FIGURES_OUT"):
        out = Path(os.environ["LOSTREG_FIGURES_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.svg").write_text(svg)
    assert_svg_texts_fit(svg, name)
    assert svg_says(svg, "SMOKE", fill="red") == smoke, name


def said(texts: list, words: str) -> bool:
    return any(words in " ".join(text.get_text().split()) for text, _ in texts)


@pytest.mark.parametrize("runs_name", ["few", "many"])
def test_iou_distributions_are_readable_and_say_what_they_left_out(runs_name, request) -> None:
    runs = request.getfixturevalue(runs_name)
    texts = check(iou_distribution_figure(runs), f"saliency_iou_{runs_name}")
    if runs_name == "many":  # 50 runs: 18, 16 and 16 per dataset, 12 drawn each
        assert said(texts, f"ECSSD: {MAX_RUNS} of 18 runs drawn (the register pairs' runs "
                           "first, then the highest mean IoU")
        assert said(texts, f"DUT-OMRON: {MAX_RUNS} of 16 runs drawn")
    else:
        assert not said(texts, "runs drawn")
    check_svg(mask_iou_svg(runs[0]), f"mask_iou_{runs_name}")


@pytest.mark.parametrize("runs_name", ["few", "many"])
def test_f_curves_are_readable_and_say_what_they_left_out(runs_name, request) -> None:
    runs = request.getfixturevalue(runs_name)
    figure = f_curve_figure(runs)
    texts = check(figure, f"saliency_f_{runs_name}")
    legend_entries = sum(len(axis.get_legend().get_texts()) for axis in figure.axes)
    if runs_name == "many":
        assert said(texts, f"{MAX_CURVES} of 18 runs drawn") and said(texts, "range over all")
        assert legend_entries == 3 * (MAX_CURVES + 1)  # the runs drawn and the grey range
    else:
        assert legend_entries == 2 and not said(texts, "range over all")


def test_names_say_only_what_tells_runs_apart(few, many) -> None:
    assert sorted(run_names(few).values()) == ["dinov2_vits14", "dinov2_vits14_reg4"]
    names = run_names(many)
    assert len(set(names.values())) == 50
    assert any("refine bilateral" in name and "tau=0.12" in name for name in names.values())
    assert not any("mask_protocol" in name or "eps=" in name for name in names.values())


def test_overlays_show_the_masks_that_change_most_on_the_image_when_it_is_there(
        few, many) -> None:
    pairs = find_mask_pairs(many)[0]
    assert len(pairs) == 25
    changes = pair_changes(pairs)
    assert changes["mean_abs_iou_change"].is_monotonic_decreasing
    by_base = {base.run_id: (base, other) for base, other in pairs}
    base, other = by_base["p000-base"]  # its images were written under its data root
    chosen = mask_changes(base, other)
    assert len(chosen) == 4 and chosen["mask_agreement"].is_monotonic_increasing
    masks = read_masks(base, chosen["image_id"]), read_masks(other, chosen["image_id"])
    for image_id, agreement in zip(chosen["image_id"], chosen["mask_agreement"], strict=True):
        a, b = masks[0][image_id], masks[1][image_id]
        assert agreement == pytest.approx((a & b).sum() / max((a | b).sum(), 1)) or (
            not a.any() and not b.any() and agreement == 1.0)
    texts = check(overlay_figure(base, other, chosen, pair_title(base, other)),
                  "overlay_on_image")
    assert said(texts, "on the dataset images") and said(texts, "the GT is not stored")
    assert said(texts, "red: dinov2_vits14 only, blue: dinov2_vits14_reg4 only, purple: both")
    base, other = by_base["p001-base"]  # no image written for it: the masks alone, said
    texts = check(overlay_figure(base, other, mask_changes(base, other),
                                 pair_title(base, other)), "overlay_alone")
    assert said(texts, "masks alone (the images are not under the run's data root)")


def test_an_image_is_read_only_from_under_the_data_root(tmp_path: Path) -> None:
    run = load_mask_run(write_mask_run(tmp_path / "runs", "r", [0, 1], write_images=True,
                                       data_root=tmp_path / "data"))
    assert image_under_root(run, "img/img_0000.jpg") == (tmp_path / "data" / "img" /
                                                         "img_0000.jpg").resolve()
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    assert image_under_root(run, "../secret.jpg") is None
    assert image_under_root(run, str(outside)) is None  # an absolute path is not under it
    assert image_under_root(run, "img/missing.jpg") is None


def test_pretrained_runs_carry_no_smoke_mark(tmp_path: Path) -> None:
    runs = generated(tmp_path, 1, smoke=False)
    check(iou_distribution_figure(runs), "iou_pretrained", smoke=False)
    check(f_curve_figure(runs), "f_pretrained", smoke=False)
    check_svg(mask_iou_svg(runs[0]), "mask_iou_pretrained", smoke=False)

"""Every leaderboard figure, drawn from smoke runs with long labels: text on the canvas, no
overlaps, and SMOKE said on the figure. The checker itself is shown to catch both faults."""

from __future__ import annotations

from pathlib import Path

from figure_checks import (
    assert_svg_texts_fit,
    assert_text_layout_ok,
    figure_says,
    svg_says,
    text_layout_problems,
)
from matplotlib.figure import Figure
from run_folders import pair_hits, write_run

from lostreg.reports import leaderboard as lb

LONG_MODEL = "timm:vit_small_patch14_dinov2.lvd142m_with_a_rather_long_checkpoint_suffix"
LONG_REG = "timm:vit_small_patch14_reg4_dinov2.lvd142m_with_a_rather_long_checkpoint_suffix"


def smoke_board(tmp_path: Path, datasets=("demo",)) -> lb.Leaderboard:
    """Smoke runs as the issue's reproduction has them: a model and its register twin with
    features k and v (plus a test-time variant and a long-parameter method), long names."""
    runs = tmp_path / "runs"
    base, other = pair_hits(3, 1, 4, 2)
    for dataset in datasets:
        for feature in ("k", "v"):
            common = {"smoke": True, "dataset": dataset, "feature": feature,
                      "timm_name": LONG_MODEL.removeprefix("timm:")}
            write_run(runs, f"smoke-{dataset}-{feature}-base", base, model=LONG_MODEL, **common)
            write_run(runs, f"smoke-{dataset}-{feature}-reg", other, model=LONG_REG, registers=4,
                      **{**common, "timm_name": LONG_REG.removeprefix("timm:")})
        write_run(runs, f"smoke-{dataset}-ttr", other, model=LONG_MODEL + "+ttr", ttr=1,
                  smoke=True, dataset=dataset, timm_name=LONG_MODEL.removeprefix("timm:"))
        write_run(runs, f"smoke-{dataset}-k-base-tc", base, model=LONG_MODEL, smoke=True,
                  dataset=dataset, timm_name=LONG_MODEL.removeprefix("timm:"), method="tokencut",
                  method_params={"tau": 0.2, "eps": 1e-5, "binary_graph": True,
                                 "a_very_long_parameter_name_for_layout": "a long value"})
        write_run(runs, f"smoke-{dataset}-k-reg-tc", other, model=LONG_REG, registers=4,
                  smoke=True, dataset=dataset, timm_name=LONG_REG.removeprefix("timm:"),
                  method="tokencut",
                  method_params={"tau": 0.2, "eps": 1e-5, "binary_graph": True,
                                 "a_very_long_parameter_name_for_layout": "a long value"})
    return lb.collect(runs, include_smoke=True, report=None)


def test_register_figure_from_smoke_runs_fits_and_says_smoke(tmp_path: Path) -> None:
    board = smoke_board(tmp_path)
    pairs = board.comparison[board.comparison["model_reg"].notna()
                             & (board.comparison["source"] == "ours")]
    assert len(pairs) == 4 and set(pairs["registers"]) == {"trained", "test-time"}
    figure = lb.register_bar_figure(board.comparison)
    assert_text_layout_ok(figure)
    assert figure_says(figure, "SMOKE")
    assert figure_says(figure, "test-time register") and figure_says(figure, "trained registers")


def test_register_figure_with_three_datasets_fits(tmp_path: Path) -> None:
    board = smoke_board(tmp_path, datasets=("voc07", "voc12", "coco20k"))
    figure = lb.register_bar_figure(board.comparison)
    assert_text_layout_ok(figure)
    assert figure_says(figure, "COCO20k") and figure_says(figure, "SMOKE")


def test_register_figure_without_pairs_still_says_smoke(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "smoke-only", [True, False], smoke=True, model="dino_vits16",
              timm_name="vit_small_patch16_224.dino", family="dino")
    board = lb.collect(runs, include_smoke=True, report=None)
    figure = lb.register_bar_figure(board.comparison)
    assert_text_layout_ok(figure)
    assert figure_says(figure, "SMOKE") and figure_says(figure, "no register pairs")


def test_iou_histogram_of_a_smoke_run_with_a_long_id_fits_and_says_smoke(tmp_path: Path) -> None:
    name = "smoke-coco20k-" + LONG_MODEL.replace(":", "_") + "-k-layer-2-l2-tau0.2-0123456789"
    board = lb.collect(write_run(tmp_path / "runs", name, [True, False, True], smoke=True).parent,
                       include_smoke=True, report=None)
    svg = lb.iou_svg(board.runs[0])
    assert_svg_texts_fit(svg)
    assert svg_says(svg, "SMOKE", fill="red") and svg_says(svg, "0123456789")
    real = lb.collect(write_run(tmp_path / "real", "real", [True]).parent, report=None)
    assert not svg_says(lb.iou_svg(real.runs[0]), "SMOKE")


def test_the_checker_catches_overlap_and_text_off_the_canvas() -> None:
    figure = Figure(figsize=(3, 2))
    axis = figure.add_subplot()
    axis.text(0.5, 0.5, "first label here", transform=axis.transAxes)
    axis.text(0.52, 0.5, "second label here", transform=axis.transAxes)
    axis.text(0.9, 0.1, "this one runs far past the right edge", transform=axis.transAxes)
    problems = text_layout_problems(figure)
    assert any("'first label here' overlaps 'second label here'" in p for p in problems)
    assert any("runs far past" in p and "leaves the" in p for p in problems)


def test_the_checker_catches_the_old_overlapping_tick_labels() -> None:
    """The layout the bar figure had before: two long settings labels under one 4-inch panel
    (issue 15's corloc_registers.png) overlap, and the checker says so."""
    figure = Figure(figsize=(5.0, 4.2), layout="constrained")
    axis = figure.add_subplot()
    axis.bar([0, 1], [40, 50])
    labels = [f"{LONG_MODEL}\n{feature}, k=100, bias=0, fp32, SMOKE (random weights)"
              for feature in ("k", "v")]
    axis.set_xticks([0, 1], labels, fontsize=7)
    assert any("overlaps" in problem for problem in text_layout_problems(figure))


def test_the_checker_ignores_tick_labels_that_are_not_drawn() -> None:
    figure = Figure(figsize=(4, 3), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for axis in axes:
        axis.plot([0, 1], [0, 100])
        axis.set_xlim(0.4, 0.6)  # most ticks fall outside the view and are never drawn
    assert_text_layout_ok(figure)


def test_register_figure_of_one_short_group_is_as_wide_as_its_legend(tmp_path: Path) -> None:
    """One backbone with all four register variants: a narrow panel, a four-entry legend."""
    runs = tmp_path / "runs"
    base, other = pair_hits(3, 1, 4, 2)
    names = {"timm_name": "vit_small_patch14_dinov2.lvd142m", "smoke": True}
    write_run(runs, "smoke-a", base, model="dinov2_vits14", **names)
    write_run(runs, "smoke-b", other, model="dinov2_vits14+ttr", ttr=1, **names)
    reg = {"timm_name": "vit_small_patch14_reg4_dinov2.lvd142m", "smoke": True, "registers": 4}
    write_run(runs, "smoke-c", other, model="dinov2_vits14_reg4", **reg)
    write_run(runs, "smoke-d", base, model="dinov2_vits14_reg4+ttr", ttr=1, **reg)
    board = lb.collect(runs, include_smoke=True, report=None)
    figure = lb.register_bar_figure(board.comparison)
    assert_text_layout_ok(figure)
    assert figure_says(figure, "no registers") and figure_says(figure, "trained registers")

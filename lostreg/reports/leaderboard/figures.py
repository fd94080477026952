"""Leaderboard figures: CorLoc without / with registers, and each run's IoU distribution.

Labels are wrapped to the width their slot has, and the figure grows with the number of bars,
so long model names and settings never run into each other; every figure drawn from smoke
runs (random weights) says SMOKE in red. ``tests/figure_checks.py`` holds these promises.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

from lostreg.reports.leaderboard.histogram_svg import Histogram, histogram_svg
from lostreg.reports.leaderboard.labels import SMOKE_MARK, TICK_FONT, wrap
from lostreg.reports.leaderboard.markdown import datasets_of
from lostreg.reports.leaderboard.published import VARIANT_LABELS, VARIANTS
from lostreg.reports.leaderboard.tables import DATASET_LABELS, run_settings, subset_words
from lostreg.runs.store import RunData
from lostreg.runs.summaries import IOU_BINS

BAR_COLORS = {"none": "#c6dbef", "trained": "#2171b5", "test-time": "#f16913",
              "trained+test-time": "#6a51a3"}


def figure_png(figure: Any) -> bytes:
    """PNG bytes of a matplotlib figure (Agg canvas, no pyplot state, no timestamp)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def mark_smoke(figure: Any) -> None:
    """The red SMOKE line every figure drawn from random-weight runs carries."""
    figure.suptitle(SMOKE_MARK, color="red", fontsize=10, fontweight="bold")


MAX_GROUPS = 8  # baselines (each with its variants' bars) drawn per dataset panel
MAX_ROW_INCHES = 16.0  # wider than this, the dataset panels are stacked instead of side by side
ZERO_MARK = 1.2  # CorLoc points: a bar of 0 is drawn as a stub this tall, with "0" on it


def _bar_groups(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """One group per baseline run: its bar, then a bar per variant (registers, test-time)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows.to_dict("records"):
        key = (row["run_id"], row["protocol"])
        group = groups.setdefault(key, {
            "label": f"{row['model']}\n{row['method']}: {row['protocol']}",
            "bars": [("none", row["corloc"], row["ci_low"], row["ci_high"])]})
        group["bars"].append((row["registers"], row["corloc_reg"], row["ci_low_reg"],
                              row["ci_high_reg"]))
    return list(groups.values())


def _largest_effects(groups: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` groups, those whose variants move CorLoc most (largest |with −
    without|), kept in their table order, so a panel of hundreds of pairs stays readable."""
    if len(groups) <= limit:
        return groups
    def effect(group: dict[str, Any]) -> float:
        base = group["bars"][0][1]
        return max(abs(value - base) for _, value, _, _ in group["bars"][1:])
    chosen = sorted(range(len(groups)), key=lambda i: -effect(groups[i]))[:limit]
    return [groups[i] for i in sorted(chosen)]


def _slot_inches(group: dict[str, Any]) -> float:
    return max(2.0, 0.55 * len(group["bars"]))


def _draw_bar(axis: Any, x: float, width: float, kind: str, value: float, low: float,
              high: float) -> None:
    """One bar with its interval; a CorLoc of 0 gets a visible stub and its value written,
    so it never reads as a missing bar."""
    shown = value if value > 0 else ZERO_MARK
    axis.bar(x, shown, width, yerr=[[max(value - low, 0)], [max(high - value, 0)]], capsize=3,
             color=BAR_COLORS[kind], edgecolor="#08306b", hatch="//" if kind == "none" else "",
             label=VARIANT_LABELS[kind])
    if value <= 0:
        axis.text(x, ZERO_MARK + 0.8, "0", ha="center", va="bottom", fontsize=7,
                  color="#08306b")


def _draw_panel(axis: Any, groups: list[dict[str, Any]], title: str, slots: int) -> None:
    """Bars of one dataset (the figure has one legend for all); ``slots`` positions wide, so
    stacked panels keep one bar width."""
    for position, group in enumerate(groups):
        width = 0.8 / len(group["bars"])
        for index, (kind, value, low, high) in enumerate(group["bars"]):
            _draw_bar(axis, position - 0.4 + width * (index + 0.5), width, kind, value, low,
                      high)
    axis.set_xticks(np.arange(len(groups)),
                    [wrap(group["label"], _slot_inches(group) - 0.2) for group in groups],
                    fontsize=TICK_FONT)
    axis.set_title(title)
    axis.set_xlim(-0.6, max(slots, len(groups)) - 0.4)
    axis.set_ylim(0, 100)


def empty_figure(text: str, smoke: bool, height: float = 3.0) -> Any:
    """A figure that says in words why there is nothing to draw (SMOKE-marked if need be)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, height), layout="constrained")
    axis = figure.add_subplot()
    axis.axis("off")
    axis.text(0.5, 0.5, text, ha="center", va="center")
    if smoke:
        mark_smoke(figure)
    return figure


def register_bar_figure(comparison: pd.DataFrame, max_groups: int = MAX_GROUPS) -> Any:
    """Grouped bars per dataset: each baseline beside its trained-register and test-time-
    register variants (ours only), 95% bootstrap intervals. At most ``max_groups`` baselines
    per dataset (the largest effects; the figure says how many it left out, comparison.md
    lists them all); panels side by side, or stacked when that would be too wide."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ours = comparison[comparison["source"] == "ours"]
    smoke = bool(ours["smoke"].fillna(False).astype(bool).any())
    pairs = ours[ours["model_reg"].notna()]
    if pairs.empty:
        return empty_figure("no register pairs among the runs yet", smoke)
    datasets = [name for name in datasets_of(pairs) if name in set(pairs["dataset"])]
    every = [_bar_groups(pairs[pairs["dataset"] == name]) for name in datasets]
    panels = [_largest_effects(groups, max_groups) for groups in every]
    widths = [sum(_slot_inches(group) for group in groups) for groups in panels]
    stacked = sum(widths) > MAX_ROW_INCHES
    lines = max(wrap(group["label"], _slot_inches(group) - 0.2).count("\n") + 1
                for groups in panels for group in groups)
    present = {bar[0] for groups in panels for group in groups for bar in group["bars"]}
    kinds = [kind for kind in VARIANTS if kind in present]
    # one row of legend entries (patch, gap, label at 8 pt): the figure is at least that wide
    legend_inches = sum(0.6 + 0.065 * len(VARIANT_LABELS[kind]) for kind in kinds) + 0.4
    row_height = 3.6 + 0.14 * lines
    width = max(max(widths) if stacked else sum(widths), legend_inches) + 1.2
    figure = Figure(figsize=(width, row_height * (len(datasets) if stacked else 1) + 0.3),
                    layout="constrained")
    shape = (len(datasets), 1) if stacked else (1, len(datasets))
    axes = figure.subplots(*shape, sharey=True, squeeze=False,
                           gridspec_kw={} if stacked else {"width_ratios": widths}).ravel()
    slots = max(len(groups) for groups in panels) if stacked else 0
    for axis, name, groups, all_groups in zip(axes, datasets, panels, every, strict=True):
        left_out = len(all_groups) - len(groups)
        title = DATASET_LABELS.get(name, name) + (
            f": {len(groups)} of {len(all_groups)} baselines, the largest effects "
            f"({left_out} more in comparison.md)" if left_out else "")
        _draw_panel(axis, groups, wrap(title, width - 1.0, fontsize=11), slots)
        if stacked or axis is axes[0]:
            axis.set_ylabel("CorLoc (%) with 95% bootstrap CI")
    figure.legend(handles=[Patch(facecolor=BAR_COLORS[k], edgecolor="#08306b",
                                 hatch="//" if k == "none" else "", label=VARIANT_LABELS[k])
                           for k in kinds], loc="outside lower center", ncols=len(kinds),
                  fontsize=8)
    if smoke:
        mark_smoke(figure)
    return figure


def iou_counts(run: RunData) -> np.ndarray:
    """Images per ``IOU_BINS`` bin of the run's best IoU: from its summary, or counted from
    its predictions for a run built by hand."""
    histograms = getattr(run, "histograms", None)
    if histograms is not None and "best_iou" in histograms:
        return np.asarray(histograms["best_iou"], dtype=np.int64)
    return np.histogram(run.predictions["best_iou"].to_numpy(dtype=float), IOU_BINS)[0]


def iou_histogram(run: RunData) -> Histogram:
    """What a box run's IoU histogram shows: each image's best IoU, the 0.5 hit threshold,
    the run's CorLoc and images, and a subset's warning."""
    counts = tuple(int(count) for count in iou_counts(run))
    subset = subset_words(run_settings(run))
    title = (f"{run.run_id}\nCorLoc {run.summary['corloc']:.1f} on {sum(counts)} images"
             + (f" ({subset}: not comparable with published figures)" if subset else ""))
    return Histogram(counts, title, "best IoU with a ground-truth box", bool(run.smoke),
                     threshold=0.5, threshold_label="hit threshold 0.5")


def iou_svg(run: RunData) -> str:
    """The run's IoU histogram (``figures/iou/<run id>.svg``), as SVG text."""
    return histogram_svg(iou_histogram(run))

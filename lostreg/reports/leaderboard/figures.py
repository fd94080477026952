"""Leaderboard figures: CorLoc without / with registers, and each run's IoU distribution.

Labels are wrapped to the width their slot has, and the figure grows with the number of bars,
so long model names and settings never run into each other; every figure drawn from smoke
runs (random weights) says SMOKE in red. ``tests/figure_checks.py`` holds these promises.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lostreg.reports.leaderboard.markdown import datasets_of
from lostreg.reports.leaderboard.published import VARIANT_LABELS, VARIANTS
from lostreg.reports.leaderboard.tables import DATASET_LABELS, run_settings, subset_words
from lostreg.runs.store import RunData
from lostreg.runs.summaries import IOU_BINS

SMOKE_MARK = "SMOKE (random weights): not a result"
TICK_FONT = 7  # points
# a character's width in ems, generous (wide letters, underscores) so wrapped labels fit
CHAR_EMS = 0.7
BAR_COLORS = {"none": "#c6dbef", "trained": "#2171b5", "test-time": "#f16913",
              "trained+test-time": "#6a51a3"}


def figure_png(figure: Any) -> bytes:
    """PNG bytes of a matplotlib figure (Agg canvas, no pyplot state, no timestamp)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    return _png(figure)


def _png(figure: Any) -> bytes:
    """``figure_png`` of a figure that has its Agg canvas (and renderer) already."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def mark_smoke(figure: Any) -> None:
    """The red SMOKE line every figure drawn from random-weight runs carries."""
    figure.suptitle(SMOKE_MARK, color="red", fontsize=10, fontweight="bold")


def wrap(text: str, inches: float, fontsize: float = TICK_FONT) -> str:
    """``text`` wrapped to lines that fit ``inches`` at ``fontsize`` (long names broken)."""
    width = max(8, int(inches * 72 / (fontsize * CHAR_EMS)))
    return "\n".join(textwrap.fill(part, width, break_long_words=True, break_on_hyphens=False)
                     for part in text.split("\n"))


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


@dataclass(frozen=True)
class IouPlot:
    """What a run's IoU figure shows, and nothing else: the figure is a function of it (the
    leaderboard redraws a run's figure only when this changes, ``drawing``)."""

    run_id: str
    counts: tuple[int, ...]  # images per ``IOU_BINS`` bin of the best IoU
    corloc: float
    subset: str  # ``subset_words``: '' for a run on the whole split
    smoke: bool

    @classmethod
    def of(cls, run: RunData) -> IouPlot:
        return cls(run.run_id, tuple(int(c) for c in iou_counts(run)), run.summary["corloc"],
                   subset_words(run_settings(run)), bool(run.smoke))


def iou_counts(run: RunData) -> np.ndarray:
    """Images per ``IOU_BINS`` bin of the run's best IoU: from its summary, or counted from
    its predictions for a run built by hand."""
    histograms = getattr(run, "histograms", None)
    if histograms is not None and "best_iou" in histograms:
        return np.asarray(histograms["best_iou"], dtype=np.int64)
    return np.histogram(run.predictions["best_iou"].to_numpy(dtype=float), IOU_BINS)[0]


def iou_figure(run: RunData) -> Any:
    """Histogram of each image's best IoU, with the 0.5 hit threshold."""
    return iou_plot_figure(IouPlot.of(run))


def iou_title(plot: IouPlot, counts: np.ndarray) -> str:
    """The IoU figure's title: the run, its CorLoc and images, and a subset's warning."""
    title = (f"{wrap(plot.run_id, 5.2, fontsize=8)}\nCorLoc {plot.corloc:.1f} on "
             f"{int(counts.sum())} images"
             + (f" ({plot.subset}: not comparable with published figures)" if plot.subset
                else ""))
    return wrap(title, 5.6, fontsize=8)


def iou_plot_figure(plot: IouPlot) -> Any:
    """``iou_figure`` from what it shows. The bars are drawn from the bin counts (each bin's
    centre weighted by its count): the same bars, to the pixel, as a histogram of every
    image's IoU (``tests/test_leaderboard_summaries.py``)."""
    return _iou_figure(plot, layout="constrained")


def _iou_figure(plot: IouPlot, layout: str | None) -> Any:
    """The IoU figure of ``plot`` (``layout``: constrained, or None for ``IouCanvas``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.0, 3.8), layout=layout)
    axis = figure.add_subplot()
    counts = np.asarray(plot.counts, dtype=np.int64)
    axis.hist((IOU_BINS[:-1] + IOU_BINS[1:]) / 2, bins=IOU_BINS, weights=counts,
              color="#2171b5", edgecolor="white")
    axis.axvline(0.5, color="red", linestyle="--", label="hit threshold 0.5")
    axis.set_title(iou_title(plot, counts), fontsize=8)
    axis.set_xlabel("best IoU with a ground-truth box")
    axis.set_ylabel("images")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole images only
    axis.set_xlim(0, 1)
    axis.legend(fontsize=8)
    if plot.smoke:
        mark_smoke(figure)
    return figure


class IouCanvas:
    """Many runs' IoU figures, each PNG byte for byte ``figure_png(iou_plot_figure(plot))``,
    in under half the time: a leaderboard of 500 runs draws 500 of them (issue 20).

    Half of a fresh figure's time is constrained layout, which draws the figure once more to
    measure its texts. The layout only moves the axes (and the SMOKE line), and what it reads
    of this figure is the title's height (its width is left out of the layout), the y tick
    labels drawn (their widths set the left margin) with their offset, if any, and whether
    SMOKE is shown; the rest (x ticks and labels, axis labels, the legend inside the axes) is
    the same in every figure. So one figure is kept and updated for each plot (bar heights,
    limits, title, SMOKE), and each layout key's positions, taken from a fresh figure the
    first time the key is seen, are set on it before it is drawn once, without the layout
    engine, by its own renderer (whose text metrics it keeps). The y tick labels are read
    through ``Axis._update_ticks`` (what a draw itself uses): private to matplotlib, whose
    version keys every figure (``drawing.drawing_code``); ``tests/test_leaderboard_speed.py``
    holds the bytes equal to fresh figures'.
    """

    def __init__(self) -> None:
        self.figure: Any = None
        self.layouts: dict[tuple, tuple] = {}

    def png(self, plot: IouPlot) -> bytes:
        if self.figure is None:  # no layout engine: drawn once, where it is placed
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            self.figure = _iou_figure(plot, layout=None)
            FigureCanvasAgg(self.figure)
        key = self._show(plot)
        layout = self.layouts.get(key)
        if layout is None:
            fresh = iou_plot_figure(plot)
            png = figure_png(fresh)  # drawn with constrained layout: the reference
            self.layouts[key] = self._layout_of(fresh)
            return png
        self._place(layout)
        return _png(self.figure)  # its own canvas: the renderer's text metrics are reused

    def _show(self, plot: IouPlot) -> tuple:
        """Update the kept figure to show ``plot``; returns its layout key."""
        figure = self.figure
        axis = figure.axes[0]
        counts = np.asarray(plot.counts, dtype=np.int64)
        for bar, count in zip(axis.patches, counts.tolist(), strict=True):
            bar.set_height(count)
        # what ``relim`` gives (a third of this step's time): the bars stand on 0 and the
        # tallest ends at its count; their x extent, the bins, never changes
        axis.dataLim.y1 = float(counts.max(initial=0))
        axis.autoscale_view()
        axis.title.set_text(iou_title(plot, counts))
        if plot.smoke and figure._suptitle is None:
            mark_smoke(figure)
        if figure._suptitle is not None:
            figure._suptitle.set_visible(plot.smoke)
        renderer = figure.canvas.get_renderer()
        labels = tuple(tick.label1.get_text() for tick in axis.yaxis._update_ticks())
        offset = axis.yaxis.major.formatter.get_offset()  # e.g. 1e6 above the axis
        return axis.title.get_window_extent(renderer).height, labels, offset, plot.smoke

    @staticmethod
    def _layout_of(figure: Any) -> tuple:
        """Where constrained layout put the axes (both positions) and the SMOKE line."""
        axis = figure.axes[0]
        suptitle = figure._suptitle.get_position() if figure._suptitle is not None else None
        return (axis.get_position(original=True).get_points().copy(),
                axis.get_position(original=False).get_points().copy(), suptitle)

    def _place(self, layout: tuple) -> None:
        from matplotlib.transforms import Bbox

        original, active, suptitle = layout
        axis = self.figure.axes[0]
        axis._set_position(Bbox(original), which="original")
        axis._set_position(Bbox(active), which="active")
        if suptitle is not None:
            self.figure._suptitle.set_position(suptitle)

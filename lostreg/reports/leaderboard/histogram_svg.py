"""One run's IoU histogram as a small SVG file, written directly, without matplotlib.

The leaderboard draws one histogram per run (``figures/iou/<run id>.svg`` for box runs,
``figures/saliency_iou/<run id>.svg`` for mask runs), and users will have thousands of runs.
A matplotlib PNG of this figure cost 75–100 ms of CPU per run (text layout and rasterising),
half of a cold 500-run build (issue 20's goal is 30 s). The figure itself is twenty bars, two
axes and a few lines of text, so it is written here as SVG text: well under a millisecond per
run, a pure function of :class:`Histogram` (same input, same bytes), sharp at any zoom, a few
kilobytes, and shown by browsers, GitHub and notebooks (``IPython.display.SVG``).

Texts are wrapped to the width they have with the leaderboard's generous character estimate
(``labels.wrap``), and the figure grows with the title's lines; ``tests/figure_checks.py``
measures every text of the SVG with matplotlib's own DejaVu Sans metrics to hold that no text
leaves the canvas or runs into another one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from lostreg.reports.leaderboard.labels import CHAR_EMS, SMOKE_MARK, wrap
from lostreg.runs.summaries import IOU_BINS

FONT = "DejaVu Sans, Verdana, Arial, sans-serif"
WIDTH = 600
PLOT_HEIGHT = 240
TITLE_PX, LABEL_PX, TICK_PX = 12, 11, 10  # font sizes
TITLE_LINE = 15  # px between title lines
CHAR_PX = 0.62  # a digit's advance in ems (DejaVu Sans: 0.636), for the y tick labels
MARGIN = 10
BAR_COLOR = "#2171b5"
MAX_TICKS = 5  # y intervals at most: ticks at 0, step, ..., at most MAX_TICKS steps


@dataclass(frozen=True)
class Histogram:
    """What one run's IoU histogram shows, and nothing else: the SVG is a function of it, and
    the leaderboard redraws a run's histogram only when this changes (``drawing``)."""

    counts: tuple[int, ...]  # images per ``IOU_BINS`` bin
    title: str  # lines separated by newlines; wrapped here to the figure's width
    x_label: str
    smoke: bool
    threshold: float | None = None  # a dashed red line at this IoU, in the legend
    threshold_label: str = ""


def y_step(top: int) -> int:
    """The y tick step: the smallest of 1, 2, 5, 10, 20, 50, ... giving at most ``MAX_TICKS``
    intervals up to ``top`` (whole images only, as ``MaxNLocator(integer=True)`` did)."""
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if math.ceil(top / (mantissa * scale)) <= MAX_TICKS:
                return mantissa * scale
        scale *= 10


def _text(x: float, y: float, words: str, size: int, *, anchor: str = "start",
          extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
            f'{extra}>{escape(words)}</text>')


def _title_lines(histogram: Histogram) -> list[str]:
    usable = WIDTH - 2 * MARGIN
    return wrap(histogram.title, usable / 72, fontsize=TITLE_PX).split("\n")


def _y_axis(counts: tuple[int, ...]) -> tuple[int, list[int], float]:
    """The axis top, its ticks, and the left margin their labels need."""
    tallest = max(max(counts, default=0), 1)
    step = y_step(tallest)
    top = step * math.ceil(tallest / step)
    ticks = list(range(0, top + 1, step))
    widest = max(len(f"{tick:,}") for tick in ticks)
    return top, ticks, MARGIN + LABEL_PX * 1.3 + widest * TICK_PX * CHAR_PX + 10


def _bars(counts: tuple[int, ...], left: float, top_px: float, width: float,
          y_top: int) -> list[str]:
    bars = []
    for low, high, count in zip(IOU_BINS[:-1], IOU_BINS[1:], counts, strict=True):
        if count:
            height = PLOT_HEIGHT * count / y_top
            bars.append(f'<rect x="{left + width * low:.2f}" y="{top_px + PLOT_HEIGHT - height:.2f}"'
                        f' width="{width * (high - low):.2f}" height="{height:.2f}"'
                        f' fill="{BAR_COLOR}" stroke="white" stroke-width="1"/>')
    return bars


def _axes(left: float, top_px: float, width: float, ticks: list[int], y_top: int,
          x_label: str) -> list[str]:
    """Frame, ticks, tick labels and axis labels."""
    bottom = top_px + PLOT_HEIGHT
    parts = [f'<rect x="{left:.2f}" y="{top_px:.2f}" width="{width:.2f}" '
             f'height="{PLOT_HEIGHT}" fill="none" stroke="black" stroke-width="0.8"/>']
    for tick in ticks:
        y = bottom - PLOT_HEIGHT * tick / y_top
        parts.append(f'<line x1="{left - 4:.2f}" y1="{y:.2f}" x2="{left:.2f}" y2="{y:.2f}" '
                     'stroke="black" stroke-width="0.8"/>')
        parts.append(_text(left - 6, y + TICK_PX * 0.35, f"{tick:,}", TICK_PX, anchor="end"))
    for tenth in range(0, 11, 2):
        x = left + width * tenth / 10
        parts.append(f'<line x1="{x:.2f}" y1="{bottom:.2f}" x2="{x:.2f}" y2="{bottom + 4:.2f}" '
                     'stroke="black" stroke-width="0.8"/>')
        parts.append(_text(x, bottom + 6 + TICK_PX, f"{tenth / 10:.1f}", TICK_PX,
                           anchor="middle"))
    parts.append(_text(left + width / 2, bottom + 10 + TICK_PX + LABEL_PX * 1.3, x_label,
                       LABEL_PX, anchor="middle"))
    y_middle = top_px + PLOT_HEIGHT / 2
    parts.append(_text(MARGIN + LABEL_PX, y_middle, "images", LABEL_PX, anchor="middle",
                       extra=f' transform="rotate(-90 {MARGIN + LABEL_PX:.1f} {y_middle:.1f})"'))
    return parts


def _threshold(histogram: Histogram, left: float, top_px: float, width: float) -> list[str]:
    """The dashed threshold line, and its legend in the plot's top right corner."""
    if histogram.threshold is None:
        return []
    x = left + width * histogram.threshold
    legend_width = len(histogram.threshold_label) * TICK_PX * CHAR_EMS + 40
    legend_x = left + width - legend_width - 6
    return [
        f'<line x1="{x:.2f}" y1="{top_px:.2f}" x2="{x:.2f}" y2="{top_px + PLOT_HEIGHT:.2f}" '
        'stroke="red" stroke-width="1.5" stroke-dasharray="6 3"/>',
        f'<rect x="{legend_x:.2f}" y="{top_px + 6:.2f}" width="{legend_width:.2f}" height="20" '
        'fill="white" fill-opacity="0.85" stroke="#cccccc" stroke-width="0.8"/>',
        f'<line x1="{legend_x + 6:.2f}" y1="{top_px + 16:.2f}" x2="{legend_x + 28:.2f}" '
        f'y2="{top_px + 16:.2f}" stroke="red" stroke-width="1.5" stroke-dasharray="6 3"/>',
        _text(legend_x + 34, top_px + 16 + TICK_PX * 0.35, histogram.threshold_label, TICK_PX),
    ]


def histogram_svg(histogram: Histogram) -> str:
    """The SVG document of ``histogram``: a function of it alone (no date, no random ids)."""
    if len(histogram.counts) != len(IOU_BINS) - 1:
        raise ValueError(f"{len(histogram.counts)} counts for {len(IOU_BINS) - 1} bins")
    lines = _title_lines(histogram)
    y = MARGIN
    header = []
    if histogram.smoke:
        y += 14
        header.append(_text(WIDTH / 2, y, SMOKE_MARK, 13, anchor="middle",
                            extra=' fill="red" font-weight="bold"'))
        y += 6
    for line in lines:
        y += TITLE_LINE
        header.append(_text(WIDTH / 2, y, line, TITLE_PX, anchor="middle"))
    top_px = y + 12
    y_top, ticks, left = _y_axis(histogram.counts)
    width = WIDTH - left - MARGIN - 6
    height = top_px + PLOT_HEIGHT + 14 + TICK_PX + LABEL_PX * 1.3 + MARGIN
    body = (_bars(histogram.counts, left, top_px, width, y_top)
            + _axes(left, top_px, width, ticks, y_top, histogram.x_label)
            + _threshold(histogram, left, top_px, width))
    described = escape(" ".join(lines))
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
        f'viewBox="0 0 {WIDTH} {height:.0f}" font-family={quoteattr(FONT)}>',
        f"<title>{described}</title>",
        f'<rect width="{WIDTH}" height="{height:.0f}" fill="white"/>',
        *header, *body, "</svg>", ""])

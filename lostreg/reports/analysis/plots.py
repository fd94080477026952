"""Matplotlib figures of the analyses (Agg backend: files only, no display needed).

Every figure goes through :func:`finish_figure`, which is what keeps them readable whatever the
labels: long titles (model names, image ids) are wrapped to the width they have instead of
running off the canvas, the layout is ``constrained`` (it makes room for titles, colorbars and
the footer), and a figure made from random weights carries a red ``SMOKE RUN`` footer, so a
smoke figure copied out of its folder still says what it is (a figure of an unfinished run, the
red ``UNFINISHED RUN`` words of ``marks`` in the same footer). Axes use plain tick labels
(:class:`PlainFormatter`): no offset notation such as ``1e-6+1.428e-2``, no ``4×10^0`` minor
labels crowding a log axis.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from lostreg.io import atomic_write_bytes
from lostreg.reports.analysis.marks import SMOKE_MARK

SMOKE_COLOUR = "#bb0000"
MAX_TICKS = 6


def save_figure(fig: Figure, path: str | Path, dpi: float | None = None) -> None:
    """Render ``fig`` to PNG bytes (at ``dpi``, default the figure's own) and write them
    atomically. Figures from :func:`new_figure` are laid out at their own dpi, which is the
    one to save them at: glyph widths do not scale exactly with dpi."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi)
    atomic_write_bytes(path, buffer.getvalue())


# --- tick labels -----------------------------------------------------------------------------


def _fixed(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text  # no "-0.00"


class PlainFormatter(ticker.Formatter):
    """Tick labels in plain decimal notation, with the fewest decimals that tell all ticks of
    the axis apart and stay within 1% of each value.

    Why: matplotlib's default falls back to an offset (``1e-6+1.428e-2``) on a near-constant
    colour map, and to ``3×10^0`` minor labels on a narrow log axis; both are hard to read and
    the minor labels overlap. Values beyond ``[1e-4, 1e6)`` use compact scientific notation
    per label (still never an offset).
    """

    def format_ticks(self, values: Sequence[float]) -> list[str]:
        values = [float(v) for v in values]
        finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
        if finite and (max(finite) >= 1e6 or max(finite) < 1e-4):
            return self._scientific(values)
        for decimals in range(13):
            labels = [_fixed(v, decimals) for v in values]
            close = all(abs(float(t) - v) <= 0.01 * abs(v) for t, v in zip(labels, values,
                                                                             strict=True))
            if close and len(set(labels)) == len(labels):
                return labels
        return self._scientific(values)

    @staticmethod
    def _scientific(values: list[float]) -> list[str]:
        for digits in range(10):
            labels = [f"{v:.{digits}e}".replace("e-0", "e-").replace("e+0", "e")
                      for v in values]
            if len(set(labels)) == len(labels):
                return labels
        return [repr(v) for v in values]

    def __call__(self, value: float, pos: int | None = None) -> str:
        locs = list(getattr(self, "locs", []) or [])
        if value in locs:
            return self.format_ticks(locs)[locs.index(value)]
        return self.format_ticks([value])[0]

    def get_offset(self) -> str:
        return ""


class PlainLogLocator(ticker.Locator):
    """Major ticks for a log axis: 1-2-5 steps, else every 1..9 step when 1-2-5 gives fewer
    than three, else decades when those are too many; a few evenly spaced ticks when the range
    is too narrow to hold two of them."""

    def __init__(self, max_ticks: int = MAX_TICKS) -> None:
        self.max_ticks = max_ticks

    def __call__(self) -> list[float]:
        vmin, vmax = self.axis.get_view_interval()
        return self.tick_values(vmin, vmax)

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        vmin, vmax = sorted((float(vmin), float(vmax)))
        if not (vmax > 0 and math.isfinite(vmax)):
            return []
        vmin = vmin if vmin > 0 else vmax / 10
        def within(subs: tuple[float, ...]) -> list[float]:
            return [t for t in ticker.LogLocator(subs=subs, numticks=99).tick_values(vmin, vmax)
                    if vmin * (1 - 1e-9) <= t <= vmax * (1 + 1e-9)]

        one_two_five, every, decades = within((1.0, 2.0, 5.0)), within(tuple(range(1, 10))), \
            within((1.0,))
        for ticks, least in ((one_two_five, 3), (every, 3), (decades, 2), (one_two_five, 2)):
            if least <= len(ticks) <= self.max_ticks:
                return ticks
        if len(decades) > self.max_ticks:
            return list(ticker.LogLocator(numticks=self.max_ticks).tick_values(vmin, vmax))
        return [t for t in ticker.MaxNLocator(nbins=3).tick_values(vmin, vmax)
                if vmin <= t <= vmax]


def plain_ticks(axis: Axis, log: bool = False, integer: bool = False) -> None:
    """Plain tick labels on ``axis`` (see :class:`PlainFormatter`); minor ticks unlabelled.
    ``integer``: a linear axis of counts gets whole-number ticks only."""
    axis.set_major_locator(PlainLogLocator() if log
                           else ticker.MaxNLocator(nbins=5, integer=integer))
    axis.set_major_formatter(PlainFormatter())
    axis.set_minor_formatter(ticker.NullFormatter())


def add_colorbar(fig: Figure, image, ax, log: bool = False):
    """A colorbar beside ``ax`` with plain tick labels and no minor ticks."""
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.locator = PlainLogLocator(max_ticks=5) if log else ticker.MaxNLocator(nbins=4)
    bar.formatter = PlainFormatter()
    bar.minorticks_off()
    bar.ax.tick_params(labelsize=7)
    return bar


# --- text that fits ----------------------------------------------------------------------------


def wrap_to_width(text: Text, max_width_px: float, renderer) -> bool:
    """Re-wrap ``text`` (at spaces, else inside long words) until it is at most
    ``max_width_px`` wide; lines already short enough are kept. True if it was re-wrapped."""
    original = text.get_text()
    if not original or text.get_window_extent(renderer).width <= max_width_px:
        return False
    chars = max(len(line) for line in original.splitlines())
    while chars > 6:
        chars = max(6, int(chars * 0.9))
        text.set_text("\n".join(
            textwrap.fill(line, chars, break_long_words=True, break_on_hyphens=False)
            for line in original.splitlines()))
        if text.get_window_extent(renderer).width <= max_width_px:
            break
    return True


def finish_figure(fig: Figure, title: str | None = None, smoke: bool = False,
                  title_size: float = 9, footer: Sequence[str] = ()) -> None:
    """Title, smoke footer and text fitting: call last, on a figure with constrained layout.

    ``footer``: more warnings drawn under the smoke mark, in the same red (an unfinished run's
    mark, ``marks.unfinished_mark``); none leaves the figure as it always was.

    Axes titles are wrapped to their axes' width and the title to the figure's after a layout
    pass (sizes are only known then); when something was wrapped, the layout runs again and
    the widths are checked again (taller titles can shrink an image axes' width too). The
    final layout is then frozen, so ``savefig`` draws exactly what was measured and does not
    pay for another layout pass.
    """
    headings = []
    if title:
        headings.append(fig.suptitle(title, fontsize=title_size))
    warnings = ([SMOKE_MARK] if smoke else []) + list(footer)
    if warnings:
        headings.append(fig.supxlabel("\n".join(warnings), color=SMOKE_COLOUR,
                                      fontweight="bold", fontsize=title_size))
    renderer = fig.canvas.get_renderer()
    engine = fig.get_layout_engine()

    def wrap_all() -> bool:
        wrapped = [wrap_to_width(ax.title, ax.get_window_extent(renderer).width, renderer)
                   for ax in fig.axes if ax.get_visible()]
        wrapped += [wrap_to_width(heading, 0.96 * fig.bbox.width, renderer)
                    for heading in headings]
        return any(wrapped)

    if engine is None:
        wrap_all()
        return
    for _ in range(3):
        engine.execute(fig)  # positions only: cheaper than drawing the whole figure
        if not wrap_all():
            break
    else:
        engine.execute(fig)
    fig.set_layout_engine("none")


def new_figure(nrows: int, ncols: int, panel_size: tuple[float, float], dpi: float = 110):
    """A constrained-layout grid of ``nrows x ncols`` axes, each about ``panel_size`` inches,
    at the ``dpi`` it will be saved with. A plain ``Figure`` on an Agg canvas, not pyplot's:
    nothing global keeps it alive (a long analysis or a notebook draws hundreds), and
    importing this module leaves the caller's matplotlib backend alone."""
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained",
                 dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def panel_grid(n_panels: int, panel_size: tuple[float, float], dpi: float = 90) -> tuple:
    """``n_panels`` axes in rows of at most 4 (``new_figure``), the unused ones hidden:
    returns the figure and its axes, row by row."""
    ncols = min(4, n_panels)
    fig, axes = new_figure(math.ceil(n_panels / ncols), ncols, panel_size, dpi=dpi)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat


# --- the norms analysis' figures ---------------------------------------------------------------


def log_bins(values: np.ndarray, count: int = 120) -> np.ndarray:
    """Log-spaced bin edges covering the positive ``values``."""
    positive = values[np.isfinite(values) & (values > 0)]
    low, high = (float(positive.min()), float(positive.max())) if positive.size else (1.0, 10.0)
    if not high > low:
        low, high = low / 1.1, high * 1.1
    return np.logspace(np.log10(low), np.log10(high), count + 1)


def norm_histogram(path: str | Path, norms: np.ndarray, threshold: float | None,
                   title: str, smoke: bool = False) -> None:
    """Histogram of token norms on a log x-axis (linear and log counts), threshold marked."""
    values = np.asarray(norms, dtype=np.float64)
    bins = log_bins(values)
    fig, axes = new_figure(1, 2, (5.5, 4))
    for ax, log_y in zip(axes[0], (False, True), strict=True):
        ax.hist(values, bins=bins, color="#4477aa", histtype="stepfilled")
        ax.set_xscale("log")
        plain_ticks(ax.xaxis, log=True)
        if log_y:
            ax.set_yscale("log")
        plain_ticks(ax.yaxis, log=log_y, integer=True)
        ax.set_xlabel("token L2 norm (log scale)")
        ax.set_ylabel("tokens" + (" (log scale)" if log_y else ""))
        if threshold is not None:
            share = float((values > threshold).mean()) if values.size else 0.0
            ax.axvline(threshold, color="#cc3311", linestyle="--",
                       label=f"threshold {threshold:.3g} ({share:.2%} outliers)")
            ax.legend(loc="upper right", fontsize=8)
    finish_figure(fig, title, smoke, title_size=10)
    save_figure(fig, path)


def similarity_histogram(path: str | Path, outlier_sims: np.ndarray, normal_sims: np.ndarray,
                         title: str, smoke: bool = False) -> None:
    """Neighbour similarity of outlier vs normal tokens (density-normalised histograms)."""
    fig, axes = new_figure(1, 1, (6.5, 4.2))
    ax = axes[0, 0]
    bins = np.linspace(-1, 1, 81)
    for values, label, colour in ((normal_sims, "normal tokens", "#4477aa"),
                                  (outlier_sims, "outlier tokens", "#cc3311")):
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=bins, density=True, alpha=0.6, color=colour, histtype="stepfilled",
                    label=f"{label} (mean {values.mean():.3f}, n={values.size})")
    plain_ticks(ax.xaxis)
    plain_ticks(ax.yaxis)
    ax.set_xlabel("mean cosine similarity to the 4 neighbours (input patch embedding)")
    ax.set_ylabel("density")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
    finish_figure(fig, title, smoke, title_size=10)
    save_figure(fig, path)

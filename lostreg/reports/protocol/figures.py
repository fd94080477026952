"""The protocol's figures, drawn from ``protocol.csv``'s rows (so the notebook can redraw them).

* ``heatmap_figure``: one per normalisation: block x feature, each cell the best CorLoc over the
  Gram biases with that bias written under it, the best point of the whole grid framed;
* ``bias_figure``: CorLoc against the Gram bias, a panel per feature, a line per block, the
  95% interval as a band;
* ``positions_figure``: every point ranked by CorLoc with its interval, and the published
  figures as horizontal lines: where each published number falls in the grid.

Each best-of-grid mark says, in the figure, that the point was chosen on the images it is
scored on, and gives the held-out estimate when there is one. Figures of random-weight runs
carry the red SMOKE footer of ``lostreg.reports.analysis.plots``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lostreg.reports.analysis.plots import add_colorbar, finish_figure, new_figure
from lostreg.reports.protocol.grid import FEATURE_ORDER, GridPoint
from lostreg.reports.protocol.table import points_of

COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
BEST_COLOUR = "#cc0000"
# a legend right of its axes: constrained layout then keeps it clear of the title
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}


@dataclass(frozen=True)
class PublishedMark:
    """One published figure drawn beside the grid: a short label and its CorLoc."""

    label: str
    corloc: float


def features_of(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["feature"].unique(), key=lambda f: (FEATURE_ORDER.get(f, 9), f))


def layers_of(frame: pd.DataFrame) -> list[int]:
    """Blocks from the last one backwards (-1, -2, ...), non-negative indices after them."""
    return sorted({int(v) for v in frame["layer"]}, key=lambda v: (v >= 0, -v if v < 0 else v))


def best_per_cell(frame: pd.DataFrame) -> pd.DataFrame:
    """For each (feature, layer): the row with the best CorLoc over its biases (ties: the
    first in the frame's order, which is grid order)."""
    best = frame.loc[frame.groupby(["feature", "layer"], sort=False)["corloc"].idxmax()]
    return best.set_index(["feature", "layer"])


def _cell_text(value: float, bias: float, several_biases: bool) -> str:
    return f"{value:.1f}\nb {bias:g}" if several_biases else f"{value:.1f}"


def heatmap_figure(frame: pd.DataFrame, normalize: str, title: str, smoke: bool,
                   best: GridPoint | None, value_range: tuple[float, float],
                   note: str = "") -> Figure:
    """Block x feature for one normalisation (rows of ``frame`` of one interpolation)."""
    rows = frame[frame["normalize"] == normalize]
    features, layers = features_of(rows), layers_of(rows)
    cells = best_per_cell(rows)
    several = rows.groupby(["feature", "layer"])["gram_bias"].nunique().max() > 1
    values = np.full((len(layers), len(features)), np.nan)
    # at least room for the study's wrapped title, the best-of note and the SMOKE line above
    # and below a small grid (a 1 x 1 grid drew them over each other)
    fig, axes = new_figure(1, 1, (max(1.15 * len(features) + 1.9, 5.0),
                                  max(0.62 * len(layers) + 1.6, 3.6)))
    ax = axes[0, 0]
    for (feature, layer), cell in cells.iterrows():
        values[layers.index(layer), features.index(feature)] = cell["corloc"]
    image = ax.imshow(values, cmap="viridis", vmin=value_range[0], vmax=value_range[1],
                      aspect="auto")
    middle = (value_range[0] + value_range[1]) / 2
    for (feature, layer), cell in cells.iterrows():
        r, c = layers.index(layer), features.index(feature)
        ax.text(c, r, _cell_text(cell["corloc"], cell["gram_bias"], several), ha="center",
                va="center", fontsize=7, color="black" if cell["corloc"] > middle else "white")
        if best is not None and (best.normalize, best.feature, best.layer) == (
                normalize, feature, layer):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, linewidth=2.5,
                                   edgecolor=BEST_COLOUR))
    ax.set_xticks(range(len(features)), features)
    ax.set_yticks(range(len(layers)), [f"L{layer}" for layer in layers])
    ax.set_xlabel("feature")
    ax.set_ylabel("block")
    biases = sorted(rows["gram_bias"].unique())
    span = (f"best Gram bias of {biases[0]:g}..{biases[-1]:g} per cell" if several
            else f"Gram bias {biases[0]:g}")
    ax.set_title(f"normalize {normalize}: {span}", fontsize=8)
    add_colorbar(fig, image, ax).set_label("CorLoc (%)", fontsize=7)
    framed = ("; red frame: best of the whole grid, chosen on these images" if best is not None
              and best.normalize == normalize else "")
    finish_figure(fig, f"{title}{framed}" + (f"\n{note}" if note else ""), smoke)
    return fig


def bias_figure(frame: pd.DataFrame, title: str, smoke: bool) -> Figure:
    """CorLoc against the Gram bias: a panel per feature, a colour per block, a line per
    normalisation with more than one bias (a lone bias is a point with its interval)."""
    features, layers = features_of(frame), layers_of(frame)
    normalizations = list(dict.fromkeys(frame["normalize"]))
    fig, axes = new_figure(1, len(features), (2.9, 2.8))
    low = float(frame["ci_low"].min())
    high = float(frame["ci_high"].max())
    pad = max(1.0, 0.05 * (high - low))
    for ax, feature in zip(axes[0], features, strict=True):
        for i, layer in enumerate(layers):
            colour = COLOURS[i % len(COLOURS)]
            for normalize in normalizations:
                part = frame[(frame["feature"] == feature) & (frame["layer"] == layer)
                             & (frame["normalize"] == normalize)].sort_values("gram_bias")
                if part.empty:
                    continue
                label = f"L{layer} {normalize}"
                x, y = part["gram_bias"].to_numpy(), part["corloc"].to_numpy()
                if len(part) > 1:
                    ax.plot(x, y, marker="o", markersize=2.5, linewidth=1.2, color=colour,
                            label=label, linestyle="-" if normalize == "l2" else "--")
                    ax.fill_between(x, part["ci_low"], part["ci_high"], color=colour,
                                    alpha=0.12, linewidth=0)
                else:
                    ax.errorbar(x, y, yerr=[y - part["ci_low"].to_numpy(),
                                            part["ci_high"].to_numpy() - y],
                                fmt="s", markersize=4, markerfacecolor="white", color=colour,
                                capsize=2, label=label)
        ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
        ax.set_title(f"feature {feature}", fontsize=8)
        ax.set_xlabel("Gram bias", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("CorLoc (%)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, -1].legend(handles, labels, fontsize=7, title="block, norm.", title_fontsize=7,
                       **LEGEND_OUTSIDE)
    finish_figure(fig, title, smoke)
    return fig


def positions_figure(frame: pd.DataFrame, title: str, smoke: bool,
                     published: Sequence[PublishedMark] = (),
                     reference: GridPoint | None = None, held_out: float | None = None) -> Figure:
    """Every point ranked by CorLoc (95% intervals), published figures as dashed lines, the
    setting the reference code uses (``reference``) marked, and the held-out estimate of the
    best-of-grid score (``held_out``) as a dotted line."""
    ranked = frame.sort_values("corloc", ascending=False, kind="stable").reset_index(drop=True)
    x = np.arange(len(ranked))
    y = ranked["corloc"].to_numpy()
    fig, axes = new_figure(1, 1, (6.4, 3.4))
    ax = axes[0, 0]
    ax.errorbar(x, y, yerr=[y - ranked["ci_low"].to_numpy(), ranked["ci_high"].to_numpy() - y],
                fmt="o", markersize=2.5, elinewidth=0.6, color="#555555",
                label="grid point (95% CI)")
    ax.plot([0], [y[0]], marker="*", markersize=11, color=BEST_COLOUR, linestyle="none",
            label=f"best of grid {y[0]:.1f} (chosen on these images)")
    if held_out is not None:
        ax.axhline(held_out, color="black", linestyle=":", linewidth=1.2,
                   label=f"best of grid, split-half held out: {held_out:.1f}")
    if reference is not None:
        where = [i for i, p in enumerate(points_of(ranked)) if p == reference]
        if where:
            ax.plot(where, y[where], marker="D", markersize=6, color="#1f78b4",
                    linestyle="none", label=f"reference setting ({reference.label()})")
    for i, mark in enumerate(published):
        ax.axhline(mark.corloc, color=COLOURS[i % len(COLOURS)], linestyle="--", linewidth=1.1,
                   label=f"{mark.label}: {mark.corloc:.1f}")
    ax.set_xlabel(f"grid points ranked by CorLoc ({len(ranked)})", fontsize=8)
    ax.set_ylabel("CorLoc (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, **LEGEND_OUTSIDE)
    finish_figure(fig, title, smoke)
    return fig

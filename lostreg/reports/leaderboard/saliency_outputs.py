"""What the leaderboard writes for mask runs: ``comparison_saliency.csv`` and the saliency
figures (``figures/saliency_iou.png``, ``figures/saliency_f_curves.png``, each mask run's IoU
histogram in ``figures/saliency_iou/``, SVG), through the leaderboard's ``FigureWriter``: a figure
is drawn again only when what it shows (its JSON inputs below) or the drawing code changed.
The mask overlays are drawn by the notebook (they read images and masks again), not here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lostreg.io import atomic_write_text
from lostreg.reports.leaderboard.drawing import MASK_HISTOGRAMS, MASK_OVERVIEW, FigureWriter
from lostreg.reports.leaderboard.saliency import SaliencyBoard, comparison_csv
from lostreg.reports.leaderboard.saliency_figures import (
    f_curve_figure,
    iou_distribution_figure,
    mask_iou_histogram,
)
from lostreg.reports.leaderboard.saliency_runs import MaskRun


def _floats(values: Any) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def figure_inputs(run: MaskRun) -> dict[str, Any]:
    """Everything a saliency figure shows of one run, as JSON (the figure's redraw key)."""
    return {"run_id": run.run_id, "settings": run.settings(), "model": run.info.model,
            "smoke": run.smoke, "figures": run.figures, "f_curve": _floats(run.f_curve),
            "ious": _floats(run.images["sal_iou"])}


def write_saliency_outputs(board: SaliencyBoard | None, out_dir: str | Path,
                           drawn: FigureWriter) -> None:
    """Write the saliency CSV and figures; figures of runs no longer listed, and the overview
    figures when no mask run is left, are removed."""
    if board is None:
        return
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "comparison_saliency.csv", comparison_csv(board))
    figures = out_dir / "figures"
    inputs = [figure_inputs(run) for run in board.runs]
    if board.runs:
        drawn.figure(MASK_OVERVIEW[0], inputs, lambda: iou_distribution_figure(board.runs))
        drawn.figure(MASK_OVERVIEW[1], inputs, lambda: f_curve_figure(board.runs))
    else:
        for name in MASK_OVERVIEW:
            (figures / name).unlink(missing_ok=True)
    drawn.histograms([(run.run_id, mask_iou_histogram(run)) for run in board.runs],
                     MASK_HISTOGRAMS)

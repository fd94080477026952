"""What the leaderboard writes for mask runs: ``comparison_saliency.csv`` and the saliency
figures (``figures/saliency_iou.png``, ``figures/saliency_f_curves.png``, each mask run's IoU
histogram in ``figures/iou/``), atomically. The mask overlays are drawn by the notebook (they
read images and masks again), not here."""

from __future__ import annotations

from pathlib import Path

from lostreg.io import atomic_write_bytes, atomic_write_text
from lostreg.reports.leaderboard.figures import figure_png
from lostreg.reports.leaderboard.saliency import SaliencyBoard, comparison_csv
from lostreg.reports.leaderboard.saliency_figures import (
    f_curve_figure,
    iou_distribution_figure,
    mask_iou_figure,
)

SALIENCY_FIGURES = ("saliency_iou.png", "saliency_f_curves.png")


def write_saliency_outputs(board: SaliencyBoard | None, out_dir: str | Path) -> set[str]:
    """Write the saliency outputs; returns the names of the IoU histograms written under
    ``figures/iou/`` (the leaderboard removes the others there). Without mask runs the two
    overview figures of an earlier build are removed, not left stale."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    if board is None:
        return set()
    atomic_write_text(out_dir / "comparison_saliency.csv", comparison_csv(board))
    if not board.runs:
        for name in SALIENCY_FIGURES:
            (figures / name).unlink(missing_ok=True)
        return set()
    atomic_write_bytes(figures / "saliency_iou.png", figure_png(iou_distribution_figure(board.runs)))
    atomic_write_bytes(figures / "saliency_f_curves.png", figure_png(f_curve_figure(board.runs)))
    written = set()
    for run in board.runs:
        name = f"{run.run_id}.png"
        atomic_write_bytes(figures / "iou" / name, figure_png(mask_iou_figure(run)))
        written.add(name)
    return written

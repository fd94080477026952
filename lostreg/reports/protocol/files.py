"""A study's folder: ``protocol.csv``, ``protocol.md``, ``selection.json`` and the figures,
each written atomically; figures of an earlier, different grid that this one no longer draws
are removed. It sits above ``study`` and ``markdown``, which only compute and format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lostreg.io import atomic_write_text, dumps_strict, null_if_undefined
from lostreg.reports.analysis.plots import save_figure
from lostreg.reports.protocol.markdown import protocol_markdown
from lostreg.reports.protocol.study import Study, study_figures
from lostreg.reports.protocol.table import protocol_csv


def selection_json(study: Study) -> dict[str, Any]:
    """The selection figures, machine-readable."""
    points = study.runs.points
    summary = {name: vars(spread) for name, spread in study.split.summary().items()}
    return {
        "smoke": study.smoke, "n_images": int(study.frame["n_images"].iloc[0]),
        "n_points": len(points),
        "best_of_grid": {"point": points[study.best.index].label(), "corloc": study.best.corloc,
                         "selection": "in-sample: chosen on the images it is scored on"},
        "split_half": {"n_splits": study.split.n_splits, "seed": study.split.seed,
                       "n_select": study.split.n_select, "n_score": study.split.n_score,
                       **summary,
                       "times_chosen": {points[i].label(): n
                                        for i, n in study.split.times_chosen().items()}},
        "cross_dataset": [{"selected_on": cross.dataset, "source": str(cross.source),
                           "n_common_points": len(cross.points),
                           "point": cross.points[cross.choice.index].label(),
                           "corloc_there": cross.choice.selected_on,
                           "held_out": cross.choice.held_out,
                           "in_sample_best": cross.choice.best.corloc,
                           "optimism": cross.choice.optimism} for cross in study.cross],
    }


def write_study(study: Study, folder: Path) -> list[Path]:
    """Write the study's files into ``folder`` atomically; returns them."""
    folder = Path(folder)
    written = [folder / "protocol.csv", folder / "protocol.md", folder / "selection.json"]
    atomic_write_text(written[0], protocol_csv(study.frame))
    atomic_write_text(written[1], protocol_markdown(study))
    atomic_write_text(written[2], dumps_strict(null_if_undefined(selection_json(study)),
                                                written[2], indent=2) + "\n")
    for name, fig in study_figures(study).items():
        save_figure(fig, folder / name)
        written.append(folder / name)
    keep = {path.name for path in written}
    for stale in folder.glob("*.png"):
        if stale.name not in keep and stale.name.startswith(("heatmap_", "bias_curves")):
            stale.unlink()
    return written

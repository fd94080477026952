"""``protocol.md``: the study in words, every best-of figure beside its selection protocol."""

from __future__ import annotations

from typing import Any

import pandas as pd

from lostreg.reports.leaderboard.published import VARIANT_LABELS
from lostreg.reports.leaderboard.tables import subset_words
from lostreg.reports.protocol.grid import GridPoint
from lostreg.reports.protocol.study import PUBLISHED_WITHIN_SHOWN, Study, within_ci
from lostreg.runs.config import SMOKE_NOTE

TOP_SHOWN = 10


def _ci(row: dict[str, Any]) -> str:
    return f"{row['corloc']:.2f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"


def _spread(spread, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{spread.mean:{sign}.2f} ± {spread.sd:.2f} "
            f"(5–95%: {spread.low:{sign}.1f} to {spread.high:{sign}.1f})")


def _points_table(rows: pd.DataFrame, extra: str | None = None) -> list[str]:
    head = "| feature | block | normalize | Gram bias | CorLoc [95% CI] |"
    rule = "|---|---|---|---|---|"
    if extra:
        head, rule = head + f" {extra} |", rule + "---|"
    head, rule = head + " run |", rule + "---|"
    lines = [head, rule]
    for row in rows.to_dict("records"):
        pos = "" if row["pos_interp"] == "original" else f" (pos {row['pos_interp']})"
        cells = [row["feature"] + pos, f"L{row['layer']}", row["normalize"],
                 f"{row['gram_bias']:g}", _ci(row)]
        if extra:
            cells.append(f"{row['distance']:.2f}")
        cells.append(f"`{row['run_id']}`")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _header(study: Study) -> list[str]:
    info, grid, frame = study.info, study.grid, study.frame
    lines = [f"# LOST protocol grid: {info.model} on {info.dataset} ({info.split})", ""]
    if study.smoke:
        lines += [f"> **{SMOKE_NOTE}.** Every number below tests the pipeline only.", ""]
    partial = subset_words({"dataset": info.dataset,
                            "dataset_images": info.identity.get("dataset_images")})
    if partial:  # never read as the benchmark's figure
        lines += [f"> **{partial[:1].upper() + partial[1:]}: not comparable with published "
                  "figures.** Those below are shown for orientation only.", ""]
    biases = "; ".join(f"{n}: bias {', '.join(f'{b:g}' for b in bs)}" for n, bs in grid.biases)
    limit = f" (the first {info.limit})" if info.limit else ""
    lines += [
        f"{len(frame)} LOST settings (k = {grid.k_patches}) on {frame['n_images'].iloc[0]} "
        f"images{limit}: features {', '.join(grid.features)} x blocks "
        f"{', '.join(str(v) for v in grid.layers)} x ({biases}) x position-embedding "
        f"interpolation {', '.join(grid.pos_interps)}. Each batch went through the backbone "
        "once per interpolation and every setting's LOST ran on its features; each setting is "
        f"an ordinary run folder under `{study.runs_dir}` (run ids in `protocol.csv`).",
        "",
        "CorLoc intervals: 95% percentile bootstrap over images (10,000 resamples, seed 0). "
        "Ties between settings go to the first in grid order (interpolation, normalisation, "
        "feature, block, bias).", ""]
    return lines


def _best_section(study: Study) -> list[str]:
    points, split = study.runs.points, study.split
    best = points[study.best.index]
    summary = split.summary()
    chosen = split.times_chosen()
    n = study.frame["n_images"].iloc[0]
    lines = [
        "## Best of the grid, and what it is worth", "",
        "The best of a grid chosen on the images it is scored on is the maximum of "
        f"{len(points)} noisy estimates, so it overstates the chosen setting's CorLoc. "
        "Each line names how its setting was chosen.", "",
        "| figure | CorLoc | setting | how the setting was chosen |", "|---|---|---|---|",
        f"| best of grid | {_ci(study.point_row(best))} | {best.label()} | on the same {n} "
        "images it is scored on (in-sample): optimistic |",
        f"| split-half, held out | {_spread(summary['held_out'])} | best on the selection half; "
        f"the full-set best in {chosen.get(study.best.index, 0)} of {split.n_splits} splits | "
        f"on a random half ({split.n_select} images), scored on the other {split.n_score}; "
        f"{split.n_splits} seeded splits (seed {split.seed}), mean ± sd |",
        f"| split-half, in-sample | {_spread(summary['in_sample'])} | best on the scoring half "
        "| on the scoring half itself |",
        f"| optimism of in-sample selection | {_spread(summary['optimism'], signed=True)} points "
        "| | in-sample minus held out, on the same half |"]
    for cross in study.cross:
        point = cross.points[cross.choice.index]
        row = study.point_row(point)
        lines.append(
            f"| chosen on {cross.dataset}, scored here | {_ci(row)} | {point.label()} "
            f"({cross.dataset}: {cross.choice.selected_on:.2f}) | best of {len(cross.points)} "
            f"common settings on {cross.dataset} (`{cross.source}`); the in-sample best here "
            f"is {cross.choice.optimism:+.2f} points above it |")
    often = ", ".join(f"{points[i].label()} ({count})" for i, count in list(chosen.items())[:5])
    lines += ["", f"Settings chosen most often on the selection halves: {often}.",
              "Halves hold half the images, so chance differences between settings are about "
              "√2 larger there: the split-half optimism leans high for the whole set's.", ""]
    if not study.cross:
        lines += ["No other dataset's protocol of this model was found for cross-dataset "
                  "selection (run the protocol on VOC07 and VOC12 with the same options, then "
                  "rerun either; or pass `--select-on`).", ""]
    return lines


def _reference_section(study: Study) -> list[str]:
    if study.reference is None:
        return []
    row = study.point_row(study.reference)
    return ["## The setting of LOST's own code", "",
            f"Last-layer {study.reference.feature}, no normalisation, Gram bias 0, k = "
            f"{study.grid.k_patches}: CorLoc {_ci(row)} (`{row['run_id']}`).", ""]


def _published_section(study: Study) -> list[str]:
    info = study.info
    lines = ["## Published figures for this backbone and dataset", ""]
    if not study.published:
        return lines + [f"`lostreg/reports/leaderboard/published_corloc.csv` gives no LOST figure for "
                        f"{info.model} on {info.dataset}.", ""]
    best = study.point_row(study.runs.points[study.best.index])
    held = study.split.summary()["held_out"]
    for record in study.published:
        value = float(record["corloc"])
        lines += [f"### {record['backbone']}, {VARIANT_LABELS[record['variant']]}: {value:.1f} "
                  f"({record['paper']})", "",
                  f"{record['source']}. Verified: {record['verified']}. Stated protocol: "
                  f"*{record['protocol']}*.", ""]
        inside = within_ci(study.frame, value)
        if inside.empty:
            closest = study.frame.assign(distance=(study.frame["corloc"] - value).abs())
            row = closest.sort_values("distance", kind="stable").iloc[0].to_dict()
            point = GridPoint(row["pos_interp"], row["normalize"], row["feature"],
                              int(row["layer"]), float(row["gram_bias"]))
            lines.append(f"No grid point's 95% interval holds {value:.1f}. The closest point is "
                         f"{point.label()}: {_ci(row)}, {row['corloc'] - value:+.2f} points.")
        else:
            lines += [f"{len(inside)} of {len(study.frame)} grid points have a 95% interval "
                      f"that holds {value:.1f} (closest first, at most "
                      f"{PUBLISHED_WITHIN_SHOWN}):", ""]
            lines += _points_table(inside.head(PUBLISHED_WITHIN_SHOWN), "distance")
        lines += ["", f"For comparison, this grid's best is {best['corloc']:.2f} chosen on these "
                  f"images, {held.mean:.2f} ± {held.sd:.2f} chosen on half and scored on the "
                  "other half.", ""]
    return lines


def protocol_markdown(study: Study) -> str:
    top = study.frame.sort_values("corloc", ascending=False, kind="stable").head(TOP_SHOWN)
    lines = [*_header(study), *_best_section(study), *_reference_section(study),
             *_published_section(study),
             f"## The {len(top)} best settings (chosen on these images)", "",
             *_points_table(top), "",
             "Every setting: `protocol.csv`. Figures: `heatmap_<normalize>.png` (block x "
             "feature, best bias per cell), `bias_curves.png`, `positions.png` (every setting "
             + ("ranked, published figures as lines)." if study.published else
                "ranked; no published figure for this backbone and dataset)."), ""]
    return "\n".join(lines)

"""``comparison.md``'s saliency part: a block per method and refinement with our mask runs
beside the published anchors (each under its own definition), the runs that are not
comparable (smoke, part of a dataset) apart, the paired statistics on per-image IoU, and the
anchors' sources. Cells read ``maxF / IoU / Acc`` (%), the published tables' order."""

from __future__ import annotations

from typing import Any

import pandas as pd

from lostreg.reports.cells import md_cell, md_row
from lostreg.reports.leaderboard.markdown import method_title, source_cells, sources_section
from lostreg.reports.leaderboard.published import VARIANT_LABELS
from lostreg.reports.leaderboard.saliency import (
    DEFINITION_LABELS,
    FIGURES,
    REFINE_LABELS,
    SALIENCY_DATASETS,
    SaliencyBoard,
    dataset_label,
    dataset_rank,
)
from lostreg.reports.leaderboard.tables import _present, method_order


def _value(value: Any) -> str:
    return f"{value:.1f}" if _present(value) else "—"


def triple(row: dict[str, Any]) -> str:
    """``80.3 / 71.2 / 91.8`` (maxF / IoU / Acc), or ``a → b`` for each figure of a pair."""
    if _present(row.get("registers")) and row["source"] == "ours":
        return " / ".join(f"{_value(row.get(key))} → {_value(row.get(f'{key}_reg'))}"
                          for key in FIGURES)
    return " / ".join(_value(row.get(key)) for key in FIGURES)


def _row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return (row["backbone"], *source_cells(row),
            DEFINITION_LABELS.get(row["definition"], row["definition"]), row["protocol"])


def _datasets(frame: pd.DataFrame) -> list[str]:
    return sorted(set(SALIENCY_DATASETS) | set(frame["dataset"].dropna()), key=dataset_rank)


def method_block(frame: pd.DataFrame, title: str, datasets: list[str]) -> list[str]:
    """One method and refinement: a row per (backbone, source, models, definition, protocol),
    a column per dataset."""
    lines = [f"### {md_cell(title)}", "",
             md_row(["Backbone", "Source", "Models", "Registers", "Definition", "Protocol",
                     *(dataset_label(name) for name in datasets)]),
             "|---|---|---|---|---|---|" + "---|" * len(datasets)]
    rows: dict[tuple, dict[str, dict]] = {}
    for row in frame.to_dict("records"):
        rows.setdefault(_row_key(row), {})[row["dataset"]] = row
    for key, cells in rows.items():
        parts = [triple(cells[name]) if name in cells else "" for name in datasets]
        lines.append(md_row([*key, *parts]))
    return lines


def _blocks(frame: pd.DataFrame, published: pd.DataFrame) -> list[str]:
    lines: list[str] = []
    datasets = _datasets(frame)
    keys = frame[["method", "refine"]].drop_duplicates().to_dict("records")
    for key in sorted(keys, key=lambda k: (method_order(k["method"]),
                                           list(REFINE_LABELS).index(k["refine"])
                                           if k["refine"] in REFINE_LABELS else 99)):
        part = frame[(frame["method"] == key["method"]) & (frame["refine"] == key["refine"])]
        title = (f"Saliency: {method_title(key['method'], published)}, "
                 f"{REFINE_LABELS.get(key['refine'], key['refine'])}")
        lines += ["", *method_block(part, title, datasets)]
    return lines


def not_comparable_section(rows: pd.DataFrame, published: pd.DataFrame) -> list[str]:
    """Our smoke runs and runs on part of a dataset: never beside a published figure."""
    lines = ["### Saliency runs not comparable with published figures", "",
             "Smoke runs (random weights: not a result) and runs on part of a dataset "
             "(`--limit`, a partial dataset: their figures are over those images only).", "",
             "| Method | Refine | Backbone | Models | Registers | Definition | Protocol | "
             "Dataset | maxF / IoU / Acc |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows.to_dict("records"):
        backbone, _, models, registers, definition, protocol = _row_key(row)
        lines.append(md_row([method_title(row["method"], published), row["refine"], backbone,
                             models, registers, definition, protocol,
                             dataset_label(row["dataset"]), triple(row)]))
    return lines


def _p(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"


def statistics_section(frame: pd.DataFrame) -> list[str]:
    """The paired test of every pair of ours (TokenCut's definition: one line per pair)."""
    pairs = frame[(frame["source"] == "ours") & frame["model_reg"].notna()
                  & (frame["definition"] == "tokencut")]
    lines = ["### Saliency: paired statistics on per-image IoU (ours)", ""]
    if pairs.empty:
        return lines + ["No register pairs among the mask runs yet (a pair needs a model and "
                        "its `_reg` twin or `+ttr` variant on the same dataset with the same "
                        "settings, refinement and mask protocol)."]
    lines += [
        "Per-image IoU (TokenCut's definition) on the images both runs scored. Difference: "
        "mean of with − without in IoU points, 95% paired percentile bootstrap over images "
        "(10000 resamples, seed 0); p: two-sided bootstrap p (the interval inverted; at least "
        "2/10000). Better / worse: images whose IoU rose / fell. Images with an empty GT and "
        "an empty prediction in either run (TokenCut's IoU is 0/0 there) are left out and "
        "counted.",
        "",
        "| Method | Refine | Models | Registers | Dataset | Settings | Images | IoU without | "
        "IoU with | Difference [95% CI] | Better | Worse | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in pairs.to_dict("records"):
        images = f"{row['n_paired']}"
        if row["n_undefined"]:
            images += f" ({row['n_undefined']} with a 0/0 IoU left out)"
        lines.append(md_row([
            row["method"], row["refine"], f"{row['model']} → {row['model_reg']}",
            VARIANT_LABELS[row["registers"]], dataset_label(row["dataset"]), row["protocol"],
            images, _value(row["iou"]), _value(row["iou_reg"]),
            f"{row['iou_diff']:+.1f} [{row['iou_diff_ci_low']:+.1f}, "
            f"{row['iou_diff_ci_high']:+.1f}]", row["iou_better"], row["iou_worse"],
            _p(row["bootstrap_p"])]))
    return lines


def saliency_markdown(board: SaliencyBoard | None) -> str:
    """The saliency part of ``comparison.md`` (empty without a board)."""
    if board is None:
        return ""
    frame = board.comparison
    ours = frame["source"] == "ours"
    placed = frame[~ours | frame["comparable"].astype(bool)]
    apart = frame[ours & ~frame["comparable"].astype(bool)]
    lines = [
        "", "## Saliency (masks): without → with registers, beside the published figures", "",
        "maxFβ / IoU / Acc (%) on ECSSD, DUTS-TE and DUT-OMRON, `without → with` for our "
        "register pairs. The public evaluation codes disagree, so every row names the "
        "definition that made it, and our runs stand beside a published figure under that "
        "figure's definition (the LOST rows FOUND reports beside our figures under FOUND's "
        "code). The published rows are DINO ViT-S/16 without registers; no paper publishes "
        "saliency with registers.",
    ]
    lines += _blocks(placed, board.published) if not placed.empty else [
        "", "No mask runs to place beside published figures, and no published saliency "
        "figures."]
    if not apart.empty:
        lines += ["", *not_comparable_section(apart, board.published)]
    lines += ["", *statistics_section(frame)]
    if not board.published.empty:
        named = board.published.assign(dataset=board.published["dataset"].map(dataset_label))
        sources = sources_section(named)
        lines += ["", "### Saliency: published sources", *sources[1:]]
    return "\n".join(lines).rstrip() + "\n"

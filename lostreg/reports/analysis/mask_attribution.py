"""``analyze attribution`` on mask runs: do the predicted masks go where the artifact tokens are?

Registers are about dense features, and a saliency mask is a dense answer: a high-norm artifact
token that lands inside the mask (or seeds it) is a wrong object patch; one the method keeps out
of the mask did no harm. Per image of a mask run this module records whether the image has
outlier (high-norm) tokens, how many of them lie inside the stored predicted mask
(``masks.INSIDE_RULE``: on the run's resized token grid), whether the seed is an outlier or
touches one, and the image's IoU; then the mean IoU is split by "image has outliers / has none"
and by "seed on or next to an outlier / away from them" (the analogue of the box runs' CorLoc
split).

The IoU is TokenCut's per-image IoU, the line's ``sal_iou`` (checked against its counts when the
run is read); a 0/0 image (empty GT, empty prediction) has none and is left out of the means
and counted, so a group's mean is the run's ``iou`` of ``metrics.json`` whenever no image of
it is 0/0.

Token maps come from a norms analysis (``--norms``) of the images resized as the run resized
them, or are computed with the run's own model (``attribution.token_maps_for``). With several
mask runs on the same images, :func:`iou_table` writes each run's per-image IoU side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lostreg.errors import LostregError
from lostreg.io import atomic_write_json, atomic_write_text
from lostreg.reports.analysis.attribution import (
    GROUPS,
    AttributionKind,
    AttributionResult,
    attribute_and_compare,
    map_position,
    markdown_marks,
    md_escape,
    outlier_columns,
    percent,
    run_attribution,
    to_csv,
)
from lostreg.reports.analysis.masks import (
    INSIDE_RULE,
    IOU_DEFINITION,
    iou_of,
    stored_mask,
    tokens_inside,
)
from lostreg.reports.analysis.norms import outlier_mask
from lostreg.reports.analysis.runs import (
    RunInfo,
    common_predictions,
    compare_dir,
    label_slug,
    loaded_runs,
    run_labels,
    unfinished_marks,
)
from lostreg.reports.analysis.store import TokenMaps

MASK_IMAGE_COLUMNS = ("image_id", "iou", "mask_share", "seed_row", "seed_col", "seed_norm",
                      "n_tokens", "n_outliers", "outlier_share", "has_outliers",
                      "seed_is_outlier", "seed_touches_outlier", "mask_tokens", "mask_outliers",
                      "outliers_in_mask_share", "mask_has_outlier")
MASK_SUMMARY_COLUMNS = ("group", "n_images", "n_iou_undefined", "mean_iou",
                        "seed_is_outlier_pct", "seed_touches_outlier_pct",
                        "mask_has_outlier_pct", "outliers_in_mask_pct",
                        "mean_outlier_share_pct")
DEFINITIONS = {
    "iou": IOU_DEFINITION,
    "inside": INSIDE_RULE,
    "seed_is_outlier": "the seed patch's token norm > threshold",
    "seed_touches_outlier": "the seed or one of its 4 grid neighbours is an outlier",
    "mask_has_outlier": "an outlier token is inside the predicted mask",
    "outliers_in_mask_pct": "of a group's outlier tokens, the share inside the predicted masks "
                            "(pooled over its images)",
    "has_outliers": "the image has at least one outlier token",
}


def attribute_mask_image(prediction: dict, mask: np.ndarray, norm_map: np.ndarray,
                         threshold: float | None) -> dict:
    """One row of ``attribution.csv`` for a mask run (``norm_map`` on the run's token grid,
    ``mask`` the stored binary mask on the original pixels)."""
    outliers = outlier_mask(norm_map, threshold)
    columns = outlier_columns(prediction, outliers, norm_map)
    inside = tokens_inside(mask, outliers.shape)
    n_outliers, in_mask = columns["n_outliers"], int((outliers & inside).sum())
    iou = iou_of(prediction)
    return {
        "image_id": str(prediction["image_id"]),
        "iou": None if math.isnan(iou) else iou,
        "mask_share": float(mask.mean()),
        **columns,
        "mask_tokens": int(inside.sum()),
        "mask_outliers": in_mask,
        "outliers_in_mask_share": in_mask / n_outliers if n_outliers else None,
        "mask_has_outlier": in_mask > 0,
    }


def mask_attribution_rows(info: RunInfo, maps: TokenMaps, layer: int,
                          threshold: float | None) -> list[dict]:
    """One row per predicted image (run order); grids must be the run's (resized) ones. The
    masks are decoded one line at a time."""
    where = str(info.run_dir / "predictions.jsonl")
    rows = []
    for prediction in info.predictions:
        position = map_position(info, maps, prediction,
                                " (the image resized to a patch multiple)")
        rows.append(attribute_mask_image(prediction, stored_mask(prediction, where),
                                         maps.norm_map(position, layer), threshold))
    return rows


def summarize_masks(rows: list[dict]) -> list[dict]:
    """Mean IoU and outlier rates per group (all, with/without outliers, seed near/away):
    IoU over the images that have one, seed rates over the images with a seed."""
    out = []
    for name, keep in GROUPS:
        group = [r for r in rows if keep(r)]
        n = len(group)
        ious = [r["iou"] for r in group if r["iou"] is not None]
        seeded = sum(r["seed_is_outlier"] is not None for r in group)
        outliers = sum(r["n_outliers"] for r in group)
        out.append({
            "group": name,
            "n_images": n,
            "n_iou_undefined": n - len(ious),
            "mean_iou": 100.0 * float(np.mean(ious)) if ious else None,
            "seed_is_outlier_pct": percent(sum(r["seed_is_outlier"] is True for r in group),
                                           seeded),
            "seed_touches_outlier_pct": percent(
                sum(r["seed_touches_outlier"] is True for r in group), seeded),
            "mask_has_outlier_pct": percent(sum(r["mask_has_outlier"] for r in group), n),
            "outliers_in_mask_pct": percent(sum(r["mask_outliers"] for r in group), outliers),
            "mean_outlier_share_pct": (100.0 * float(np.mean([r["outlier_share"] for r in group]))
                                       if n else None),
        })
    return out


def mask_markdown(info: RunInfo, summary: list[dict], threshold: float | None,
                  source: str) -> str:
    """The per-run table: one line per group, percentages with one decimal."""
    config, method = info.config, info.method
    lines = [f"### {method.spec.title or method.name} masks and artifact tokens: "
             f"{config['model']} on {config['dataset']}", "",
             f"Run `{md_escape(info.run_id)}`, {md_escape(method.describe())}, refine "
             f"{md_escape(info.refine)}; outlier threshold "
             + ("none (unimodal norms: no outliers)" if threshold is None
                else f"{threshold:.4g}") + f" ({md_escape(source)}).", "",
             md_escape(IOU_DEFINITION) + " Inside: " + md_escape(INSIDE_RULE) + "."]
    if all(p.get("seed") is None for p in info.predictions):
        lines += ["", "The method has no seed: the seed columns are empty."]
    for mark in markdown_marks(info.smoke, unfinished_marks([info])):
        lines += ["", mark]
    lines += ["", "| group | images | IoU 0/0 | mean IoU % | seed is outlier % | seed touches "
              "outlier % | mask holds an outlier % | outliers inside masks % | outlier "
              "tokens % |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        cells = [row["group"], str(row["n_images"]), str(row["n_iou_undefined"])]
        cells += ["–" if row[k] is None else f"{row[k]:.1f}" for k in MASK_SUMMARY_COLUMNS[3:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MASK = AttributionKind(
    "mask", mask_attribution_rows, summarize_masks, mask_markdown, MASK_IMAGE_COLUMNS,
    MASK_SUMMARY_COLUMNS, DEFINITIONS,
    lambda info: {"target": "mask", "refine": info.refine,
                  "mask_protocol": info.config.get("mask_protocol"),
                  "saliency_definition": "tokencut"})


def attribute_mask_run(run_dir: str | Path | RunInfo, norms: str | Path | None = None,
                       threshold: float | None = None, device: str = "auto",
                       data_root: str | Path | None = None, batch_size: int = 16,
                       num_workers: int | None = None, progress: bool = False,
                       recompute: bool = False, weights: str | None = None) -> AttributionResult:
    """``run_attribution`` of a mask run."""
    return run_attribution(run_dir, MASK, norms, threshold, device, data_root, batch_size,
                     num_workers, progress, recompute, weights)


# --- several mask runs: each run's IoU per image ----------------------------------------------

IOU_SUMMARY_COLUMNS = ("run", "n_images", "n_iou_undefined", "mean_iou", "mean_iou_shared",
                       "highest_on")


@dataclass
class IouTable:
    """Per image of several mask runs (the images every run predicted), each run's IoU;
    ``labels`` name the runs (see ``runs.run_labels``)."""

    infos: list[RunInfo]
    labels: list[str]
    columns: tuple[str, ...]
    rows: list[dict]
    summary: list[dict]
    left_out: int
    output_dir: Path
    markdown: str


def iou_rows(infos: list[RunInfo], labels: list[str]) -> tuple[tuple[str, ...], list[dict]]:
    """``image_id``, ``iou_<label>`` per run (empty for 0/0), then ``best`` (the labels whose
    IoU is the image's highest, ``;``-separated) and ``spread`` (highest minus lowest)."""
    common, by_run = common_predictions(infos)
    slugs = [label_slug(label) for label in labels]
    columns = ("image_id", *(f"iou_{s}" for s in slugs), "best", "spread")
    rows = []
    for image_id in common:
        ious = [iou_of(run[image_id]) for run in by_run]
        defined = [v for v in ious if not math.isnan(v)]
        row: dict = {"image_id": image_id}
        for slug, value in zip(slugs, ious, strict=True):
            row[f"iou_{slug}"] = None if math.isnan(value) else value
        top = max(defined) if defined else None
        row["best"] = ";".join(label for label, value in zip(labels, ious, strict=True)
                               if top is not None and value == top)
        row["spread"] = max(defined) - min(defined) if len(defined) > 1 else None
        rows.append(row)
    return columns, rows


def iou_summary(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per run: its mean IoU over the images where it has one, over the images where every
    run has one (the fair comparison), and on how many images it is the highest (ties
    count for each)."""
    keys = [f"iou_{label_slug(label)}" for label in labels]
    shared = [r for r in rows if all(r[k] is not None for k in keys)]
    out = []
    for label, key in zip(labels, keys, strict=True):
        own = [r[key] for r in rows if r[key] is not None]
        out.append({
            "run": label, "n_images": len(rows), "n_iou_undefined": len(rows) - len(own),
            "mean_iou": 100.0 * float(np.mean(own)) if own else None,
            "mean_iou_shared": (100.0 * float(np.mean([r[key] for r in shared]))
                                if shared else None),
            "highest_on": sum(label in r["best"].split(";") for r in rows if r["best"]),
        })
    return out


def iou_markdown(infos: list[RunInfo], labels: list[str], summary: list[dict], n_images: int,
                 n_shared: int, left_out: int) -> str:
    models = " vs ".join(dict.fromkeys(str(i.config["model"]) for i in infos))
    lines = [f"### Per-image IoU of each run: {models} on {infos[0].config['dataset']}", "",
             f"{n_images} images predicted by every run"
             + (f" ({left_out} more left out: not predicted by every run)" if left_out else "")
             + f"; {n_shared} with an IoU in every run (the shared mean's images).", "",
             md_escape(IOU_DEFINITION), ""]
    for mark in markdown_marks(any(i.smoke for i in infos), unfinished_marks(infos, labels)):
        lines += [mark, ""]
    lines += [f"- `iou_{label_slug(label)}`: {md_escape(label)} = run "
              f"`{md_escape(info.run_id)}` ({md_escape(info.method.describe())}, refine "
              f"{md_escape(info.refine)})" for label, info in zip(labels, infos, strict=True)]
    lines += ["", "| run | images | IoU 0/0 | mean IoU % | mean IoU % (shared images) | "
              "highest on |", "|---|---:|---:|---:|---:|---:|"]
    for row in summary:
        means = ["–" if row[k] is None else f"{row[k]:.1f}"
                 for k in ("mean_iou", "mean_iou_shared")]
        lines.append(f"| {md_escape(row['run'])} | {row['n_images']} | "
                     f"{row['n_iou_undefined']} | {means[0]} | {means[1]} | "
                     f"{row['highest_on']} |")
    return "\n".join(lines) + "\n"


def iou_table(runs: Sequence[str | Path | RunInfo],
              output: str | Path | None = None) -> IouTable:
    """Write ``ious.csv`` (per image), ``ious_summary.csv``, ``ious.md`` and ``runs.json`` into
    ``output`` (default ``results/analysis/compare-<dataset>-<hash>/``). Needs no model: it
    reads the runs' lines only, or none when ``runs`` are loaded already (``loaded_runs``)."""
    infos = loaded_runs(runs)
    if not infos[0].is_mask:
        raise LostregError("box runs have no per-image saliency IoU; their table is "
                           "attribution.hits_table's")
    labels = run_labels(infos)
    columns, rows = iou_rows(infos, labels)
    summary = iou_summary(rows, labels)
    every = set().union(*({str(p["image_id"]) for p in i.predictions} for i in infos))
    left_out = len(every) - len(rows)
    n_shared = sum(all(r[c] is not None for c in columns[1:1 + len(labels)]) for r in rows)
    out = Path(output) if output is not None else compare_dir(infos)
    markdown = iou_markdown(infos, labels, summary, len(rows), n_shared, left_out)
    atomic_write_text(out / "ious.csv", to_csv(rows, columns))
    atomic_write_text(out / "ious_summary.csv", to_csv(summary, IOU_SUMMARY_COLUMNS))
    atomic_write_text(out / "ious.md", markdown)
    atomic_write_json(out / "runs.json", [
        {"label": label, "column": f"iou_{label_slug(label)}", "run_id": info.run_id,
         "run_dir": str(info.run_dir), "method": info.method.name,
         "method_params": info.method.params, "refine": info.refine, "smoke_run": info.smoke,
         **info.unfinished_fields()}
        for label, info in zip(labels, infos, strict=True)], undefined_as_null=True)
    return IouTable(infos, labels, columns, rows, summary, left_out, out, markdown)


def attribute_mask_runs(run_dirs: list[str | Path],
                        norms: list[str | Path | None] | None = None,
                        threshold: float | None = None, device: str = "auto",
                        data_root: str | Path | None = None, batch_size: int = 16,
                        num_workers: int | None = None, progress: bool = False,
                        recompute: bool = False, weights: str | None = None,
                        output: str | Path | None = None, ious_only: bool = False,
                        ) -> tuple[list[AttributionResult], IouTable | None]:
    """``attribute_mask_run`` for each run (unless ``ious_only``), then, with two runs or
    more, the ``iou_table`` of each run's IoU per image."""
    return attribute_and_compare(
        run_dirs, norms, recompute, ious_only, lambda runs: iou_table(runs, output),
        lambda info, norms_path: attribute_mask_run(info, norms_path, threshold, device,
                                                    data_root, batch_size, num_workers,
                                                    progress, recompute, weights))

"""Saliency figures: per-image IoU distributions, F-vs-threshold curves, and mask overlays
where registers change the mask most. Readable with 2 runs and with 50.

A figure that cannot draw every run selects: the register pairs' runs first (each baseline
beside its variant), then the best, at most ``MAX_RUNS`` boxes / ``MAX_CURVES`` curves per
dataset, over a grey range of every run where that applies, and says in its title how many it
drew of how many. Runs are named by their model and only the settings in which the drawn runs
differ. Every figure drawn from smoke runs says SMOKE (``figures.mark_smoke``); overlays say
whether they are drawn on the dataset image or alone (the image is used only when its file is
under the run's data root). Text layout is held by ``tests/figure_checks.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.evaluation import saliency as saliency_metric
from lostreg.evaluation.rle import rle_problem
from lostreg.fields import Fields
from lostreg.reports.leaderboard.figures import empty_figure, mark_smoke
from lostreg.reports.leaderboard.histogram_svg import Histogram, histogram_svg
from lostreg.reports.leaderboard.labels import SMOKE_MARK, wrap
from lostreg.reports.leaderboard.published import VARIANT_LABELS
from lostreg.reports.leaderboard.saliency import (
    DEFINITION_LABELS,
    dataset_label,
    dataset_rank,
    find_mask_pairs,
    run_variant,
)
from lostreg.reports.leaderboard.saliency_runs import PREDICTIONS, MaskRun, read_masks
from lostreg.reports.leaderboard.tables import method_params_label, subset_words
from lostreg.runs.summaries import IOU_BINS

MAX_RUNS = 12  # box plots per dataset panel
MAX_CURVES = 8  # F curves per dataset panel
MAX_PAIRS_SHOWN = 6  # register pairs whose most changed masks are drawn
MAX_IMAGES = 4  # images per overlay figure
OVERLAY = {"without": (0.85, 0.1, 0.1), "with": (0.1, 0.35, 0.95), "both": (0.6, 0.2, 0.75)}


def smoke_footer(figure: Any) -> None:
    figure.supxlabel(SMOKE_MARK, color="red", fontsize=10, fontweight="bold")


# --- names and selection --------------------------------------------------------------------


NAME_SETTINGS = ("feature", "layer", "normalize", "pos_interp", "precision", "mask_protocol",
                 "no_hard", "limit", "dataset_images")


def _setting_text(key: str, value: Any) -> str:
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def run_names(runs: Sequence[MaskRun]) -> dict[str, str]:
    """A short name per run: its model, then what tells it apart from the others: the method
    and refinement where they differ, and within one method its parameters and any other
    setting that differs; run ids only where two runs would still read the same."""
    settings = {run.run_id: run.settings() for run in runs}

    def differ(key: str, group: Sequence[MaskRun]) -> bool:
        return len({repr(settings[run.run_id][key]) for run in group}) > 1

    names = {}
    for run in runs:
        mine = settings[run.run_id]
        same_method = [other for other in runs if other.info.method == run.info.method]
        parts = [run.info.model]
        parts += [run.info.method] if differ("method", runs) else []
        parts += [f"refine {run.refine}"] if differ("refine", runs) else []
        params = run.info.method_params
        shown = {key: value for key, value in params.items()
                 if len({repr(other.info.method_params.get(key)) for other in same_method}) > 1}
        parts.append(method_params_label(run.info.method, shown) if shown else "")
        parts += [_setting_text(key, mine[key]) for key in NAME_SETTINGS
                  if differ(key, same_method)]
        parts += ["SMOKE"] if run.smoke and differ("smoke", runs) else []
        names[run.run_id] = " · ".join(part for part in parts if part)
    counts = pd.Series(list(names.values())).value_counts()
    return {run_id: name if counts[name] == 1 else f"{name} ({run_id})"
            for run_id, name in names.items()}


def pair_order(runs: Sequence[MaskRun]) -> list[str]:
    """Run ids of the register pairs, each baseline followed by its variants."""
    ordered: list[str] = []
    for base, other in find_mask_pairs(runs)[0]:
        for run in (base, other):
            if run.run_id not in ordered:
                ordered.append(run.run_id)
    return ordered


def chosen_runs(runs: Sequence[MaskRun], limit: int, score: str = "iou") -> list[MaskRun]:
    """At most ``limit`` runs of one dataset: the pairs' runs first, then the best by the
    TokenCut-definition ``score`` (``iou`` or ``max_f``)."""
    by_id = {run.run_id: run for run in runs}
    paired = pair_order(runs)

    def value(run: MaskRun) -> float:
        figure = run.figures["tokencut"][score]
        return -math.inf if figure is None else figure

    rest = sorted((run for run in runs if run.run_id not in paired),
                  key=lambda run: (-value(run), run.run_id))
    return ([by_id[run_id] for run_id in paired] + rest)[:limit]


def _by_dataset(runs: Sequence[MaskRun]) -> list[tuple[str, list[MaskRun]]]:
    datasets = sorted({run.info.dataset for run in runs}, key=dataset_rank)
    return [(name, [run for run in runs if run.info.dataset == name]) for name in datasets]


def _selection_note(drawn: int, total: int, what: str) -> str:
    return (f": {drawn} of {total} runs drawn (the register pairs' runs first, then the "
            f"highest {what}; every run is in leaderboard.csv)" if drawn < total else "")


# --- IoU distributions ---------------------------------------------------------------------


def mask_iou_histogram(run: MaskRun) -> Histogram:
    """What a mask run's IoU histogram shows: per-image IoU (TokenCut's definition); 0/0
    images said in the title, not drawn."""
    ious = run.images["sal_iou"].to_numpy(dtype=float)
    defined = ious[~np.isnan(ious)]
    iou = run.figures["tokencut"]["iou"]
    subset = subset_words(run.settings())
    title = (f"{run.run_id}\nIoU {'NaN (a 0/0 image)' if iou is None else f'{iou:.1f}'} "
             f"({DEFINITION_LABELS['tokencut']} definition) on {ious.size} images"
             + (f"; {ious.size - defined.size} with an empty GT and prediction (0/0) not "
                "drawn" if defined.size < ious.size else "")
             + (f" ({subset}: not comparable with published figures)" if subset else ""))
    counts = tuple(int(count) for count in np.histogram(defined, IOU_BINS)[0])
    return Histogram(counts, title, "per-image IoU of the predicted mask (> 0.5) with the GT",
                     bool(run.smoke))


def mask_iou_svg(run: MaskRun) -> str:
    """The mask run's IoU histogram (``figures/saliency_iou/<run id>.svg``), as SVG text."""
    return histogram_svg(mask_iou_histogram(run))


def iou_distribution_figure(runs: Sequence[MaskRun], limit: int = MAX_RUNS) -> Any:
    """Per-image IoU of every drawn run as a box plot (mean marked), a panel per dataset."""
    from matplotlib.figure import Figure

    if not runs:
        return empty_figure("no mask runs", False, height=2.5)
    smoke = any(run.smoke for run in runs)
    panels = [(name, mine, chosen_runs(mine, limit)) for name, mine in _by_dataset(runs)]
    names = run_names([run for _, _, drawn in panels for run in drawn])
    heights = [1.1 + 0.32 * len(drawn) for _, _, drawn in panels]
    figure = Figure(figsize=(10.0, sum(heights) + 0.6 + 0.3 * smoke), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False,
                           gridspec_kw={"height_ratios": heights})[:, 0]
    for axis, (dataset, mine, drawn) in zip(axes, panels, strict=True):
        values = [run.images["sal_iou"].dropna().to_numpy(dtype=float) for run in drawn]
        axis.boxplot(values, orientation="horizontal", showmeans=True, widths=0.6,
                     positions=np.arange(len(drawn))[::-1],
                     flierprops={"markersize": 2})
        axis.set_yticks(np.arange(len(drawn))[::-1],
                        [wrap(names[run.run_id], 4.0, fontsize=7) for run in drawn],
                        fontsize=7)
        axis.set_xlim(0, 1)
        axis.set_xlabel("per-image IoU (TokenCut's definition; 0/0 images left out)",
                        fontsize=8)
        title = dataset_label(dataset) + _selection_note(len(drawn), len(mine), "mean IoU")
        axis.set_title(wrap(title, 9.0, fontsize=9), fontsize=9)
    if smoke:
        mark_smoke(figure)
    return figure


# --- F-vs-threshold curves -------------------------------------------------------------------


def f_curve_figure(runs: Sequence[MaskRun], limit: int = MAX_CURVES) -> Any:
    """Mean F (beta^2 0.3) at each of TokenCut's 255 thresholds: a panel per dataset, a line
    per drawn run (a pair's baseline dashed, its variant solid, one colour), the range of
    every run in grey, each run's maximum (its maxF) marked."""
    from matplotlib.figure import Figure

    if not runs:
        return empty_figure("no mask runs", False, height=2.5)
    smoke = any(run.smoke for run in runs)
    thresholds = saliency_metric.TOKENCUT_THRESHOLDS
    panels = [(name, mine, chosen_runs(mine, limit, "max_f")) for name, mine in _by_dataset(runs)]
    names = run_names([run for _, _, drawn in panels for run in drawn])
    figure = Figure(figsize=(11.0, 3.4 * len(panels) + 0.5 + 0.3 * smoke), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for axis, (dataset, mine, drawn) in zip(axes, panels, strict=True):
        if len(drawn) < len(mine):
            curves = np.stack([run.f_curve for run in mine])
            axis.fill_between(thresholds, curves.min(axis=0), curves.max(axis=0), color="0.88",
                              label=f"range over all {len(mine)} runs")
        colours = _pair_colours(drawn)
        for run in drawn:
            colour, dashed = colours[run.run_id]
            best = int(np.argmax(run.f_curve))
            axis.plot(thresholds, run.f_curve, color=colour, linestyle="--" if dashed else "-",
                      linewidth=1.4, label=wrap(names[run.run_id], 3.6, fontsize=6))
            axis.plot(thresholds[best], run.f_curve[best], marker="o", color=colour,
                      markersize=4)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("threshold on the prediction", fontsize=8)
        axis.set_ylabel("mean F (β² 0.3)", fontsize=8)
        title = dataset_label(dataset) + _selection_note(len(drawn), len(mine), "maxF")
        axis.set_title(wrap(title, 6.5, fontsize=9), fontsize=9)
        axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.suptitle("F against the threshold (TokenCut's definition: F averaged over images at "
                    "each threshold; dot: the maximum, maxF). Dashed: without registers",
                    fontsize=8)
    if smoke:
        smoke_footer(figure)
    return figure


def _pair_colours(drawn: Sequence[MaskRun]) -> dict[str, tuple[str, bool]]:
    """A colour per pair (baseline dashed, variants solid) and per unpaired run."""
    colours: dict[str, tuple[str, bool]] = {}
    for base, other in find_mask_pairs(drawn)[0]:
        colour = colours.get(base.run_id, (f"C{len(set(c for c, _ in colours.values())) % 10}",
                                           True))[0]
        colours[base.run_id] = (colour, True)
        colours[other.run_id] = (colour, False)
    used = len({colour for colour, _ in colours.values()})
    for run in drawn:
        if run.run_id not in colours:
            colours[run.run_id] = (f"C{used % 10}", False)
            used += 1
    return colours


# --- where registers change the mask most ------------------------------------------------------


def pair_changes(pairs: Sequence[tuple[MaskRun, MaskRun]]) -> pd.DataFrame:
    """Per pair: its images both runs scored, how far the per-image IoU moved (mean |change|,
    from the runs' summaries, no mask read), largest first."""
    rows = []
    for index, (base, other) in enumerate(pairs):
        joined = base.images[["image_id", "sal_iou"]].merge(
            other.images[["image_id", "sal_iou"]], on="image_id", suffixes=("", "_reg"))
        change = (joined["sal_iou_reg"] - joined["sal_iou"]).abs()
        rows.append({"pair": index, "base": base.run_id, "variant": other.run_id,
                     "dataset": base.info.dataset, "images": len(joined),
                     "mean_abs_iou_change": float(change.mean()) if change.notna().any()
                     else 0.0})
    frame = pd.DataFrame(rows, columns=["pair", "base", "variant", "dataset", "images",
                                        "mean_abs_iou_change"])
    return frame.sort_values(["mean_abs_iou_change", "pair"], ascending=[False, True],
                             kind="stable").reset_index(drop=True)


def _rles(run: MaskRun) -> dict[str, dict[str, Any]]:
    """Every line's RLE, checked again (pycocotools trusts its input) and as it takes it."""
    from lostreg.io import read_jsonl

    rles = {}
    path = run.run_dir / PREDICTIONS
    for number, record in enumerate(read_jsonl(path), start=1):
        fields = Fields(record if isinstance(record, dict) else {}, f"{path}:{number}")
        rle = record.get("pred_mask_rle") if isinstance(record, dict) else None
        problem = rle_problem(rle, fields.integer("height", minimum=1),
                              fields.integer("width", minimum=1))
        if problem:
            raise LostregError(f"{fields.where}: 'pred_mask_rle': {problem}")
        rles[fields.text("image_id")] = {"size": rle["size"],
                                         "counts": rle["counts"].encode("ascii")}
    return rles


def mask_changes(base: MaskRun, other: MaskRun, limit: int = MAX_IMAGES) -> pd.DataFrame:
    """The ``limit`` images whose predicted masks differ most between the two runs: the
    lowest IoU of one run's mask with the other's (computed on the RLEs, nothing decoded;
    two empty masks agree), ties by the larger change of IoU with the GT."""
    from pycocotools import mask as mask_utils

    joined = base.images[["image_id", "sal_iou", "width", "height", "file"]].merge(
        other.images[["image_id", "sal_iou"]], on="image_id", suffixes=("", "_reg"))
    first, second = _rles(base), _rles(other)
    agreement = []
    for image_id in joined["image_id"]:
        a, b = first[image_id], second[image_id]
        empty = int(mask_utils.area(a)) == 0 and int(mask_utils.area(b)) == 0
        agreement.append(1.0 if empty else float(mask_utils.iou([a], [b], [0])[0][0]))
    joined["mask_agreement"] = agreement
    joined["iou_change"] = (joined["sal_iou_reg"] - joined["sal_iou"]).abs().fillna(0.0)
    joined = joined.sort_values(["mask_agreement", "iou_change"], ascending=[True, False],
                                kind="stable")
    return joined.head(limit).reset_index(drop=True)


def data_roots(run: MaskRun) -> list[Path]:
    """The run's data roots: the dataset's folder (``config.json``'s ``data_root``) and the
    ``--data-root`` it was found under (``settings.data_root``): a mask run's ``file`` is
    relative to the second (``ECSSD/images/0001.jpg``), a VOC run's to the first."""
    settings = run.config.get("settings")
    given = [run.config.get("data_root"),
             settings.get("data_root") if isinstance(settings, dict) else None]
    return [Path(root) for root in given if isinstance(root, str) and root]


def image_under_root(run: MaskRun, file: Any) -> Path | None:
    """The dataset image of a line when its file is under one of the run's data roots (a
    ``file`` read from disk is never followed outside them); None otherwise."""
    if not isinstance(file, str) or not file:
        return None
    for root in data_roots(run):
        base = root.resolve()
        path = (base / file).resolve()
        if path.is_relative_to(base) and path.is_file():
            return path
    return None


def _shown_picture(run: MaskRun, image: pd.Series) -> np.ndarray | None:
    from PIL import Image as PILImage

    path = image_under_root(run, image["file"])
    if path is None:
        return None
    with PILImage.open(path) as picture:
        if picture.size != (image["width"], image["height"]):
            return None
        return np.asarray(picture.convert("RGB"))


def _overlay(without: np.ndarray, with_: np.ndarray) -> np.ndarray:
    """RGBA layer: red where only the run without registers predicts the object, blue where
    only the one with registers does, purple where both do."""
    layer = np.zeros((*without.shape, 4))
    for mask, key in ((without & ~with_, "without"), (with_ & ~without, "with"),
                      (without & with_, "both")):
        layer[mask] = (*OVERLAY[key], 0.55)
    return layer


def overlay_figure(base: MaskRun, other: MaskRun, chosen: pd.DataFrame, title: str) -> Any:
    """The masks of both runs on ``chosen`` images (``mask_changes``), on the dataset image
    where it is under the run's data root, else alone; the caption says which."""
    from matplotlib.figure import Figure

    masks = read_masks(base, chosen["image_id"]), read_masks(other, chosen["image_id"])
    width = max(6.0, 3.0 * len(chosen))
    figure = Figure(figsize=(width, 4.0), layout="constrained")
    axes = figure.subplots(1, max(len(chosen), 1), squeeze=False)[0]
    on_image = 0
    for axis, (_, image) in zip(axes, chosen.iterrows(), strict=False):
        picture = _shown_picture(base, image)
        on_image += picture is not None
        axis.imshow(picture if picture is not None
                    else np.full((image["height"], image["width"], 3), 0.92))
        axis.imshow(_overlay(masks[0][image["image_id"]], masks[1][image["image_id"]]))
        iou = "—" if pd.isna(image["sal_iou"]) else f"{image['sal_iou']:.2f}"
        iou_reg = "—" if pd.isna(image["sal_iou_reg"]) else f"{image['sal_iou_reg']:.2f}"
        axis.set_title(f"{wrap(str(image['image_id']), 2.6, fontsize=8)}\nIoU {iou} → "
                       f"{iou_reg}; masks agree {image['mask_agreement']:.2f}", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    where = ("on the dataset images" if on_image == len(chosen) else
             "masks alone (the images are not under the run's data root)" if on_image == 0
             else f"on the dataset image where it is under the run's data root ({on_image} of "
                  f"{len(chosen)}), else alone")
    colours = (f"red: {base.info.model} only, blue: {other.info.model} only, purple: both "
               "(the GT is not stored in a run)")
    figure.suptitle(wrap(f"{title}: the images whose masks change most, {where}. {colours}",
                         width - 0.4, fontsize=9), fontsize=9)
    if base.smoke or other.smoke:
        smoke_footer(figure)
    return figure


def pair_title(base: MaskRun, other: MaskRun) -> str:
    """``model → model_reg (registers), dataset, method, refine``."""
    return (f"{base.info.model} → {other.info.model} ({VARIANT_LABELS[run_variant(other)]}), "
            f"{dataset_label(base.info.dataset)}, {base.info.method}, refine {base.refine}")

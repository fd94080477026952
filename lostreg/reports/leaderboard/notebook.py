"""What ``notebooks/analysis.ipynb`` draws and shows, as functions: readable at 2 runs and at 500.

The notebook only calls these, so ``tests/test_firsthour_figures.py`` renders every figure
with hundreds of generated runs (text overlap, size, the SMOKE mark) without a kernel. Each
figure that cannot show everything selects (the register pairs first, then the best runs),
shows the rest as a range, and says in the figure what it left out; each header names what
tells its block apart from the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.reports.leaderboard.figures import SMOKE_MARK, wrap
from lostreg.reports.leaderboard.tables import run_settings, settings_label
from lostreg.runs.store import PREDICTION_COLUMNS, RunData

MAX_LINES = 8  # runs drawn as lines per panel of the object-size figure
MAX_PAIRS_SHOWN = 6  # register pairs whose flipped images are listed and drawn
MAX_IOU_FIGURES = 12  # per-run IoU histograms drawn in the notebook
SIZE_BINS = [0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0]  # largest GT box area / image area
OBJECT_BINS, OBJECT_LABELS = [0, 1, 2, 3, 5, np.inf], ["1", "2", "3", "4-5", "6+"]
# the settings a pair header may need to name, in the order they are named
PAIR_SETTINGS = ("method", "method_params", "feature", "layer", "normalize", "pos_interp",
                 "precision", "no_hard", "limit", "dataset_images", "registers")


class NotebookStop(LostregError):
    """A notebook cell's one-line stop: IPython shows ``_render_traceback_``'s lines instead
    of a traceback (a missing runs folder used to print 76 lines ending in the kernel's path)."""

    def _render_traceback_(self) -> list[str]:
        return [f"error: {self}"]


def repository_root(start: Path | None = None) -> Path | None:
    """The lostreg checkout holding ``start`` (a notebook's kernel runs in ``notebooks/``):
    the nearest folder upwards with ``pyproject.toml`` and ``lostreg/``; None outside one."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "lostreg").is_dir():
            return folder
    return None


def notebook_folder(variable: str, default: str, start: Path | None = None) -> Path:
    """The folder named by the environment variable ``variable`` (else ``default``), a
    relative path read from the repository's root, not from the kernel's folder
    (``LOSTREG_RUNS=results/runs`` means the same in a shell at the root and in the notebook).
    Outside a checkout relative paths are read from ``start`` (the working folder)."""
    value = os.environ.get(variable, "").strip() or default
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    base = repository_root(start) or Path(start or Path.cwd()).resolve()
    return base / path


def require_folder(path: Path, variable: str, what: str) -> Path:
    """``path`` if it is a folder, else one line saying what was looked for, where, and how
    it was named."""
    if path.is_dir():
        return path
    given = os.environ.get(variable, "").strip()
    named = (f"${variable}={given!r}, read from the repository root" if given
             else f"the default (set ${variable} to read another)")
    raise NotebookStop(f"{path}: no such folder ({what}; {named})")


# --- labels and pairs --------------------------------------------------------------------------


def run_labels(runs: Sequence[RunData]) -> dict[str, str]:
    """A label per run: its model and settings in words; two runs that would read the same
    (other weights) get their run ids too."""
    labels = {run.run_id: f"{run.info.model} · {settings_label(run_settings(run))}"
              for run in runs}
    seen: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        seen.setdefault((run.info.dataset, labels[run.run_id]), []).append(run.run_id)
    for run_ids in seen.values():
        if len(run_ids) > 1:
            for run_id in run_ids:
                labels[run_id] += f" ({run_id})"
    return labels


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def pair_titles(pairs: pd.DataFrame) -> list[str]:
    """A title per register pair (row of the comparison): the models and dataset, then every
    setting in which this pair differs from another one, so no two titles read the same."""
    records = pairs.to_dict("records")
    differing = [key for key in PAIR_SETTINGS if key in pairs.columns
                 and len({repr(r.get(key)) for r in records}) > 1]
    titles = []
    for row in records:
        title = f"{row['model']} vs {row['model_reg']}, {row['dataset']}"
        named = [f"{key}={_shown(row.get(key))}" for key in differing
                 if row.get(key) is not None and not pd.isna(row.get(key))]
        titles.append(title + (f" ({', '.join(named)})" if named else ""))
    counts = pd.Series(titles).value_counts()
    return [title if counts[title] == 1 else f"{title} [{row['run_id']} vs {row['run_id_reg']}]"
            for title, row in zip(titles, records, strict=True)]


def joined_pair(runs: dict[str, RunData], row: dict[str, Any]) -> pd.DataFrame:
    """The two runs of a pair, image by image (``_reg``: the variant's columns)."""
    base, reg = runs[row["run_id"]], runs[row["run_id_reg"]]
    return base.predictions.merge(reg.predictions[["image_id", "box", "best_iou", "hit"]],
                                  on="image_id", suffixes=("", "_reg"))


def flips_of(runs: dict[str, RunData], pairs: pd.DataFrame) -> list[dict[str, Any]]:
    """Per pair: its title, the images it gains (miss → hit, largest IoU gain first) and
    loses (hit → miss), and its row."""
    flips = []
    for row, title in zip(pairs.to_dict("records"), pair_titles(pairs), strict=True):
        joined = joined_pair(runs, row)
        joined["iou_change"] = joined["best_iou_reg"] - joined["best_iou"]
        flips.append({
            "row": row, "title": title, "images": len(joined),
            "gained": joined[~joined["hit"] & joined["hit_reg"]].sort_values(
                "iou_change", ascending=False, kind="stable"),
            "dropped": joined[joined["hit"] & ~joined["hit_reg"]].sort_values(
                "iou_change", kind="stable")})
    return flips


def flip_counts(flips: Sequence[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{"pair": flip["title"], "images": flip["images"],
                          "miss → hit": len(flip["gained"]), "hit → miss": len(flip["dropped"])}
                         for flip in flips])


def most_flipped(flips: Sequence[dict[str, Any]], limit: int = MAX_PAIRS_SHOWN
                 ) -> list[dict[str, Any]]:
    """The pairs whose images are shown: the ``limit`` with the most flips, in their order."""
    order = sorted(range(len(flips)),
                   key=lambda i: -(len(flips[i]["gained"]) + len(flips[i]["dropped"])))
    return [flips[i] for i in sorted(order[:limit])]


def flip_figure(runs: dict[str, RunData], flip: dict[str, Any], direction: str,
                chosen: pd.DataFrame, smoke: bool) -> Any:
    """The images of one pair that flip in ``direction``: ground truth green, without
    registers red (dashed), with registers blue; the image itself when its file is there."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 3.0 * len(chosen)), 3.9), layout="constrained")
    axes = figure.subplots(1, len(chosen), squeeze=False)[0]
    run = runs[flip["row"]["run_id"]]
    for axis, (_, image) in zip(axes, chosen.iterrows(), strict=True):
        _draw_flip(axis, run, image)
    title = f"{direction}: {flip['title']}"
    figure.suptitle(wrap(title, max(6.0, 3.0 * len(chosen)) - 0.4, fontsize=10), fontsize=10)
    if smoke:
        smoke_footer(figure)
    return figure


def smoke_footer(figure: Any) -> None:
    """The red SMOKE line at the foot of a figure whose title says something else."""
    figure.supxlabel(SMOKE_MARK, color="red", fontsize=10, fontweight="bold")


def _draw_flip(axis: Any, run: RunData, image: pd.Series) -> None:
    from matplotlib.patches import Rectangle
    from PIL import Image as PILImage

    path = Path(run.config.get("data_root") or ".") / str(image["file"])
    if path.is_file():
        with PILImage.open(path) as picture:
            axis.imshow(picture.convert("RGB"))
    else:
        axis.set_facecolor("0.85")
    axis.set_xlim(0, image["width"])
    axis.set_ylim(image["height"], 0)
    for (x1, y1, x2, y2), color, style in (
            *((gt, "limegreen", "-") for gt in image["gt_boxes"]),
            (image["box"], "red", "--"), (image["box_reg"], "blue", "-")):
        axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                                 linestyle=style, linewidth=2))
    axis.set_title(f"{wrap(str(image['image_id']), 2.6, fontsize=8)}\nIoU "
                   f"{image['best_iou']:.2f} → {image['best_iou_reg']:.2f}", fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


# --- per image: object size and number of objects ---------------------------------------------


def per_image(runs: Sequence[RunData], labels: dict[str, str]) -> pd.DataFrame:
    """Every run's predictions in one frame, with the bins of object size and count (no
    rows, the same columns, for a folder of mask runs only)."""
    frames = [run.predictions.assign(run_id=run.run_id, label=labels[run.run_id],
                                     model=run.info.model, dataset=run.info.dataset)
              for run in runs]
    empty = pd.DataFrame(columns=[*PREDICTION_COLUMNS, "run_id", "label", "model", "dataset"])
    images = pd.concat(frames, ignore_index=True) if frames else empty
    images["hit_pct"] = 100.0 * images["hit"].astype(float)
    images["size_bin"] = pd.cut(images["area_share"], SIZE_BINS, include_lowest=True)
    images["objects"] = pd.cut(images["n_objects"], OBJECT_BINS, labels=OBJECT_LABELS)
    return images


def drawn_labels(images: pd.DataFrame, dataset: str, preferred: Sequence[str],
                 limit: int = MAX_LINES) -> list[str]:
    """The runs drawn as lines for ``dataset``: those of ``preferred`` (the register pairs'
    runs) first, then the highest CorLoc, at most ``limit``."""
    mine = images[images["dataset"] == dataset]
    corloc = mine.groupby("label")["hit_pct"].mean().sort_values(ascending=False, kind="stable")
    ordered = [label for label in preferred if label in corloc.index]
    ordered += [label for label in corloc.index if label not in ordered]
    return ordered[:limit]


def corloc_by(images: pd.DataFrame, column: str, shown: dict[str, list[str]]
              ) -> dict[str, pd.DataFrame]:
    """Per dataset, CorLoc (%) per bin of ``column``: the bin's image count, how many runs
    have images there, the range over every run (min, median, max), then the runs ``shown``
    for that dataset (a table per dataset: each draws its own runs)."""
    tables = {}
    for dataset, part in images.groupby("dataset", sort=False):
        per_run = part.pivot_table(index=column, columns="label", values="hit_pct",
                                   aggfunc="mean", observed=True)
        table = pd.DataFrame({
            "images": part.groupby(column, observed=True)["image_id"].nunique(),
            "runs": per_run.notna().sum(axis=1),
            "all runs: min": per_run.min(axis=1), "median": per_run.median(axis=1),
            "max": per_run.max(axis=1)})
        tables[dataset] = table.join(
            per_run[[c for c in shown.get(dataset, []) if c in per_run]]).round(1)
    return tables


def size_figure(images: pd.DataFrame, preferred: Sequence[str], smoke: bool,
                limit: int = MAX_LINES) -> Any:
    """CorLoc by object size: a row per dataset, a line per drawn run (``drawn_labels``), the
    range over every run as a grey band, each panel's legend beside it; the figure says how
    many runs each panel drew and how it chose them."""
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(images.dropna(subset=["size_bin"])["dataset"]))
    if not datasets:
        figure = Figure(figsize=(6.0, 2.5), layout="constrained")
        figure.add_subplot().axis("off")
        figure.text(0.5, 0.5, "no image has a ground-truth box", ha="center")
        return figure
    figure = Figure(figsize=(11.0, 3.6 * len(datasets) + 0.4), layout="constrained")
    axes = figure.subplots(len(datasets), 1, squeeze=False)[:, 0]
    notes = []
    for axis, dataset in zip(axes, datasets, strict=True):
        part = images[images["dataset"] == dataset]
        table = part.pivot_table(index="size_bin", columns="label", values="hit_pct",
                                 aggfunc="mean", observed=True)
        drawn = [label for label in drawn_labels(images, dataset, preferred, limit)
                 if label in table]
        x = np.arange(len(table))
        if table.shape[1] > len(drawn):
            axis.fill_between(x, table.min(axis=1), table.max(axis=1), color="0.85",
                              label=f"range over all {table.shape[1]} runs")
        for i, label in enumerate(drawn):
            axis.plot(x, table[label], marker="o", color=f"C{i % 10}",
                      label=wrap(label, 4.2, fontsize=6))
        axis.set_xticks(x, [str(b) for b in table.index], rotation=20, fontsize=7)
        axis.set_ylim(0, 100)
        axis.set_title(f"{dataset}: {len(drawn)} of {table.shape[1]} runs drawn", fontsize=9)
        axis.set_xlabel("largest GT box / image area", fontsize=8)
        axis.set_ylabel("CorLoc (%)", fontsize=8)
        axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        if table.shape[1] > len(drawn):
            notes.append(dataset)
    if notes:
        figure.suptitle(f"lines: the register pairs' runs, then the highest CorLoc, at most "
                        f"{limit} per dataset; grey: the range over every run (all in the "
                        "table above)", fontsize=8)
    if smoke:
        smoke_footer(figure)
    return figure


def pair_effect(runs: dict[str, RunData], flips: Sequence[dict[str, Any]], column: str
                ) -> pd.DataFrame:
    """Register effect per bin of ``column`` on each pair's shared images (with − without,
    points); one row per pair and bin, the pair named by its title."""
    rows = []
    for flip in flips:
        joined = joined_pair(runs, flip["row"])
        joined["size_bin"] = pd.cut(joined["area_share"], SIZE_BINS, include_lowest=True)
        joined["objects"] = pd.cut(joined["n_objects"], OBJECT_BINS, labels=OBJECT_LABELS)
        grouped = joined.groupby(column, observed=True)
        effect = pd.DataFrame({"images": grouped.size(),
                               "without": 100.0 * grouped["hit"].mean(),
                               "with": 100.0 * grouped["hit_reg"].mean()})
        effect["difference"] = effect["with"] - effect["without"]
        effect = effect.reset_index()
        effect.insert(0, "pair", flip["title"])
        rows.append(effect)
    return pd.concat(rows, ignore_index=True).round(1) if rows else pd.DataFrame()

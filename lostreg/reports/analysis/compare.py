"""``analyze show --run A B C``: several runs' answers on the same images, side by side.

Typical use: runs of one backbone on one dataset with different discovery methods (LOST,
TokenCut, DINO-seg), or one method with and without registers. Per image, one panel per run
shows the image with the GT boxes, the run's box, its final patch mask and its seed (for a
method that has one). Predictions store no masks, so each run's method is re-run on the image's
features (the run's backbone, weights, feature kind, layer, normalisation, precision and the
registry's batched ``run``), and the recomputed box and seed are checked against the stored
ones: a difference is warned about and written into the panel and caption. Runs sharing a
backbone share one forward per image.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lostreg.backbones import Backbone
from lostreg.datasets.base import load_rgb
from lostreg.errors import LostregError
from lostreg.features.extract import preprocess
from lostreg.features.pipeline import AUTOCAST_DTYPES, resolve_device, set_numerics
from lostreg.io import atomic_write_json
from lostreg.reports.analysis import plots
from lostreg.reports.analysis.marks import SMOKE_MARK
from lostreg.reports.analysis.report import (
    DEFAULT_MAX_IMAGES,
    MethodResult,
    apply_method,
    draw_image_with_result,
    method_features,
    progress_bar,
    remove_stale_panels,
    run_precision,
    safe_file_name,
    write_index,
)
from lostreg.reports.analysis.runs import (
    RunInfo,
    common_predictions,
    compare_dir,
    load_runs,
    rebuild_backbone,
    run_labels,
    run_records,
    unfinished_marks,
)


def select_common_images(infos: list[RunInfo], image_ids: list[str] | None,
                         max_images: int | None, misses_only: bool = False) -> list[str]:
    """Images every run predicted: ``image_ids`` (each must be in every run), else the first
    ``max_images`` (default 12), with ``misses_only`` those that at least one run missed."""
    if max_images is not None and max_images < 1:
        raise LostregError("--max-images must be at least 1")
    common, by_run = common_predictions(infos)
    if image_ids:
        for info, predictions in zip(infos, by_run, strict=True):
            unknown = [i for i in image_ids if i not in predictions]
            if unknown:
                raise LostregError(f"{info.run_dir / 'predictions.jsonl'}: no image "
                                   f"{', '.join(map(repr, unknown[:5]))}")
        chosen = list(dict.fromkeys(image_ids))
    else:
        chosen = [i for i in common
                  if not misses_only or any(not run[i]["hit"] for run in by_run)]
        max_images = max_images or DEFAULT_MAX_IMAGES
    return chosen[:max_images] if max_images else chosen


def backbone_key(info: RunInfo) -> tuple:
    """Runs with equal keys read features of the same forward (same model, weights,
    precision and position-embedding interpolation)."""
    config = info.config
    weights = config["weights"] if isinstance(config["weights"], dict) else {}
    return (config["model"], weights.get("source"), weights.get("sha256"), weights.get("path"),
            run_precision(info), config.get("pos_interp", "original"))


def recompute_image(image: Image.Image, infos: list[RunInfo], groups: dict[tuple, list[int]],
                    backbones: dict[tuple, Backbone], device: torch.device
                    ) -> list[MethodResult]:
    """Every run's method on one image, one forward per backbone group."""
    results: list[MethodResult | None] = [None] * len(infos)
    for key, members in groups.items():
        backbone = backbones[key]
        precision = key[4]
        set_numerics(precision)
        tensor, size = preprocess(image, backbone.mean, backbone.std, backbone.patch_size)
        images = tensor.unsqueeze(0).to(device)
        p = backbone.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        feats = method_features(backbone, images, [infos[i].method.request for i in members],
                                AUTOCAST_DTYPES[precision])
        for i in members:
            results[i] = apply_method(infos[i].method, feats[infos[i].method.request], grid, p,
                                      size)
    return [r for r in results if r is not None]


def panel_title(label: str, prediction: dict, result: MethodResult) -> str:
    iou = prediction.get("best_iou")
    title = f"{label}\n{'hit' if prediction['hit'] else 'miss'}"
    title += f", IoU {float(iou):.2f}" if iou is not None else ""
    return title + ("" if result.agrees_with(prediction) else "\nrecomputed box/seed differ!")


def finish_panels(out_dir: Path, output: str | Path | None, entries: list[dict], labels: list[str],
                  infos: list[RunInfo], **extra: Callable[[RunInfo], Any]) -> None:
    """After the side-by-side panels (box and mask runs alike): the panels of an earlier call
    that this one did not draw removed (only in the default folder), and ``runs.json``
    naming each label's run; ``extra`` adds fields, each computed from a run, and an
    unfinished run its ``unfinished_run`` record."""
    if output is None:
        remove_stale_panels(out_dir, {entry["file"] for entry in entries})
    atomic_write_json(out_dir / "runs.json", [
        {"label": label, "run_id": info.run_id, "run_dir": str(info.run_dir),
         "method": info.method.name, "method_params": info.method.params,
         **{key: field(info) for key, field in extra.items()}, **info.unfinished_fields()}
        for label, info in zip(labels, infos, strict=True)], undefined_as_null=True)


def render_compare_panel(path: Path, image: Image.Image, panels: list[tuple], title: str,
                         smoke: bool, footer: Sequence[str] = ()) -> None:
    """One image, one subplot per run: ``panels`` holds ``(label, prediction, result,
    patch_size)``; GT green, box red dashed, mask cyan, seed *; ``footer``: the unfinished
    runs' marks."""
    fig, flat = plots.panel_grid(len(panels), (3.6, 3.3))
    for ax, (label, prediction, result, patch_size) in zip(flat, panels, strict=False):
        draw_image_with_result(ax, image, prediction, result.mask, patch_size)
        ax.set_title(panel_title(label, prediction, result), fontsize=8)
    plots.finish_figure(fig, title + "\nGT green, box red (dashed), patch mask cyan, seed *",
                        smoke, footer=footer)
    plots.save_figure(fig, path)


def _build_backbones(infos: list[RunInfo], groups: dict[tuple, list[int]],
                     device: torch.device, weights: str | None) -> dict[tuple, Backbone]:
    if weights is not None and len(groups) > 1:
        raise LostregError("--weights: the runs use several models or weights; --weights can "
                           "only replace the weights of runs that share one")
    backbones = {}
    for key, members in groups.items():
        set_numerics(key[4])
        backbones[key] = rebuild_backbone(infos[members[0]], device, weights)
    return backbones


def _notes(infos: list[RunInfo], labels: list[str]) -> list[str]:
    notes = [SMOKE_MARK] if any(i.smoke for i in infos) else []
    notes += unfinished_marks(infos, labels)
    for info, label in zip(infos, labels, strict=True):
        notes.append(f"{label}: run {info.run_id} ({info.config['model']}, "
                     f"{info.method.describe()})")
    return notes


def show_compare(
    run_dirs: list[str | Path],
    image_ids: list[str] | None = None,
    max_images: int | None = None,
    misses_only: bool = False,
    device: str = "auto",
    data_root: str | Path | None = None,
    output: str | Path | None = None,
    weights: str | None = None,
    progress: bool = False,
) -> Path:
    """Render one side-by-side panel per image and an ``index.html`` (default
    ``results/analysis/compare-<dataset>-<hash>/show/``); returns the index path."""
    infos = load_runs(list(run_dirs))
    if infos[0].is_mask:
        raise LostregError("these are mask runs; their panels are "
                           "mask_report.show_mask_compare's")
    labels = run_labels(infos)
    chosen = select_common_images(infos, image_ids, max_images, misses_only)
    if not chosen:
        raise LostregError("no image to show (every run hit every image, with --misses?)")
    _, by_run = common_predictions(infos)
    torch_device = resolve_device(device)
    groups: dict[tuple, list[int]] = {}
    for number, info in enumerate(infos):
        groups.setdefault(backbone_key(info), []).append(number)
    backbones = _build_backbones(infos, groups, torch_device, weights)
    _, records = run_records(infos[0], data_root)
    out_dir = Path(output) if output is not None else compare_dir(infos) / "show"
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = infos[0].config["dataset"]
    models = " vs ".join(dict.fromkeys(str(i.config["model"]) for i in infos))
    entries = []
    bar = progress_bar(len(chosen), progress, f"show {len(infos)} runs")
    for number, image_id in enumerate(chosen):
        image = load_rgb(records[image_id].path)
        results = recompute_image(image, infos, groups, backbones, torch_device)
        predictions = [run[image_id] for run in by_run]
        differing = [label for label, p, r in zip(labels, predictions, results, strict=True)
                     if not r.agrees_with(p)]
        for label in differing:
            bar.write(f"warning: {image_id}: recomputed {label} differs from the run",
                      file=sys.stderr)
        file_name = f"{number:03d}-{safe_file_name(image_id)}.png"
        panels = [(label, p, r, info.patch_size)
                  for label, p, r, info in zip(labels, predictions, results, infos, strict=True)]
        render_compare_panel(out_dir / file_name, image, panels,
                             f"{image_id} | {dataset} | {models}", any(i.smoke for i in infos),
                             unfinished_marks(infos, labels))
        verdicts = ", ".join(f"{label}: {'hit' if p['hit'] else 'miss'}"
                             for label, p in zip(labels, predictions, strict=True))
        caption = f"{image_id}: {verdicts}" + (
            f" [recomputed {', '.join(differing)} differ from the run]" if differing else "")
        entries.append({"file": file_name, "caption": caption, "anchor": f"img{number}"})
        bar.update(1)
    bar.close()
    finish_panels(out_dir, output, entries, labels, infos)
    index = out_dir / "index.html"
    write_index(index, f"Runs side by side: {models} on {dataset}", _notes(infos, labels),
                entries)
    return index

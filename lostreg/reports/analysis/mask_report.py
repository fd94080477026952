"""``analyze show`` on mask runs (ECSSD, DUTS-TE, DUT-OMRON): per-image panels and ``index.html``.

One run: per image, the image with the GT's outline and the run's predicted mask, the GT mask,
the predicted mask alone (decoded from the line's ``pred_mask_rle``: what the run scored), the
per-image IoU (the line's ``sal_iou``) in the titles, then the maps the box panels show, on the
grid of the image resized as the run resized it: the method's patch mask (or LOST's degrees),
the last block's token norms (outliers marked when a threshold is known) and the attention of
the class token and each register. The method is re-run on the image (the run's model,
features, protocol and refinement) and a mask or seed that differs from the stored one is
flagged; the panels always draw the stored mask.

Several runs: per image, the GT, then one panel per run with its stored mask and IoU. Mask
runs store their masks, so this needs no model.

The GT is read with the dataset's reader and checked against each run's counts
(``masks.checked_gt``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lostreg.datasets.base import DEFAULT_MAX_PIXELS, ImageRecord, load_rgb
from lostreg.errors import LostregError
from lostreg.evaluation.saliency_protocol import upsample_patch_mask
from lostreg.features.pipeline import AUTOCAST_DTYPES, resolve_device, set_numerics
from lostreg.reports.analysis import plots
from lostreg.reports.analysis.compare import finish_panels, select_common_images
from lostreg.reports.analysis.marks import SMOKE_MARK
from lostreg.reports.analysis.masks import (
    GT_COLOUR,
    IOU_DEFINITION,
    PRED_COLOUR,
    checked_gt,
    draw_masks,
    grid_point,
    iou_text,
    stored_mask,
)
from lostreg.reports.analysis.norms import outlier_mask
from lostreg.reports.analysis.report import (
    ImageMaps,
    _known_threshold,
    _map_panels,
    compute_image_maps,
    progress_bar,
    remove_stale_panels,
    run_precision,
    safe_file_name,
    select_predictions,
    write_index,
)
from lostreg.reports.analysis.runs import (
    RunInfo,
    common_predictions,
    compare_dir,
    load_run,
    load_runs,
    prediction_seed,
    rebuild_backbone,
    run_labels,
    run_records,
    unfinished_marks,
)
from lostreg.runs.mask_lines import refined


def max_pixels_of(info: RunInfo) -> int:
    """The run's ``--max-pixels`` (images are read under the same limit)."""
    settings = info.config.get("settings") if isinstance(info.config.get("settings"), dict) else {}
    value = settings.get("max_pixels", DEFAULT_MAX_PIXELS)
    if type(value) is not int or value < 1:
        raise LostregError(f"{info.run_dir / 'config.json'}: settings.max_pixels must be a "
                           f"whole number >= 1, got {value!r}")
    return value


def recomputed_mask(info: RunInfo, record: ImageRecord, patch_mask: np.ndarray,
                    size: tuple[int, int]) -> np.ndarray:
    """The binary mask the run would store for a recomputed patch mask: upsampled to the
    original ``size = (H, W)`` as the run does, refined as the run was, then ``> 0.5``."""
    upsampled = upsample_patch_mask(patch_mask, size)
    return refined(record, upsampled, info.refine, max_pixels_of(info)) > 0.5


def seed_xy(prediction: dict, grid: tuple[int, int],
            size: tuple[int, int]) -> tuple[float, float] | None:
    """The stored seed's centre in original pixels (None for a method without one)."""
    seed = prediction_seed(prediction)
    return None if seed is None else grid_point(seed[0], seed[1], grid, size)


def _draw_maps(fig, axes: list, maps: ImageMaps, prediction: dict, threshold: float | None,
               method_title: str) -> None:
    """The map panels (patch mask or degrees, norms, attention) stretched over the original
    image, the stored seed on each, outliers framed on the norm map."""
    height, width = maps.size
    extent = (0, width, height, 0)
    point = seed_xy(prediction, maps.grid, maps.size)
    for ax, (values, label, scale, cmap) in zip(axes, _map_panels(maps, method_title),
                                                strict=False):
        norm = None if scale in (None, "mask") else scale
        im = ax.imshow(values, extent=extent, cmap=cmap, norm=norm, interpolation="nearest",
                       **({"vmin": 0, "vmax": 1} if scale == "mask" else {}))
        if scale != "mask":
            plots.add_colorbar(fig, im, ax, log=type(norm).__name__ == "LogNorm")
        if point is not None:
            ax.plot(*point, marker="*", color="yellow", markersize=9, markeredgecolor="black")
        ax.set_title(label + " (resized grid)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    outliers = outlier_mask(maps.norms, threshold)
    if outliers.any():
        ys, xs = np.nonzero(outliers)
        centres = [grid_point(r, c, maps.grid, maps.size) for r, c in zip(ys, xs, strict=True)]
        axes[1].scatter([x for x, _ in centres], [y for _, y in centres], marker="s",
                        facecolors="none", edgecolors="cyan", s=30, linewidths=1.0,
                        label=f"norm > {threshold:.3g}")
        axes[1].legend(loc="lower right", fontsize=6)


def mask_panel_figure(picture: np.ndarray, gt: np.ndarray, mask: np.ndarray, prediction: dict,
                      maps: ImageMaps, threshold: float | None, title: str, smoke: bool,
                      method_title: str, footer: Sequence[str] = ()):
    """One image's panel figure (see the module docstring); the caller saves it. ``footer``:
    the run's unfinished mark, under the smoke mark."""
    from matplotlib.colors import ListedColormap

    n_panels = 3 + len(_map_panels(maps, method_title))
    fig, flat = plots.panel_grid(n_panels, (3.4, 3.0))
    height, width = mask.shape
    draw_masks(flat[0], picture, gt, mask, seed_xy(prediction, maps.grid, maps.size))
    flat[0].set_title(f"image: GT outline (green), {method_title} mask (cyan)"
                      + (", seed (*)" if prediction_seed(prediction) is not None else ""),
                      fontsize=8)
    flat[1].imshow(gt, cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0),
                   interpolation="nearest")
    grey = int(prediction["gt_grey_pixels"])
    flat[1].set_title("GT mask (any non-zero pixel is the object, TokenCut's rule)"
                      + (f"; {grey} grey pixels" if grey else ""), fontsize=8)
    flat[2].imshow(mask.astype(np.float32), cmap=ListedColormap(["white", PRED_COLOUR]),
                   vmin=0, vmax=1, extent=(0, width, height, 0), interpolation="nearest")
    flat[2].set_title(f"{method_title} mask, as stored (pred_mask_rle): "
                      f"{iou_text(prediction)}", fontsize=8)
    for ax in flat[1:3]:
        ax.set_xticks([])
        ax.set_yticks([])
    _draw_maps(fig, flat[3:n_panels], maps, prediction, threshold, method_title)
    plots.finish_figure(fig, title, smoke, footer=footer)
    return fig


def mask_caption(info: RunInfo, prediction: dict, mask: np.ndarray, agree: bool) -> str:
    """``id: IoU 0.501, seed [r, c], mask 31.2% of the image`` plus a flag when the
    recomputed mask or seed differs from the stored ones."""
    caption = (f"{prediction['image_id']}: {iou_text(prediction)}"
               + (f", seed {prediction['seed']}" if prediction.get("seed") is not None else "")
               + f", mask {mask.mean():.1%} of the image")
    if prediction.get("nonfinite") is True:
        caption += " [the run's features were not finite: no prediction]"
    if not agree:
        caption += (f" [recomputed {info.method.name} mask or seed differs from the run's: "
                    "maps may not match it]")
    return caption


def _panel_notes(info: RunInfo, precision: str, threshold: float | None, source: str
                 ) -> list[str]:
    config = info.config
    notes = [f"run {info.run_id}: {config['model']} ({config.get('timm_name', '')}), dataset "
             f"{config['dataset']}, {info.method.describe()}, refine {info.refine}, mask "
             f"protocol {config.get('mask_protocol')}, precision {precision}",
             IOU_DEFINITION,
             "maps are on the grid of the image resized to a patch multiple (the run's input), "
             "stretched over the original image",
             f"outlier threshold: {'none' if threshold is None else f'{threshold:.4g}'} "
             f"({source})"]
    return ([SMOKE_MARK] if info.smoke else []) + unfinished_marks([info]) + notes


def show_mask_run(run_dir: str | Path | RunInfo, image_ids: list[str] | None = None,
                  max_images: int | None = None, device: str = "auto",
                  data_root: str | Path | None = None, norms: str | Path | None = None,
                  threshold: float | None = None, output: str | Path | None = None,
                  weights: str | None = None, progress: bool = False) -> Path:
    """Render a mask run's panels and ``index.html`` (default ``<run>/analysis/show/``);
    returns the index path."""
    info = run_dir if isinstance(run_dir, RunInfo) else load_run(run_dir)
    if not info.is_mask:
        raise LostregError(f"{info.run_dir}: not a mask run (use show_run)")
    chosen = select_predictions(info, image_ids, max_images)
    precision = run_precision(info)
    torch_device = resolve_device(device)
    set_numerics(precision)
    backbone = rebuild_backbone(info, torch_device, weights)
    _, by_id = run_records(info, data_root)
    used, source = _known_threshold(info, norms, threshold, backbone.depth)
    out_dir = Path(output) if output is not None else info.analysis_dir / "show"
    out_dir.mkdir(parents=True, exist_ok=True)
    method_title = info.method.spec.title or info.method.name
    entries = []
    bar = progress_bar(len(chosen), progress, f"show {info.run_id}")
    for number, prediction in enumerate(chosen):
        image_id = str(prediction["image_id"])
        record = by_id[image_id]
        image = load_rgb(record.path, max_pixels_of(info))
        mask = stored_mask(prediction, str(info.run_dir / "predictions.jsonl"))
        gt = checked_gt(record, prediction, mask, info.run_id)
        maps = compute_image_maps(backbone, image, info.method, torch_device,
                                  AUTOCAST_DTYPES[precision], image_protocol="resize")
        again = recomputed_mask(info, record, maps.result.mask, mask.shape)
        agree = bool(np.array_equal(again, mask)) and maps.result.seed == prediction_seed(
            prediction)
        if not agree:
            bar.write(f"warning: {image_id}: recomputed {info.method.name} differs from the "
                      "run", file=sys.stderr)
        caption = mask_caption(info, prediction, mask, agree)
        if used is not None:
            caption += f", {int(outlier_mask(maps.norms, used).sum())} outlier tokens"
        file_name = f"{number:03d}-{safe_file_name(image_id)}.png"
        figure = mask_panel_figure(np.asarray(image), gt, mask, prediction, maps, used,
                                   f"{info.config['model']} | {caption}", info.smoke,
                                   method_title, unfinished_marks([info]))
        plots.save_figure(figure, out_dir / file_name)
        entries.append({"file": file_name, "caption": caption, "anchor": f"img{number}",
                        "image_id": image_id, "recomputed_matches_run": agree})
        bar.update(1)
    bar.close()
    if output is None:
        remove_stale_panels(out_dir, {entry["file"] for entry in entries})
    index = out_dir / "index.html"
    write_index(index, f"{method_title} masks: {info.run_id}",
                _panel_notes(info, precision, used, source), entries)
    return index


# --- several mask runs side by side -----------------------------------------------------------


def compare_mask_figure(picture: np.ndarray, gt: np.ndarray, panels: list[tuple], title: str,
                        smoke: bool, footer: Sequence[str] = ()):
    """The GT, then one subplot per run: ``panels`` holds ``(label, prediction, mask, grid)``;
    each run's stored mask cyan, the GT's outline green, the seed *; ``footer``: the unfinished
    runs' marks."""
    fig, flat = plots.panel_grid(1 + len(panels), (3.6, 3.3))
    height, width = gt.shape
    flat[0].imshow(gt, cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0),
                   interpolation="nearest")
    flat[0].set_title("GT mask (any non-zero pixel is the object)", fontsize=8)
    flat[0].set_xticks([])
    flat[0].set_yticks([])
    for ax, (label, prediction, mask, grid) in zip(flat[1:], panels, strict=False):
        draw_masks(ax, picture, gt, mask, seed_xy(prediction, grid, mask.shape))
        ax.set_title(f"{label}\n{iou_text(prediction)}", fontsize=8)
    plots.finish_figure(fig, title + "\nGT outline green, stored mask cyan, seed *", smoke,
                        footer=footer)
    return fig


def show_mask_compare(run_dirs: list[str | Path], image_ids: list[str] | None = None,
                      max_images: int | None = None, data_root: str | Path | None = None,
                      output: str | Path | None = None, progress: bool = False) -> Path:
    """One side-by-side panel per image of several mask runs and an ``index.html`` (default
    ``results/analysis/compare-<dataset>-<hash>/show/``); returns the index path."""
    infos = load_runs(list(run_dirs))
    if not infos[0].is_mask:
        raise LostregError("show_mask_compare: these are box runs (use show_compare)")
    labels = run_labels(infos)
    chosen = select_common_images(infos, image_ids, max_images)
    _, by_run = common_predictions(infos)
    _, records = run_records(infos[0], data_root)
    out_dir = Path(output) if output is not None else compare_dir(infos) / "show"
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = infos[0].config["dataset"]
    models = " vs ".join(dict.fromkeys(str(i.config["model"]) for i in infos))
    smoke = any(i.smoke for i in infos)
    entries = []
    bar = progress_bar(len(chosen), progress, f"show {len(infos)} runs")
    for number, image_id in enumerate(chosen):
        record = records[image_id]
        picture = np.asarray(load_rgb(record.path, max_pixels_of(infos[0])))
        panels, gt = [], None
        for label, info, run in zip(labels, infos, by_run, strict=True):
            prediction = run[image_id]
            mask = stored_mask(prediction, str(info.run_dir / "predictions.jsonl"))
            gt = checked_gt(record, prediction, mask, info.run_id, gt)  # read for the first run
            panels.append((label, prediction, mask, info.grid(prediction)))
        file_name = f"{number:03d}-{safe_file_name(image_id)}.png"
        figure = compare_mask_figure(picture, gt, panels, f"{image_id} | {dataset} | {models}",
                                     smoke, unfinished_marks(infos, labels))
        plots.save_figure(figure, out_dir / file_name)
        ious = ", ".join(f"{label}: {iou_text(p)}" for label, p, _, _ in panels)
        entries.append({"file": file_name, "caption": f"{image_id}: {ious}",
                        "anchor": f"img{number}"})
        bar.update(1)
    bar.close()
    finish_panels(out_dir, output, entries, labels, infos, refine=lambda info: info.refine)
    notes = ([SMOKE_MARK] if smoke else []) + unfinished_marks(infos, labels) + [
        IOU_DEFINITION, f"GT outline {GT_COLOUR}; each run's stored mask (pred_mask_rle) cyan"]
    notes += [f"{label}: run {info.run_id} ({info.config['model']}, {info.method.describe()}, "
              f"refine {info.refine})" for label, info in zip(labels, infos, strict=True)]
    index = out_dir / "index.html"
    write_index(index, f"Masks side by side: {models} on {dataset}", notes, entries)
    return index


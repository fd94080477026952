"""``analyze show``: one PNG panel per image of a run, plus a static ``index.html``.

Each panel puts side by side what decides LOST's box: the image with GT boxes, the predicted box
and the seed; LOST's degree map (recomputed with the run's model and settings); the token-norm
map of the last block (outliers marked when a threshold is known); and the last block's
attention of the class token and of each register to the patches (Darcet et al., Figure 9).
"""

from __future__ import annotations

import html
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image

from lostreg.analysis import plots
from lostreg.analysis.collect import load_norms
from lostreg.analysis.norms import outlier_mask, patch_token_norms
from lostreg.analysis.runs import RunInfo, load_run, rebuild_backbone, run_records
from lostreg.analysis.tokens import panel_readout
from lostreg.backbones import Backbone
from lostreg.datasets.base import load_rgb
from lostreg.errors import LostregError
from lostreg.features import preprocess
from lostreg.io import atomic_write_text
from lostreg.methods.lost import lost
from lostreg.run import PRECISIONS, resolve_device, set_numerics

DEFAULT_MAX_IMAGES = 12


@dataclass
class ImageMaps:
    """Everything a panel shows about one image, on its padded patch grid."""

    grid: tuple[int, int]
    size: tuple[int, int]
    box: list[int]
    seed: int
    degrees: np.ndarray
    norms: np.ndarray
    attention: np.ndarray  # (P, rows, cols)
    prefix_names: list[str]


def prefix_names(model: torch.nn.Module, num_prefix_tokens: int) -> list[str]:
    """Names of the prefix tokens in timm's order: class token first, then registers."""
    names = ["CLS"] if getattr(model, "cls_token", None) is not None else []
    names += [f"register {i + 1}" for i in range(num_prefix_tokens - len(names))]
    return names


def compute_image_maps(backbone: Backbone, image: Image.Image, feature: str, k_patches: int,
                       gram_bias: float, device: torch.device,
                       autocast: torch.dtype | None = None) -> ImageMaps:
    """Recompute LOST (box, seed, degrees), last-block token norms and prefix attention from
    one forward (the features are ``lostreg.features``' exact q/k/v slice)."""
    tensor, size = preprocess(image, backbone.mean, backbone.std, backbone.patch_size)
    images = tensor.unsqueeze(0).to(device)
    p = backbone.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    with torch.autocast(device.type, dtype=autocast or torch.float32,
                        enabled=autocast is not None):
        readout = panel_readout(backbone, images, feature)
    out = lost(readout.features[0], grid, p, size, k_patches, gram_bias)
    norms = patch_token_norms(readout.output, readout.num_prefix_tokens)[0]
    return ImageMaps(
        grid, size, [int(v) for v in out.box], int(out.seed),
        out.degrees.float().reshape(grid).cpu().numpy(),
        norms.reshape(grid).cpu().numpy(),
        readout.attention[0].reshape(-1, *grid).cpu().numpy(),
        readout.names,
    )


def _draw_box(ax, box, colour: str, width: float = 2.0, style: str = "-") -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                           linewidth=width, linestyle=style))


def render_panel(path: Path, image: Image.Image, prediction: dict, maps: ImageMaps,
                 patch_size: int, threshold: float | None, title: str) -> None:
    """Write one image's panel PNG (see the module docstring for what it shows)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows, cols = maps.grid
    extent = (0, cols * patch_size, rows * patch_size, 0)
    seed_row, seed_col = (int(v) for v in prediction["seed"])
    seed_xy = ((seed_col + 0.5) * patch_size, (seed_row + 0.5) * patch_size)
    n_panels = 3 + len(maps.prefix_names)
    ncols = min(4, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows + 0.6),
                             squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.axis("off")

    ax = flat[0]
    ax.imshow(np.asarray(image), extent=(0, image.width, image.height, 0))
    for gt in prediction.get("gt_boxes") or []:
        _draw_box(ax, gt, "#22cc44")
    _draw_box(ax, prediction["box"], "#ff2222", style="--")
    ax.plot(*seed_xy, marker="*", color="yellow", markersize=12, markeredgecolor="black")
    ax.set_xlim(0, cols * patch_size)  # same geometry as the maps (padding shown blank)
    ax.set_ylim(rows * patch_size, 0)
    ax.set_title("image: GT (green), LOST box (red), seed (*)", fontsize=8)

    panels = [(flat[1], maps.degrees, "LOST degree (positive correlations)", None, "viridis"),
              (flat[2], maps.norms, "token norm, last block (log)",
               LogNorm(vmin=max(float(maps.norms.min()), 1e-6),
                       vmax=max(float(maps.norms.max()), 1e-6) * 1.0001), "magma")]
    for i, name in enumerate(maps.prefix_names):
        panels.append((flat[3 + i], maps.attention[i], f"{name} attention to patches",
                       None, "inferno"))
    for ax, values, label, norm, cmap in panels:
        im = ax.imshow(values, extent=extent, cmap=cmap, norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        ax.plot(*seed_xy, marker="*", color="yellow", markersize=9, markeredgecolor="black")
        _draw_box(ax, prediction["box"], "#ff2222", width=1.2, style="--")
        ax.set_title(label, fontsize=8)
    mask = outlier_mask(maps.norms, threshold)
    if mask.any():
        ys, xs = np.nonzero(mask)
        flat[2].scatter((xs + 0.5) * patch_size, (ys + 0.5) * patch_size, marker="s",
                        facecolors="none", edgecolors="cyan", s=30, linewidths=1.0,
                        label=f"norm > {threshold:.3g}")
        flat[2].legend(loc="lower right", fontsize=6)
    for ax in flat[:n_panels]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    plots.save_figure(fig, path, dpi=90)


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:80] or "image"


def write_index(path: Path, heading: str, notes: list[str], entries: list[dict]) -> None:
    """A static page listing the panels (relative links, every text escaped)."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(heading)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}figure{margin:0 0 2em 0}"
             "img{max-width:100%;border:1px solid #ccc}.warn{color:#b00}</style>",
             "</head><body>", f"<h1>{esc(heading)}</h1>"]
    parts += [f'<p class="warn">{esc(note)}</p>' if note.startswith("SMOKE")
              else f"<p>{esc(note)}</p>" for note in notes]
    parts.append("<ul>")
    parts += [f'<li><a href="#{esc(e["anchor"])}">{esc(e["caption"])}</a></li>' for e in entries]
    parts.append("</ul>")
    for entry in entries:
        link = quote(entry["file"])
        parts.append(f'<figure id="{esc(entry["anchor"])}"><a href="{esc(link)}">'
                     f'<img src="{esc(link)}" alt="{esc(entry["caption"])}"></a>'
                     f"<figcaption>{esc(entry['caption'])}</figcaption></figure>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")


def _known_threshold(info: RunInfo, norms: str | Path | None, threshold: float | None,
                     depth: int) -> tuple[float | None, str]:
    """Threshold for the norm panels: ``--threshold``, else a norms analysis of the last block
    (``--norms`` or the run's own ``analysis/norms``), else none."""
    if threshold is not None:
        if not threshold > 0:
            raise LostregError(f"--threshold {threshold}: must be positive")
        return threshold, "--threshold"
    path = Path(norms) if norms is not None else info.analysis_dir / "norms" / "norms.json"
    if norms is None and not path.is_file():
        return None, "no norms analysis of this run: outliers not marked"
    payload, _ = load_norms(path)
    if int(payload["primary_layer"]) != depth - 1:
        return None, f"{path} is about block {payload['primary_layer']}: outliers not marked"
    if payload.get("model") != info.config["model"]:
        raise LostregError(f"{path}: norms of model {payload.get('model')}, run is "
                           f"{info.config['model']}")
    return payload["threshold"], f"threshold from {path}"


def select_predictions(info: RunInfo, image_ids: list[str] | None, max_images: int | None,
                       misses_only: bool = False) -> list[dict]:
    if max_images is not None and max_images < 1:
        raise LostregError("--max-images must be at least 1")
    if image_ids:
        by_id = {str(p["image_id"]): p for p in info.predictions}
        unknown = [i for i in image_ids if i not in by_id]
        if unknown:
            raise LostregError(f"{info.run_dir / 'predictions.jsonl'}: no image "
                               f"{', '.join(map(repr, unknown[:5]))}")
        chosen = [by_id[i] for i in dict.fromkeys(image_ids)]
    else:
        chosen = [p for p in info.predictions if not (misses_only and p["hit"])]
        max_images = max_images or DEFAULT_MAX_IMAGES
    return chosen[:max_images] if max_images else chosen


def show_run(
    run_dir: str | Path,
    image_ids: list[str] | None = None,
    max_images: int | None = None,
    misses_only: bool = False,
    device: str = "auto",
    data_root: str | Path | None = None,
    norms: str | Path | None = None,
    threshold: float | None = None,
    output: str | Path | None = None,
    weights: str | None = None,
) -> Path:
    """Render the panels and ``index.html`` (default ``<run>/analysis/show/``); returns the
    index path."""
    info = load_run(run_dir)
    chosen = select_predictions(info, image_ids, max_images, misses_only)
    if not chosen:
        raise LostregError(f"{info.run_dir}: no image to show (all hits with --misses?)")
    config = info.config
    precision = str(config.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise LostregError(f"{info.run_dir / 'config.json'}: unknown precision {precision!r}")
    torch_device = resolve_device(device)
    set_numerics(precision)
    backbone = rebuild_backbone(info, torch_device, weights)
    _, by_id = run_records(info, data_root)
    depth = len(backbone.model.blocks)
    used_threshold, threshold_note = _known_threshold(info, norms, threshold, depth)
    out_dir = Path(output) if output is not None else info.analysis_dir / "show"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, prediction in enumerate(chosen):
        image_id = str(prediction["image_id"])
        image = load_rgb(by_id[image_id].path)
        maps = compute_image_maps(backbone, image, config["feature"], int(config["k_patches"]),
                                  float(config["gram_bias"]), torch_device,
                                  PRECISIONS[precision])
        seed = list(divmod(maps.seed, maps.grid[1]))
        agree = seed == [int(v) for v in prediction["seed"]] and maps.box == list(
            prediction["box"])
        verdict = "hit" if prediction["hit"] else "miss"
        iou = prediction.get("best_iou")
        caption = (f"{image_id}: {verdict}" + (f", IoU {float(iou):.2f}" if iou is not None
                                               else "")
                   + f", seed {prediction['seed']}, box {prediction['box']}")
        if not agree:
            caption += (f" [recomputed seed {seed} box {maps.box} differ from the run's: "
                        "maps may not match it]")
            print(f"warning: {image_id}: recomputed LOST differs from the run", file=sys.stderr)
        if used_threshold is not None:
            caption += f", {int(outlier_mask(maps.norms, used_threshold).sum())} outlier tokens"
        file_name = f"{number:03d}-{_safe_name(image_id)}.png"
        render_panel(out_dir / file_name, image, prediction, maps, info.patch_size,
                     used_threshold, f"{config['model']} | {caption}")
        entries.append({"file": file_name, "caption": caption, "anchor": f"img{number}",
                        "image_id": image_id, "recomputed_matches_run": agree})
    notes = [f"run {info.run_id}: {config['model']} ({config.get('timm_name', '')}), dataset "
             f"{config['dataset']}, feature {config['feature']}, k={config['k_patches']}, "
             f"gram_bias={config['gram_bias']}, precision {precision}",
             f"outlier threshold: {'none' if used_threshold is None else f'{used_threshold:.4g}'}"
             f" ({threshold_note})"]
    if config.get("smoke_run"):
        notes.insert(0, "SMOKE RUN (random weights): not a result")
    if output is None:  # our own folder: drop panels of earlier calls that are not listed
        written = {entry["file"] for entry in entries}
        for stale in out_dir.glob("[0-9][0-9][0-9]-*.png"):
            if stale.name not in written:
                stale.unlink(missing_ok=True)
    index = out_dir / "index.html"
    write_index(index, f"LOST panels: {info.run_id}", notes, entries)
    return index

"""``analyze show``: one PNG panel per image of a run, plus a static ``index.html``.

Each panel puts side by side what decides the run's box: the image with GT boxes, the predicted
box, the method's final patch mask and its seed (if it has one); for LOST the degree map; the
token-norm map of the last block (outliers marked when a threshold is known); and the last
block's attention of the class token and of each register to the patches (Darcet et al.,
Figure 9). Box, seed and mask are recomputed with the run's model, features and method (the
registry's ``run``) and checked against the stored prediction. Several runs side by side are
:mod:`lostreg.reports.analysis.compare`.
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lostreg.backbones import Backbone
from lostreg.datasets.base import load_rgb
from lostreg.errors import LostregError
from lostreg.evaluation.saliency_protocol import resize_to_patch_multiple
from lostreg.features.extract import (
    FEATURE_KINDS,
    FeatureRequest,
    extract,
    layer_view,
    preprocess,
    resolve_layer,
)
from lostreg.features.pipeline import AUTOCAST_DTYPES, resolve_device, set_numerics
from lostreg.io import atomic_write_text
from lostreg.methods.lost import lost
from lostreg.reports.analysis import plots
from lostreg.reports.analysis.collect import load_norms
from lostreg.reports.analysis.marks import SMOKE_MARK, is_warning
from lostreg.reports.analysis.norms import outlier_mask, patch_token_norms
from lostreg.reports.analysis.runs import (
    RunInfo,
    RunMethod,
    load_run,
    prediction_seed,
    rebuild_backbone,
    run_records,
    unfinished_marks,
)
from lostreg.reports.analysis.tokens import panel_readout
from lostreg.runs.config import PRECISIONS

DEFAULT_MAX_IMAGES = 12
GT_COLOUR, BOX_COLOUR, MASK_COLOUR = "#22cc44", "#ff2222", (0.0, 0.9, 1.0)


@dataclass
class MethodResult:
    """One method's answer on one image: the pixel box, the seed patch ``(row, col)`` (None for
    a method without one) and the final patch mask ``(rows, cols)`` the box was drawn around."""

    box: list[float]
    seed: tuple[int, int] | None
    mask: np.ndarray

    def agrees_with(self, prediction: dict) -> bool:
        """Same box and seed as the run stored for the image."""
        stored_box = [float(v) for v in prediction["box"]]
        return self.box == stored_box and self.seed == prediction_seed(prediction)


@dataclass
class ImageMaps:
    """Everything a panel shows about one image, on its patch grid (padded, or of the resized
    image for a mask run); ``size`` is the image's original ``(H, W)``."""

    grid: tuple[int, int]
    size: tuple[int, int]
    result: MethodResult
    degrees: np.ndarray | None  # LOST's degree map; None for other methods
    norms: np.ndarray
    attention: np.ndarray  # (P, rows, cols)
    prefix_names: list[str]


def prefix_names(model: torch.nn.Module, num_prefix_tokens: int) -> list[str]:
    """Names of the prefix tokens in timm's order: class token first, then registers."""
    names = ["CLS"] if getattr(model, "cls_token", None) is not None else []
    names += [f"register {i + 1}" for i in range(num_prefix_tokens - len(names))]
    return names


def method_features(backbone: Backbone, images: torch.Tensor, requests: list[FeatureRequest],
                    autocast: torch.dtype | None = None,
                    last_qkv: torch.Tensor | None = None) -> dict[FeatureRequest, torch.Tensor]:
    """The run pipeline's features (``lostreg.features.extract.extract``) for each request, from one
    forward. With ``last_qkv`` (the last block's fused qkv of ``images``, already computed),
    last-block kinds of a model without RoPE are derived from it exactly as ``extract`` does,
    with no second forward (a RoPE model's rotation is not in ``qkv``: it runs ``extract``)."""
    model = backbone.model
    depth = backbone.depth
    out: dict[FeatureRequest, torch.Tensor] = {}
    missing = []
    reusable = last_qkv is not None and getattr(model, "rope", None) is None
    for request in dict.fromkeys(requests):
        if request.kind not in FEATURE_KINDS:
            raise LostregError(f"feature {request.kind!r} is not known to this lostreg (known: "
                               f"{', '.join(FEATURE_KINDS)})")
        if reusable and resolve_layer(request.layer, depth) == depth - 1:
            with torch.inference_mode(), torch.autocast(
                    images.device.type, dtype=autocast or torch.float32,
                    enabled=autocast is not None):
                view = layer_view(backbone, last_qkv, depth - 1)
                out[request] = FEATURE_KINDS[request.kind].compute(view).float().contiguous()
        else:
            missing.append(request)
    if missing:
        out.update(extract(backbone, images, missing, autocast))
    return out


def apply_method(method: RunMethod, feats: torch.Tensor, grid: tuple[int, int],
                 patch_size: int, size: tuple[int, int], saliency: bool = False) -> MethodResult:
    """Run the registry's method on one image's features ``(1, N, D)`` as the run did; with
    ``saliency`` the mask is the one a saliency run scores (``MethodSpec.mask_for_saliency``:
    DINO-seg's thresholded attention, not the component its box is drawn around)."""
    if method.normalize == "l2":
        feats = F.normalize(feats, dim=-1)
    sizes = torch.tensor([list(size)], dtype=torch.long, device=feats.device)
    out = method.spec.run(feats, grid, patch_size, sizes, method.params)
    masks = method.spec.mask_for_saliency(out) if saliency else out.mask
    mask = masks[0].detach().cpu().numpy().astype(bool)
    if mask.shape != tuple(grid):
        raise LostregError(f"method {method.name} returned a {mask.shape} mask for a {grid} "
                           "patch grid")
    seed = int(out.seed[0])
    return MethodResult([float(v) for v in out.box[0].tolist()],
                        None if seed < 0 else divmod(seed, grid[1]), mask)


def model_input(image: Image.Image, backbone: Backbone, image_protocol: str = "pad"
                ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """``(normalised (3, Hp, Wp) tensor, the size the method clips to, the image's original
    (H, W))`` as the run fed it: padded to a patch multiple (``pad``), or first resized to
    the nearest one with LANCZOS (``resize``: a mask run, TokenCut's ``resize_pil``; the
    method then sees the resized size, as the run's pass gives it)."""
    original = (image.height, image.width)
    if image_protocol == "resize":
        image = resize_to_patch_multiple(image, backbone.patch_size)
    tensor, size = preprocess(image, backbone.mean, backbone.std, backbone.patch_size)
    return tensor, size, original


def compute_image_maps(backbone: Backbone, image: Image.Image, method: RunMethod,
                       device: torch.device, autocast: torch.dtype | None = None,
                       image_protocol: str = "pad") -> ImageMaps:
    """Recompute the run's method (box, seed, mask; LOST's degrees), the last block's token
    norms and the prefix attention, from one forward when the method reads the last block.
    With ``image_protocol="resize"`` (a mask run) the image is resized as the run resized it
    and the mask is the one a saliency run scores; ``size`` is then the original size."""
    tensor, size, original = model_input(image, backbone, image_protocol)
    images = tensor.unsqueeze(0).to(device)
    p = backbone.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    with torch.autocast(device.type, dtype=autocast or torch.float32,
                        enabled=autocast is not None):
        readout = panel_readout(backbone, images, method.request.kind, method.request.layer)
    feats = readout.features.contiguous()
    result = apply_method(method, feats, grid, p, size, saliency=image_protocol == "resize")
    degrees = None
    if method.name == "lost":
        lost_feats = F.normalize(feats, dim=-1) if method.normalize == "l2" else feats
        out = lost(lost_feats[0], grid, p, size, method.params["k_patches"],
                   method.params["gram_bias"])
        degrees = out.degrees.float().reshape(grid).cpu().numpy()
    norms = patch_token_norms(readout.output, readout.num_prefix_tokens)[0]
    return ImageMaps(grid, original, result, degrees, norms.reshape(grid).cpu().numpy(),
                     readout.attention[0].reshape(-1, *grid).cpu().numpy(), readout.names)


# --- drawing ---------------------------------------------------------------------------------


def draw_box(ax, box, colour: str, width: float = 2.0, style: str = "-") -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                           linewidth=width, linestyle=style))


def draw_seed(ax, seed: tuple[int, int] | None, patch_size: int, size: float = 12) -> None:
    if seed is not None:
        ax.plot((seed[1] + 0.5) * patch_size, (seed[0] + 0.5) * patch_size, marker="*",
                color="yellow", markersize=size, markeredgecolor="black")


def overlay_mask(ax, mask: np.ndarray, patch_size: int, alpha: float = 0.4) -> None:
    """The method's patch mask as a translucent cyan layer on the patch grid."""
    rows, cols = mask.shape
    layer = np.zeros((rows, cols, 4), dtype=np.float32)
    layer[mask] = (*MASK_COLOUR, alpha)
    ax.imshow(layer, extent=(0, cols * patch_size, rows * patch_size, 0),
              interpolation="nearest")


def draw_image_with_result(ax, image: Image.Image, prediction: dict, mask: np.ndarray,
                           patch_size: int) -> None:
    """The image on its padded patch geometry with GT (green), the predicted box (red,
    dashed), the patch mask (cyan) and the seed (*)."""
    rows, cols = mask.shape
    ax.imshow(np.asarray(image), extent=(0, image.width, image.height, 0))
    overlay_mask(ax, mask, patch_size)
    for gt in prediction.get("gt_boxes") or []:
        draw_box(ax, gt, GT_COLOUR)
    draw_box(ax, prediction["box"], BOX_COLOUR, style="--")
    draw_seed(ax, prediction_seed(prediction), patch_size)
    ax.set_xlim(0, cols * patch_size)  # same geometry as the maps (padding shown blank)
    ax.set_ylim(rows * patch_size, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _map_panels(maps: ImageMaps, method_title: str) -> list[tuple]:
    """``(values, title, log colour scale, colour map)`` of the map panels after the image."""
    from matplotlib.colors import LogNorm, Normalize

    if maps.degrees is not None:
        panels = [(maps.degrees, "LOST degree (positive correlations)", None, "viridis")]
    else:
        from matplotlib.colors import ListedColormap

        panels = [(maps.result.mask.astype(np.float32), f"{method_title} patch mask (cyan)",
                   "mask", ListedColormap(["white", MASK_COLOUR]))]
    low = max(float(maps.norms.min()), 1e-6)
    panels.append((maps.norms, "token norm, last block (log)",
                   LogNorm(vmin=low, vmax=max(float(maps.norms.max()), low) * 1.0001), "magma"))
    # one colour scale for every attention panel: CLS and each register are compared by eye,
    # and a scale per panel made a register's faint attention look as strong as the CLS's
    top = max((float(np.nanmax(a)) for a in maps.attention[:len(maps.prefix_names)]),
              default=1.0)
    shared = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
    several = len(maps.prefix_names) > 1
    for i, name in enumerate(maps.prefix_names):
        panels.append((maps.attention[i], f"{name} attention to patches"
                       + (" (one scale for all)" if several else ""), shared, "inferno"))
    return panels


def render_panel(path: Path, image: Image.Image, prediction: dict, maps: ImageMaps,
                 patch_size: int, threshold: float | None, title: str, smoke: bool = False,
                 method_title: str = "LOST", footer: Sequence[str] = ()) -> None:
    """Write one image's panel PNG (see the module docstring for what it shows); ``footer``:
    the run's unfinished mark, under the smoke mark."""
    rows, cols = maps.grid
    extent = (0, cols * patch_size, rows * patch_size, 0)
    panels = _map_panels(maps, method_title)
    fig, flat = plots.panel_grid(1 + len(panels), (3.4, 3.0))
    draw_image_with_result(flat[0], image, prediction, maps.result.mask, patch_size)
    flat[0].set_title(f"image: GT (green), {method_title} box (red), mask (cyan)"
                      + (", seed (*)" if prediction_seed(prediction) is not None else ""),
                      fontsize=8)
    for ax, (values, label, scale, cmap) in zip(flat[1:], panels, strict=False):
        norm = None if scale in (None, "mask") else scale
        im = ax.imshow(values, extent=extent, cmap=cmap, norm=norm, interpolation="nearest",
                       **({"vmin": 0, "vmax": 1} if scale == "mask" else {}))
        if scale != "mask":
            plots.add_colorbar(fig, im, ax, log=type(norm).__name__ == "LogNorm")
        draw_seed(ax, prediction_seed(prediction), patch_size, size=9)
        draw_box(ax, prediction["box"], BOX_COLOUR, width=1.2, style="--")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    norm_ax = flat[2]
    mask = outlier_mask(maps.norms, threshold)
    if mask.any():
        ys, xs = np.nonzero(mask)
        norm_ax.scatter((xs + 0.5) * patch_size, (ys + 0.5) * patch_size, marker="s",
                        facecolors="none", edgecolors="cyan", s=30, linewidths=1.0,
                        label=f"norm > {threshold:.3g}")
        norm_ax.legend(loc="lower right", fontsize=6)
    plots.finish_figure(fig, title, smoke, footer=footer)
    plots.save_figure(fig, path)


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr, as ``lostreg.run`` draws it (off with ``--no-progress``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", dynamic_ncols=True,
                file=sys.stderr)


def safe_file_name(image_id: str) -> str:
    """An image id as a file name: anything but letters, digits, ``._-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:80] or "image"


def write_index(path: Path, heading: str, notes: list[str], entries: list[dict]) -> None:
    """A static page listing the panels (relative links, every text escaped); the smoke and
    unfinished marks among ``notes`` are shown as warnings."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(heading)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}figure{margin:0 0 2em 0}"
             "img{max-width:100%;border:1px solid #ccc}.warn{color:#b00}</style>",
             "</head><body>", f"<h1>{esc(heading)}</h1>"]
    parts += [f'<p class="warn">{esc(note)}</p>' if is_warning(note)
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


def run_precision(info: RunInfo) -> str:
    """The run's ``--precision`` (fp32 for folders that predate it), validated."""
    precision = str(info.config.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise LostregError(f"{info.run_dir / 'config.json'}: unknown precision {precision!r}")
    return precision


def image_caption(prediction: dict, result: MethodResult) -> str:
    """``id: hit, IoU 0.71, seed [r, c], box [...]`` plus a flag when the recomputation
    differs from the stored prediction."""
    iou = prediction.get("best_iou")
    caption = (f"{prediction['image_id']}: {'hit' if prediction['hit'] else 'miss'}"
               + (f", IoU {float(iou):.2f}" if iou is not None else "")
               + (f", seed {prediction['seed']}" if prediction.get("seed") is not None else "")
               + f", box {prediction['box']}")
    if not result.agrees_with(prediction):
        seed = list(result.seed) if result.seed is not None else None
        caption += (f" [recomputed seed {seed} box {result.box} differ from the run's: "
                    "maps may not match it]")
    return caption


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
    progress: bool = False,
) -> Path:
    """Render the panels and ``index.html`` (default ``<run>/analysis/show/``); returns the
    index path."""
    info = load_run(run_dir)
    if info.is_mask:
        raise LostregError(f"{info.run_dir}: a mask run; its panels are "
                           "mask_report.show_mask_run's")
    chosen = select_predictions(info, image_ids, max_images, misses_only)
    if not chosen:
        raise LostregError(f"{info.run_dir}: no image to show (all hits with --misses?)")
    config, method = info.config, info.method
    precision = run_precision(info)
    torch_device = resolve_device(device)
    set_numerics(precision)
    backbone = rebuild_backbone(info, torch_device, weights)
    _, by_id = run_records(info, data_root)
    used_threshold, threshold_note = _known_threshold(info, norms, threshold,
                                                      backbone.depth)
    out_dir = Path(output) if output is not None else info.analysis_dir / "show"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    bar = progress_bar(len(chosen), progress, f"show {info.run_id}")
    for number, prediction in enumerate(chosen):
        image_id = str(prediction["image_id"])
        image = load_rgb(by_id[image_id].path)
        maps = compute_image_maps(backbone, image, method, torch_device, AUTOCAST_DTYPES[precision])
        agree = maps.result.agrees_with(prediction)
        if not agree:
            bar.write(f"warning: {image_id}: recomputed {method.name} differs from the run",
                      file=sys.stderr)
        caption = image_caption(prediction, maps.result)
        if used_threshold is not None:
            caption += f", {int(outlier_mask(maps.norms, used_threshold).sum())} outlier tokens"
        file_name = f"{number:03d}-{safe_file_name(image_id)}.png"
        render_panel(out_dir / file_name, image, prediction, maps, info.patch_size,
                     used_threshold, f"{config['model']} | {caption}", info.smoke,
                     method.spec.title or method.name, unfinished_marks([info]))
        entries.append({"file": file_name, "caption": caption, "anchor": f"img{number}",
                        "image_id": image_id, "recomputed_matches_run": agree})
        bar.update(1)
    bar.close()
    notes = [f"run {info.run_id}: {config['model']} ({config.get('timm_name', '')}), dataset "
             f"{config['dataset']}, {method.describe()}, precision {precision}",
             f"outlier threshold: {'none' if used_threshold is None else f'{used_threshold:.4g}'}"
             f" ({threshold_note})"]
    notes = ([SMOKE_MARK] if info.smoke else []) + unfinished_marks([info]) + notes
    if output is None:  # our own folder: drop panels of earlier calls that are not listed
        remove_stale_panels(out_dir, {entry["file"] for entry in entries})
    index = out_dir / "index.html"
    write_index(index, f"{method.spec.title or method.name} panels: {info.run_id}", notes,
                entries)
    return index


def remove_stale_panels(out_dir: Path, written: set[str]) -> None:
    """Panels of an earlier call into the same folder that this call did not write."""
    for stale in out_dir.glob("[0-9][0-9][0-9]-*.png"):
        if stale.name not in written:
            stale.unlink(missing_ok=True)

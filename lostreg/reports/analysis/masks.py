"""Mask runs (ECSSD, DUTS-TE, DUT-OMRON) in the analyses: the stored mask, the GT it was scored
against, where tokens fall on it, and how both are drawn.

A mask run stores each image's binary prediction (``pred_mask_rle``, the ``> 0.5`` map after
any refinement) and its per-image counts against the GT (``sal_counts``, from which ``sal_iou``
is recomputed when the run is loaded: ``runs.load_run``). The analyses draw and measure that
stored mask, never a recomputed one; a recomputation only flags a difference.

The GT is read again from the dataset with the reader the run used (``mask_gt.read_gt``: PIL,
8-bit gray, its image's size) and checked to be the one the run scored: the same grey-pixel
count, and, against the stored mask, the same GT pixel count and true positives as the line's
counts (TokenCut's rule, any non-zero pixel is foreground). A dataset changed since the run is
one line, not a wrong panel.

Tokens live on the grid of the *resized* image (TokenCut's saliency protocol), the mask on the
original pixels. A token's pixels are those the run's upsampling (torch's ``nearest``,
``saliency_protocol.nearest_source_indices``) fills from it, so "a token inside the mask" means
at least half of those pixels are in the stored mask: for an unrefined run that is exactly the
method's patch mask.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lostreg.datasets.base import ImageRecord
from lostreg.errors import LostregError
from lostreg.evaluation import saliency
from lostreg.evaluation.rle import decode, rle_problem
from lostreg.evaluation.saliency_protocol import nearest_source_indices

GT_COLOUR, PRED_COLOUR, SEED_COLOUR = "#22cc44", (0.0, 0.9, 1.0), "yellow"
IOU_DEFINITION = (
    "IoU is TokenCut's per-image IoU (sal_iou: the stored binary mask, the map's > 0.5, "
    "against the GT's non-zero pixels, in float32, as its metric.py); an image whose GT and "
    "prediction are both empty has no IoU (0/0, null): it is left out of the means and "
    "counted.")
INSIDE_RULE = (
    "a token is inside the predicted mask when at least half of the pixels the run's nearest "
    "upsampling fills from it are in the stored mask (pred_mask_rle)")


def stored_mask(prediction: dict, where: str) -> np.ndarray:
    """The run's binary mask of one image (``bool`` HxW), decoded from ``pred_mask_rle`` once
    its runs are checked to cover exactly the image (pycocotools' decoder trusts its input)."""
    problem = rle_problem(prediction.get("pred_mask_rle"), int(prediction["height"]),
                          int(prediction["width"]))
    if problem:
        raise LostregError(f"{where}: image {prediction['image_id']!r}: 'pred_mask_rle': "
                           f"{problem}")
    return decode(prediction["pred_mask_rle"])


def iou_of(prediction: dict) -> float:
    """The line's ``sal_iou`` (NaN for a 0/0 image); ``runs.load_run`` has checked it against
    the line's counts."""
    value = prediction.get("sal_iou")
    return math.nan if value is None else float(value)


def iou_text(prediction: dict) -> str:
    """``IoU 0.501`` (the line's ``sal_iou``), or what a 0/0 image means."""
    value = iou_of(prediction)
    return "IoU 0/0 (empty GT and prediction)" if math.isnan(value) else f"IoU {value:.3f}"


def checked_gt(record: ImageRecord, prediction: dict, mask: np.ndarray, run: str,
               gray: np.ndarray | None = None) -> np.ndarray:
    """The GT of ``record`` (uint8 HxW, read as the run read it) after checking it is the one
    the run scored ``prediction`` against (see the module docstring). ``gray``: the GT this
    returned for another run's prediction of the same image, checked again without reading
    the file again (several runs side by side read it once per image)."""
    if record.gt_mask is None:
        raise LostregError(f"{record.path}: no ground-truth mask (not a saliency record)")
    size = [int(prediction["width"]), int(prediction["height"])]
    if [record.width, record.height] != size:
        raise LostregError(f"{record.path}: the dataset's image is {record.width}x"
                           f"{record.height}, run {run} predicted {size[0]}x{size[1]}")
    if gray is None:
        gray = record.target.gray()
    counts = saliency.ImageCounts.from_json(prediction["sal_counts"])
    tp, _, gt_pixels, _ = saliency.binary_stats(counts, "nonzero")
    foreground = gray > 0
    found = (int(foreground.sum()), int((foreground & mask).sum()),
             saliency.grey_pixel_count(gray))
    if found != (gt_pixels, tp, int(prediction["gt_grey_pixels"])):
        raise LostregError(
            f"{record.gt_mask}: not the ground truth run {run} scored image "
            f"{prediction['image_id']!r} against ({found[0]} foreground pixels, {found[1]} "
            f"under its mask, {found[2]} grey; the run counted {gt_pixels}, {tp}, "
            f"{prediction['gt_grey_pixels']}); pass --data-root with the run's data")
    return gray


def token_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(rows, cols)``: the share of each token's pixels (under the run's nearest upsampling
    from ``grid`` to the mask's size) that are in ``mask``; 0 for a token that fills none."""
    rows, cols = grid
    height, width = mask.shape
    cell = (nearest_source_indices(rows, height)[:, None] * cols
            + nearest_source_indices(cols, width)[None, :]).ravel()
    inside = np.bincount(cell, weights=mask.ravel().astype(np.float64), minlength=rows * cols)
    total = np.bincount(cell, minlength=rows * cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, inside / np.maximum(total, 1), 0.0)
    return share.reshape(rows, cols)


def tokens_inside(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(rows, cols)`` bool: the tokens inside the mask (``INSIDE_RULE``)."""
    return token_coverage(mask, grid) >= 0.5


def grid_point(row: float, col: float, grid: tuple[int, int],
               size: tuple[int, int]) -> tuple[float, float]:
    """``(x, y)`` in original pixels of the centre of token ``(row, col)`` of ``grid`` on an
    image of ``size = (H, W)`` (the token grid stretched over the whole image)."""
    return (col + 0.5) * size[1] / grid[1], (row + 0.5) * size[0] / grid[0]


# --- drawing ---------------------------------------------------------------------------------


def draw_masks(ax: Any, picture: np.ndarray, gt: np.ndarray | None, mask: np.ndarray,
               seed_xy: tuple[float, float] | None) -> None:
    """The image with the predicted mask (cyan, translucent, with its outline), the GT's
    outline (green, any non-zero pixel) and the seed (*), on the original pixels."""
    height, width = mask.shape
    ax.imshow(picture, extent=(0, width, height, 0))
    layer = np.zeros((height, width, 4), dtype=np.float32)
    layer[mask] = (*PRED_COLOUR, 0.45)
    ax.imshow(layer, extent=(0, width, height, 0), interpolation="nearest")
    for values, colour in ((mask, PRED_COLOUR), (None if gt is None else gt > 0, GT_COLOUR)):
        if values is not None and values.any() and not values.all():
            ax.contour(np.arange(width) + 0.5, np.arange(height) + 0.5,
                       values.astype(np.float32), levels=[0.5], colors=[colour],
                       linewidths=1.4)
    if seed_xy is not None:
        ax.plot(*seed_xy, marker="*", color=SEED_COLOUR, markersize=12, markeredgecolor="black")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


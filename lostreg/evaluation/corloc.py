"""CorLoc: the share of images where the predicted box has IoU >= 0.5 with some GT box.

IoU uses continuous coordinates with no ``+1`` (areas are ``(x2-x1)*(y2-y1)``), computed in
float64 so an IoU of exactly 0.5 counts as a hit. LOST's reference adds ``1e-7`` to box
heights and the union in float32; that only moves an IoU at the 0.5 boundary for boxes a few
pixels tall, and we keep the exact form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

HIT_IOU = 0.5


def box_iou(box: Sequence[float], gt_boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of one ``[x1, y1, x2, y2]`` box against each GT box ``(G, 4)``; returns ``(G,)``."""
    gts = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (float(v) for v in box)
    inter_w = np.clip(np.minimum(x2, gts[:, 2]) - np.maximum(x1, gts[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(y2, gts[:, 3]) - np.maximum(y1, gts[:, 1]), 0, None)
    inter = inter_w * inter_h
    area = (x2 - x1) * (y2 - y1)
    gt_areas = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    union = area + gt_areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_iou(box: Sequence[float], gt_boxes: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Highest IoU with any GT box (0.0 for an image without GT boxes: never a hit)."""
    ious = box_iou(box, gt_boxes)
    return float(ious.max()) if ious.size else 0.0


def is_hit(iou: float, threshold: float = HIT_IOU) -> bool:
    return iou >= threshold


def corloc(hits: Iterable[bool]) -> tuple[float, int, int]:
    """Return ``(CorLoc in percent, n_hits, n_images)``; every image evaluated counts."""
    values = [bool(h) for h in hits]
    n_hits, n_images = sum(values), len(values)
    return (100.0 * n_hits / n_images if n_images else float("nan")), n_hits, n_images

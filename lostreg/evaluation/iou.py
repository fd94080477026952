"""Box IoU: the one implementation every stage uses (writing a run, reading it back, reports).

Boxes are ``[x1, y1, x2, y2]`` in continuous pixel coordinates with no ``+1`` (areas are
``(x2-x1)*(y2-y1)``), computed in float64 so an IoU of exactly 0.5 counts as a hit. LOST's
reference adds ``1e-7`` to box heights and the union in float32; that only moves an IoU at the
0.5 boundary for boxes a few pixels tall, and we keep the exact form. A pair whose union is 0
(two zero-area boxes) has IoU 0.

Every entry point goes through ``pair_ious`` (aligned pairs, one numpy expression), so the
per-image answer and the batched answer over a whole run are the same bits. pycocotools'
``mask.iou`` computes the same quantity for integer boxes and is the independent check in
``tests/test_evaluation.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BoxLike = Sequence[float] | np.ndarray


def pair_ious(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """IoU of each row of ``boxes`` ``(K, 4)`` with the same row of ``gt_boxes`` ``(K, 4)``."""
    inter_w = np.clip(np.minimum(boxes[:, 2], gt_boxes[:, 2])
                      - np.maximum(boxes[:, 0], gt_boxes[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(boxes[:, 3], gt_boxes[:, 3])
                      - np.maximum(boxes[:, 1], gt_boxes[:, 1]), 0, None)
    inter = inter_w * inter_h
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    union = area + gt_areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def as_boxes(boxes: BoxLike | Sequence[BoxLike]) -> np.ndarray:
    """Boxes as a float64 ``(N, 4)`` array (an empty list gives ``(0, 4)``)."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_iou(box: BoxLike, gt_boxes: BoxLike | Sequence[BoxLike]) -> np.ndarray:
    """IoU of one ``[x1, y1, x2, y2]`` box against each GT box ``(G, 4)``; returns ``(G,)``."""
    gts = as_boxes(gt_boxes)
    return pair_ious(np.repeat(as_boxes(box), len(gts), axis=0), gts)


def best_iou(box: BoxLike, gt_boxes: BoxLike | Sequence[BoxLike]) -> float:
    """Highest IoU with any GT box (0.0 for an image without GT boxes: never a hit)."""
    ious = box_iou(box, gt_boxes)
    return float(ious.max()) if ious.size else 0.0


def best_ious(boxes: np.ndarray, gt_boxes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Best IoU of each image's box ``(N, 4)`` with its ground truth, for a whole run at once:
    ``gt_boxes`` ``(M, 4)`` holds every image's GT boxes in turn, ``counts`` ``(N,)`` how many
    each has. Equal, to the bit, to ``best_iou`` image by image (0.0 without GT)."""
    owner = np.repeat(np.arange(len(boxes)), counts)
    ious = pair_ious(as_boxes(boxes)[owner], as_boxes(gt_boxes))
    best = np.zeros(len(boxes), dtype=np.float64)
    np.maximum.at(best, owner, ious)
    return best

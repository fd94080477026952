"""CorLoc: the share of images where the predicted box has IoU >= 0.5 with some GT box.

Every image evaluated counts (an image without GT boxes is a miss). IoU is
``lostreg.evaluation.iou``'s (float64, no ``+1``), so an IoU of exactly 0.5 is a hit. Per
image, a predictions line holds ``best_iou`` (rounded to 6 decimals, for reading) and ``hit``
(from the unrounded IoU); both are recomputed from ``box`` and ``gt_boxes`` whenever a line is
read back. Two runs are compared image by image on ``hit`` with the exact McNemar test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lostreg.evaluation.iou import best_iou, best_ious
from lostreg.evaluation.registry import MetricSpec, register_metric
from lostreg.evaluation.targets import BoxesTarget, LineField
from lostreg.fields import is_number

HIT_IOU = 0.5


def is_hit(iou: float, threshold: float = HIT_IOU) -> bool:
    return iou >= threshold


def corloc(hits: Iterable[bool]) -> tuple[float, int, int]:
    """Return ``(CorLoc in percent, n_hits, n_images)``; every image evaluated counts."""
    values = [bool(h) for h in hits]
    n_hits, n_images = sum(values), len(values)
    return (100.0 * n_hits / n_images if n_images else float("nan")), n_hits, n_images


# the scores of an image without a box (``box: null``: its features were not finite, see
# ``lostreg.runs.predictions.NONFINITE``): a miss, so every image still counts
NO_BOX = {"best_iou": 0.0, "hit": False}


def score_box(line: Mapping[str, Any], target: BoxesTarget) -> dict[str, Any]:
    """One image's scores: its box's best IoU with the ground truth, and whether it is a hit."""
    if line["box"] is None:
        return dict(NO_BOX)
    iou = best_iou(line["box"], target.array())
    return {"best_iou": round(iou, 6), "hit": is_hit(iou)}


def score_boxes(lines: Sequence[Mapping[str, Any]], targets: Sequence[BoxesTarget]
                ) -> list[dict[str, Any]]:
    """``score_box`` for a whole run in one numpy pass (the same bits, see ``best_ious``)."""
    counts = np.array([len(t.boxes) for t in targets], dtype=np.int64)
    gts = np.concatenate([t.array() for t in targets]) if targets else np.zeros((0, 4))
    boxes = [line["box"] or [0, 0, 0, 0] for line in lines]  # no box: scored as NO_BOX below
    ious = best_ious(np.array(boxes, dtype=np.float64).reshape(-1, 4), gts, counts)
    return [dict(NO_BOX) if line["box"] is None
            else {"best_iou": round(float(iou), 6), "hit": is_hit(float(iou))}
            for line, iou in zip(lines, ious, strict=True)]


class CorLocAggregate:
    """Counts hits over a run's images: ``corloc`` (percent, 4 decimals), ``n_hits``,
    ``n_images``; ``corloc`` is NaN for a run without images."""

    def __init__(self) -> None:
        self.n_hits = 0
        self.n_images = 0

    def update(self, scores: Mapping[str, Any]) -> None:
        self.n_images += 1
        self.n_hits += bool(scores["hit"])

    def result(self) -> dict[str, Any]:
        percent = 100.0 * self.n_hits / self.n_images if self.n_images else math.nan
        return {"corloc": round(percent, 4), "n_images": self.n_images, "n_hits": self.n_hits}


def describe(result: Mapping[str, Any]) -> str:
    """``CorLoc 61.90 (3102/5011)``, from the counts (not the rounded percentage)."""
    hits, images = result["n_hits"], result["n_images"]
    percent = 100.0 * hits / images if images else math.nan
    return f"CorLoc {percent:.2f} ({hits}/{images})"


CORLOC = register_metric(MetricSpec(
    name="corloc",
    title="CorLoc",
    target=BoxesTarget.kind,
    reads=("box",),
    fields={"best_iou": LineField(is_number, "a number"),
            "hit": LineField(lambda v: isinstance(v, bool), "true or false")},
    score=score_box,
    score_many=score_boxes,
    aggregate=CorLocAggregate,
    per_image="hit",
    paired_test="mcnemar",
    headline="corloc",
    describe=describe,
    definition="CorLoc (Deselaers et al. 2010; LOST's object-discovery protocol): a hit is "
               "IoU >= 0.5 with any ground-truth box, in float64 without LOST's 1e-7",
))

"""COCO segmentations as binary masks, for datasets scored on masks rather than boxes.

A COCO annotation's ``segmentation`` is either polygons (``[[x1, y1, x2, y2, ...], ...]``, in
pixel coordinates) or a run-length encoding (RLE) ``{"size": [height, width], "counts": ...}``
whose counts are a list of integers (uncompressed, used for crowds) or pycocotools' compressed
string. All three are decoded by ``pycocotools.mask`` (``frPyObjects``, ``merge``,
``decode``), the reference implementation, so a mask equals the one COCO's own tools compute.

Nothing is passed to pycocotools unchecked: its C code trusts its input (an RLE whose counts
sum to less than ``height * width`` decodes to uninitialised memory; a polygon of 4 numbers is
read as a box), so every form is validated first and a bad one is a ``LostregError`` naming
``where`` and what is wrong. Polygons with fewer than 3 points enclose no area and are
dropped, as detectron2 drops them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from lostreg.errors import LostregError
from lostreg.evaluation.rle import string_counts as _string_counts


def segmentation_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """The ``(height, width)`` bool mask of one COCO ``segmentation`` (polygons, uncompressed
    or compressed RLE); ``where`` names the annotation in errors."""
    from pycocotools import mask as mask_utils

    if type(height) is not int or type(width) is not int or height <= 0 or width <= 0:
        raise LostregError(f"{where}: image size {width}x{height} is not two positive integers")
    if isinstance(segmentation, list):
        polygons = _polygons(segmentation, height, width, where)
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        rle = _rle(segmentation, height, width, where)
    else:
        raise LostregError(f"{where}: segmentation must be a list of polygons or an RLE "
                           f"object, got {type(segmentation).__name__}")
    try:
        with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy=
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    except ValueError as exc:  # pycocotools' own check of an RLE's total
        raise LostregError(f"{where}: segmentation RLE cannot be decoded ({exc})") from None


def _polygons(segmentation: list[Any], height: int, width: int,
              where: str) -> list[list[float]]:
    """The polygons with at least 3 points, each checked: an even number of finite numbers
    within one image size of the image (pycocotools rasterises in C ``int``s)."""
    kept = []
    reach = max(height, width)
    for number, polygon in enumerate(segmentation):
        if (type(polygon) is not list or len(polygon) % 2
                or not all(type(v) in (int, float) for v in polygon)):
            raise LostregError(f"{where}: polygon {number} is not an even-length list of numbers")
        if not all(math.isfinite(v) and -reach <= v <= 2 * reach for v in polygon):
            raise LostregError(f"{where}: polygon {number} has a coordinate that is not finite "
                               f"or lies more than an image size outside the {width}x{height} "
                               "image")
        if len(polygon) >= 6:
            kept.append([float(v) for v in polygon])
    return kept


def _rle(segmentation: dict[str, Any], height: int, width: int, where: str) -> dict[str, Any]:
    """A compressed RLE of ``segmentation`` after checking its size is the image's and its
    counts (decoded from the string form here) cover exactly ``height * width`` pixels."""
    from pycocotools import mask as mask_utils

    size, counts = segmentation.get("size"), segmentation.get("counts")
    if size != [height, width] or type(size[0]) is not int or type(size[1]) is not int:
        raise LostregError(f"{where}: RLE size {size!r} is not the image's [{height}, {width}]")
    if isinstance(counts, list):
        if not all(type(c) is int and c >= 0 for c in counts):
            raise LostregError(f"{where}: RLE counts must be non-negative integers")
        _check_total(sum(counts), height, width, where)
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    if isinstance(counts, str):
        _check_total(sum(_string_counts(counts, where)), height, width, where)
        return {"size": [height, width], "counts": counts.encode("ascii")}
    raise LostregError(f"{where}: RLE counts must be a list of integers or a compressed string")


def _check_total(total: int, height: int, width: int, where: str) -> None:
    if total != height * width:
        raise LostregError(f"{where}: RLE counts cover {total} pixels, the {width}x{height} "
                           f"image has {height * width}")

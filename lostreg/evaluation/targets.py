"""Ground-truth targets: what a dataset annotates for an image, as a typed object.

A dataset registers the kind of target its records carry (``boxes``, or a saliency ``mask``) and
the metrics that score it; a metric declares the target kind it needs. A target also says how
a predictions line holds it: the line of an image carries its ground truth, so every score in a
run folder can be recomputed from the folder alone (``lostreg.runs.predictions``,
``lostreg.runs.store``), without the dataset.

Adding a target kind is one class here with ``kind``, ``line_fields``, ``LINE_SCHEMA``,
``from_line`` and ``same_as_line``, plus its entry in ``TARGET_KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from lostreg.fields import is_int, is_number

Box = tuple[float, float, float, float]


class LineField(NamedTuple):
    """One key of a predictions line: how its JSON value is checked, and the words a message
    uses for what was expected."""

    check: Callable[[Any], bool]
    expected: str
    required: bool = True


def _gt_boxes(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(b, list) and len(b) == 4 and all(map(is_number, b)) for b in value)


@dataclass(frozen=True)
class BoxesTarget:
    """Every annotated object's box, ``[x1, y1, x2, y2]`` floats in continuous 0-based pixel
    coordinates (see ``lostreg.datasets.base``); an image may have none."""

    kind: ClassVar[str] = "boxes"
    LINE_SCHEMA: ClassVar[dict[str, LineField]] = {
        "gt_boxes": LineField(_gt_boxes, "a list of [x1, y1, x2, y2] number lists"),
    }

    boxes: tuple[Box, ...]

    def array(self) -> np.ndarray:
        return np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)

    def line_fields(self) -> dict[str, Any]:
        """What a predictions line holds of it (``gt_boxes``)."""
        return {"gt_boxes": [list(b) for b in self.boxes]}

    @classmethod
    def from_line(cls, line: Mapping[str, Any]) -> BoxesTarget:
        """The target a (schema-checked) predictions line holds."""
        return cls(tuple(tuple(float(v) for v in b) for b in line["gt_boxes"]))

    def same_as_line(self, line: Mapping[str, Any]) -> bool:
        """Whether a line was written with this ground truth (as floats: ``1`` equals
        ``1.0``, as JSON written by another Python may have it)."""
        return [[float(v) for v in b] for b in line["gt_boxes"]] == \
            [[float(v) for v in b] for b in self.boxes]


def _gt_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_int(v) and v > 0 for v in value)


@dataclass(frozen=True)
class MaskTarget:
    """One salient-object mask: the 8-bit gray GT file of an image (saliency datasets).

    A predictions line does not hold the mask itself: the metric's per-image counts
    (``lostreg.evaluation.saliency.ImageCounts``) hold what every definition needs, so a run's
    figures are recomputed from its folder alone. The line holds what identifies the GT it was
    scored against: ``gt_size`` ``[width, height]`` and ``gt_grey_pixels``, the pixels that
    are neither 0 nor 255 (where the published definitions' foreground rules disagree).

    ``path`` is the GT file (a dataset record's target; ``None`` for a target rebuilt from a
    line); ``grey`` is known when built from a line, read from the file otherwise.
    """

    kind: ClassVar[str] = "mask"
    LINE_SCHEMA: ClassVar[dict[str, LineField]] = {
        "gt_size": LineField(_gt_size, "[width, height], two positive integers"),
        "gt_grey_pixels": LineField(lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    }

    size: tuple[int, int]  # (width, height)
    path: Path | None = None
    grey: int | None = None

    def grey_pixels(self) -> int:
        """The GT's grey-pixel count (read from ``path`` once per process when not given)."""
        if self.grey is not None:
            return self.grey
        if self.path is None:
            raise ValueError("MaskTarget: neither a grey count nor a GT file")
        from lostreg.evaluation.mask_gt import grey_pixels

        return grey_pixels(self.path, self.size)

    def gray(self):
        """The GT as an 8-bit gray array (``lostreg.evaluation.mask_gt.read_gt``)."""
        if self.path is None:
            raise ValueError("MaskTarget: no GT file (a target rebuilt from a line)")
        from lostreg.evaluation.mask_gt import read_gt

        return read_gt(self.path, self.size)

    def line_fields(self) -> dict[str, Any]:
        """What a predictions line holds of it (``gt_size``, ``gt_grey_pixels``)."""
        return {"gt_size": list(self.size), "gt_grey_pixels": self.grey_pixels()}

    @classmethod
    def from_line(cls, line: Mapping[str, Any]) -> MaskTarget:
        """The target a (schema-checked) predictions line holds."""
        width, height = line["gt_size"]
        return cls((int(width), int(height)), None, int(line["gt_grey_pixels"]))

    def same_as_line(self, line: Mapping[str, Any]) -> bool:
        """Whether a line was scored against this GT (its size and grey-pixel count)."""
        return (list(line["gt_size"]) == list(self.size)
                and line["gt_grey_pixels"] == self.grey_pixels())


TARGET_KINDS: dict[str, type[BoxesTarget] | type[MaskTarget]] = {
    BoxesTarget.kind: BoxesTarget, MaskTarget.kind: MaskTarget}

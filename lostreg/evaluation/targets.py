"""Ground-truth targets: what a dataset annotates for an image, as a typed object.

A dataset registers the kind of target its records carry (``boxes`` today, a mask next) and
the metrics that score it; a metric declares the target kind it needs. A target also says how
a predictions line holds it: the line of an image carries its ground truth, so every score in a
run folder can be recomputed from the folder alone (``lostreg.runs.predictions``,
``lostreg.runs.store``), without the dataset.

Adding a target kind is one class here with ``kind``, ``line_fields``, ``LINE_SCHEMA`` and
``from_line``, plus its entry in ``TARGET_KINDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from lostreg.fields import is_number

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


TARGET_KINDS: dict[str, type[BoxesTarget]] = {BoxesTarget.kind: BoxesTarget}

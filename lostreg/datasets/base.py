"""The one data model every stage speaks (like the COCO API's: ids plus boxes in one format).

Boxes are always ``[x1, y1, x2, y2]`` floats in continuous 0-based pixel coordinates: a box
covering pixel columns ``0..w-1`` is ``[0, ., w, .]``. Adapters convert their native format
once (VOC: ``[xmin-1, ymin-1, xmax, ymax]``; COCO: ``[x, y, x+w, y+h]`` rounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lostreg.errors import LostregError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageRecord:
    """One evaluation image: where it is, its size, and its ground-truth boxes."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: tuple[Box, ...]
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def boxes_array(self) -> np.ndarray:
        return np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)


@dataclass(frozen=True)
class DatasetIndex:
    """An ordered list of records plus what identifies it (name, split, filters)."""

    name: str
    split: str
    records: tuple[ImageRecord, ...]
    root: Path
    no_hard: bool = False

    def __len__(self) -> int:
        return len(self.records)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB (grayscale, CMYK, palette and alpha images are converted).

    Raises ``LostregError`` naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise LostregError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            # PIL's plain convert, as LOST does: alpha is dropped, not composited.
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LostregError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None

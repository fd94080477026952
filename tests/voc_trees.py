"""A tiny VOC2007 tree written by tests: one red box per image on a dark noisy background, so
even a random model's LOST has something to find, and every expected value is known."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# (image id, width, height, object box in VOC's 1-based inclusive pixels)
VocImage = tuple[str, int, int, tuple[int, int, int, int]]


def write_voc2007(root: Path, images: Sequence[VocImage]) -> None:
    """``root/VOC2007`` with JPEGs, one-object XML annotations and ``trainval.txt``."""
    folder = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, width, height, (x1, y1, x2, y2) in images:
        pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
        pixels[y1 - 1:y2, x1 - 1:x2] = (230, 40, 40)
        Image.fromarray(pixels).save(folder / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (folder / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><object><name>thing</name>"
            f"<truncated>0</truncated><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            "</annotation>")
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text(
        "".join(f"{image_id}\n" for image_id, *_ in images))

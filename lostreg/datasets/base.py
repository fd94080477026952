"""The one data model every stage speaks (like the COCO API's: ids plus boxes in one format).

Boxes are always ``[x1, y1, x2, y2]`` floats in continuous 0-based pixel coordinates: a box
covering pixel columns ``0..w-1`` is ``[0, ., w, .]``. Adapters convert their native format
once (VOC: ``[xmin-1, ymin-1, xmax, ymax]``; COCO: ``[x, y, x+w, y+h]`` rounded).

Adapters validate every box where they parse it (``checked_box``), with one rule for all
datasets: a non-finite or inverted box (``x2 < x1`` or ``y2 < y1``) is an error naming the
file and the object; a zero-area box is kept, as LOST keeps it, and counted; a box reaching
more than ``OUTSIDE_TOLERANCE`` pixels outside its image is clipped to the image and counted.
What was tolerated is recorded on each record (``extra["clipped"]``, ``extra["zero_area"]``:
the objects, named) so a run can count it for exactly the images it evaluates
(``DataChecks``), report the counts in ``metrics.json`` and warn once with the first file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lostreg.errors import LostregError
from lostreg.evaluation.targets import BoxesTarget, MaskTarget

Box = tuple[float, float, float, float]

# VOC's 1-based inclusive boxes read with LOST's ``xmin - 1`` give -1 for an (off-by-one)
# ``xmin = 0`` and W+1 for ``xmax = W+1``, and COCO's rounded boxes can overshoot by a pixel:
# LOST keeps such boxes as they are, so a pixel of slack is tolerated silently.
OUTSIDE_TOLERANCE = 1.0

#: Every check a run reports, in ``metrics.json`` order (all present, zero when clean).
CHECK_NAMES = ("boxes_clipped", "zero_area_boxes", "image_size_mismatch")
#: What a run on a saliency dataset reports besides (present in its ``metrics.json`` only).
MASK_CHECK_NAMES = ("grey_gt_masks",)
_CHECK_TEXT = {
    "grey_gt_masks": "ground-truth mask(s) hold grey values (neither 0 nor 255): TokenCut's "
                     "rule (the default) counts them as foreground, MOVE's only from 128, "
                     "FOUND's only at 255",
    "boxes_clipped": "ground-truth box(es) reached more than a pixel outside their image and "
                     "were clipped to it",
    "zero_area_boxes": "ground-truth box(es) have zero area (kept, as LOST keeps them; no "
                       "prediction can match them)",
    "image_size_mismatch": "image(s) decode to another size than their annotation says (the "
                           "decoded size is used, the GT boxes are as annotated)",
}


@dataclass(frozen=True)
class ImageRecord:
    """One evaluation image: where it is, its size, and its ground-truth boxes.

    ``extra`` holds adapter details: ``file`` (path relative to the dataset folder),
    ``classes``, ``annotation`` (the file the boxes came from), and, only when non-empty,
    ``clipped`` / ``zero_area`` (the objects the checks tolerated, e.g. ``"object 2 (dog)"``).
    ``gt_mask``: the image's salient-object mask file (saliency datasets, whose records carry
    a ``MaskTarget`` and no boxes), None otherwise.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: tuple[Box, ...]
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    gt_mask: Path | None = None

    def boxes_array(self) -> np.ndarray:
        return np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)

    @property
    def target(self) -> BoxesTarget | MaskTarget:
        """The image's ground truth as the evaluation layer scores it: its boxes, or its
        mask file for a saliency record."""
        if self.gt_mask is not None:
            return MaskTarget((self.width, self.height), self.gt_mask)
        return BoxesTarget(self.boxes)

    def source(self) -> str:
        """The annotation file to name in a message (the image when there is none)."""
        return str(self.extra.get("annotation") or self.path)


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

    @property
    def checks(self) -> dict[str, int]:
        """Parse-time check counts over every record: ``boxes_clipped``, ``zero_area_boxes``."""
        counts = DataChecks.of_records(self.records).counts
        return {name: counts[name] for name in ("boxes_clipped", "zero_area_boxes")}

    @property
    def check_examples(self) -> dict[str, str]:
        """For each non-zero check, the first case in dataset order (file and object)."""
        return dict(DataChecks.of_records(self.records).first)


@dataclass
class DataChecks:
    """What one run's data needed tolerating: counts per check (``CHECK_NAMES``) and the first
    case of each, named by file and object, for ``metrics.json`` and a warning per check.

    Parse-time counts come from the records (``of_records``); the image size can only be
    compared at decode time, so the run calls ``check_decoded_size`` once per decoded image.
    """

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECK_NAMES, 0))
    first: dict[str, str] = field(default_factory=dict)
    masks: bool = False  # a saliency run: the mask checks are reported too

    @classmethod
    def of_records(cls, records: Iterable[ImageRecord]) -> DataChecks:
        checks = cls()
        for record in records:
            for name, key in (("boxes_clipped", "clipped"), ("zero_area_boxes", "zero_area")):
                objects = record.extra.get(key) or ()
                if objects:
                    checks.add(name, f"{record.source()}: {objects[0]}", len(objects))
        return checks

    @classmethod
    def of_run(cls, records: Sequence[ImageRecord], lines: Iterable[dict]) -> DataChecks:
        """The checks of a finished run: parse-time ones of ``records`` (the images it
        evaluates) plus the size check of each prediction line, whose ``width``/``height`` are
        the decoded image's. Derived from what the run wrote, so a resumed or distributed run
        counts every image exactly once. Lines of other images, or without integer sizes, are
        left to the predictions' own validation."""
        checks = cls.of_records(records)
        by_id = {record.image_id: record for record in records}
        checks.masks = any(record.gt_mask is not None for record in records)
        for line in lines:
            record = by_id.get(line.get("image_id"))
            width, height = line.get("width"), line.get("height")
            if record is not None and type(width) is int and type(height) is int:
                checks.check_decoded_size(record, height, width)
            grey = line.get("gt_grey_pixels")
            if record is not None and record.gt_mask is not None and type(grey) is int and grey:
                checks.add("grey_gt_masks", f"{record.gt_mask}: {grey} grey pixels")
        return checks

    def add(self, name: str, where: str, count: int = 1) -> None:
        """Count ``count`` cases of check ``name``; ``where`` names the first one seen."""
        if name not in CHECK_NAMES + MASK_CHECK_NAMES:
            raise ValueError(f"unknown data check {name!r}; known: "
                             f"{', '.join(CHECK_NAMES + MASK_CHECK_NAMES)}")
        self.counts[name] = self.counts.get(name, 0) + count
        self.first.setdefault(name, where)

    def check_decoded_size(self, record: ImageRecord, height: int, width: int) -> bool:
        """Compare a record's annotated size with its decoded ``(height, width)``; count and
        return True when they differ."""
        if (int(height), int(width)) == (record.height, record.width):
            return False
        self.add("image_size_mismatch",
                 f"{record.source()}: annotated {record.width}x{record.height}, "
                 f"image {record.path} is {int(width)}x{int(height)}")
        return True

    def warnings(self, dataset: str) -> list[str]:
        """One ``warning: ...`` line per non-zero check, naming the first case."""
        return [f"warning: {dataset}: {self.counts[name]} {_CHECK_TEXT[name]}; first: "
                f"{self.first[name]}" for name in self._names() if self.counts.get(name)]

    def _names(self) -> tuple[str, ...]:
        return CHECK_NAMES + MASK_CHECK_NAMES if self.masks else CHECK_NAMES

    def to_json(self) -> dict:
        """``{"boxes_clipped": n, "zero_area_boxes": n, "image_size_mismatch": n,
        "first": {check: where}}`` for ``metrics.json``."""
        return {**{name: self.counts.get(name, 0) for name in self._names()},
                "first": dict(self.first)}


def checked_box(box: Sequence[float], width: int, height: int, where: str,
                native: str) -> tuple[Box, bool]:
    """Validate one ground-truth box against its image size; return it (clipped if needed) and
    whether it was clipped.

    ``where`` names the file and object, ``native`` the box as the file writes it, so the error
    quotes what the user can find. Non-finite or inverted: ``LostregError``. More than
    ``OUTSIDE_TOLERANCE`` px outside ``[0, width] x [0, height]``: every coordinate clamped.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise LostregError(f"{where}: {native} is not finite")
    if x2 < x1 or y2 < y1:
        raise LostregError(f"{where}: {native} is inverted (it ends before it starts)")
    tolerance = OUTSIDE_TOLERANCE
    if x1 >= -tolerance and y1 >= -tolerance and x2 <= width + tolerance and y2 <= height + tolerance:
        return (x1, y1, x2, y2), False
    return (_clamp(x1, width), _clamp(y1, height), _clamp(x2, width), _clamp(y2, height)), True


def _clamp(value: float, upper: int) -> float:
    return min(max(value, 0.0), float(upper))


def valid_box(box: object, width: int, height: int) -> Box:
    """A box read back from a stored index, re-checked to be one ``checked_box`` can return
    (four finite numbers, not inverted, within the tolerance of the image); raises
    ``TypeError``/``ValueError`` otherwise. Runs once per stored box at every start: plain
    comparisons, no generators."""
    if type(box) is not list or len(box) != 4:
        raise TypeError(f"bad box {box!r}")
    x1, y1, x2, y2 = box
    if not (type(x1) in _NUMBERS and type(y1) in _NUMBERS and type(x2) in _NUMBERS
            and type(y2) in _NUMBERS):
        raise TypeError(f"bad box {box!r}")
    tolerance = OUTSIDE_TOLERANCE
    # NaN fails every comparison and infinities fail the range checks, so no isfinite needed.
    if not (-tolerance <= x1 <= x2 <= width + tolerance
            and -tolerance <= y1 <= y2 <= height + tolerance):
        raise ValueError(f"bad box {box!r} for a {width}x{height} image")
    return (float(x1), float(y1), float(x2), float(y2))


_NUMBERS = (int, float)


def is_zero_area(box: Box) -> bool:
    return box[2] == box[0] or box[3] == box[1]


#: ``--max-pixels``' default: no benchmark protocol runs an unresized forward of a 12-megapixel
#: photo (VOC and COCO images are at most 0.4 MP), so larger images are refused before any
#: forward (``RunConfig.max_pixels`` is the same number; tests/test_config.py checks it).
DEFAULT_MAX_PIXELS = 4_000_000
#: No image file needs more bytes per pixel than an uncompressed 4-channel float32 TIFF (16);
#: compressed formats need far fewer.
MAX_BYTES_PER_PIXEL = 16
#: Room for what a file carries besides its pixels: EXIF, ICC profile, XMP, thumbnails.
IMAGE_METADATA_BYTES = 64 << 20
#: 16-bit samples, read by keeping their high byte (what PIL does for 16-bit colour PNGs).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def max_image_file_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The largest file an image of at most ``max_pixels`` pixels can be: anything larger is
    not such an image, and is refused before it is read (hashed, decoded). 4,000,000 pixels
    (the default) allow 128 MiB."""
    return max_pixels * MAX_BYTES_PER_PIXEL + IMAGE_METADATA_BYTES


def image_file_too_large(path: Path, max_pixels: int) -> str | None:
    """Why the file at ``path`` cannot be an image of at most ``max_pixels`` pixels (its byte
    size alone, from one ``stat``), or None."""
    try:
        size = path.stat().st_size
    except OSError:
        return None  # the reader reports a file it cannot open
    limit = max_image_file_bytes(max_pixels)
    if size <= limit:
        return None
    return (f"the file is {size:,} bytes, more than any image of --max-pixels {max_pixels} "
            f"pixels can be ({limit:,} bytes: {MAX_BYTES_PER_PIXEL} per pixel plus "
            f"{IMAGE_METADATA_BYTES >> 20} MiB of metadata)")


def load_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB (grayscale, CMYK, palette and alpha images are converted).

    Raises ``LostregError`` naming the file when it is missing or cannot be decoded, when it
    is a decompression bomb (PIL's limit), or, with ``max_pixels``, when the file is larger
    than such an image can be or its header declares more pixels (both before decoding).
    16-bit samples (modes ``I;16*``, e.g. a 16-bit grayscale PNG) keep their high byte, as PIL
    does for 16-bit colour; 32-bit integer (``I``) and float (``F``) images have no defined
    8-bit range and are refused (PIL's ``convert`` would clip them, most to white).
    """
    path = Path(path)
    if not path.is_file():
        raise LostregError(f"{path}: image file not found")
    problem = image_file_too_large(path, max_pixels) if max_pixels is not None else None
    if problem:
        raise LostregError(f"{path}: {problem}")
    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise LostregError(
                    f"{path}: {image.width}x{image.height} = {image.width * image.height:,} "
                    f"pixels is above --max-pixels {max_pixels} (images are not resized)")
            image.load()
            return _to_rgb(image, path)
    except Image.DecompressionBombError as exc:
        raise LostregError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise LostregError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """A loaded image as 8-bit RGB. PIL's plain convert, as LOST does (alpha is dropped, not
    composited), except for the wide modes where that convert clips instead of scaling."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PPM"):
        # PIL reads 16-bit PGM as "I" scaled to 0..65535 (any maxval above 255)
        samples = np.asarray(image).astype(np.int64)
        return Image.fromarray(np.clip(samples >> 8, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise LostregError(f"{path}: {kind} samples (PIL mode {image.mode}) have no defined "
                           "8-bit range; convert the image to 8 or 16 bits per sample")
    return image.convert("RGB")

"""The ``demo`` dataset: 24 small generated scenes, so the whole pipeline runs offline in seconds.

Scenes are deterministic (a fixed-seed ``numpy`` Generator) and written in VOC format under
``ROOT/demo`` so the VOC adapter reads them back: that also exercises the adapter. They cover
the cases a real run meets: varied sizes (60-200 px), a few identical sizes (batching groups
them), one image narrower than a 16 px patch, a grayscale JPEG, a palette PNG and an RGBA PNG
(found through the XML's ``<filename>``), and objects touching the border (``truncated``).

Boxes are the exact pixel extent of each drawn shape, written in VOC's 1-based inclusive
convention, so the adapter's ``xmin - 1`` gives back the 0-based extent exactly.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lostreg.datasets.base import Box, DatasetIndex
from lostreg.datasets.voc import load_voc_folder, voc_annotation_xml
from lostreg.errors import LostregError

DEMO_VERSION = 1
DEMO_SEED = 20211101
DEMO_FOLDER = "demo"
_MARKER = ".lostreg-demo"
_N_SCENES = 24

# Distinct saturated colours, far from the muted backgrounds.
_COLOURS = (
    ("red", (220, 30, 30)),
    ("green", (30, 190, 40)),
    ("blue", (30, 60, 220)),
    ("yellow", (235, 215, 20)),
    ("magenta", (210, 30, 200)),
    ("cyan", (20, 200, 210)),
    ("orange", (245, 130, 10)),
    ("purple", (120, 30, 170)),
)
# (width, height): shared sizes first, then the narrow one; the rest are drawn at random.
_FIXED_SIZES = [(128, 96)] * 4 + [(96, 96)] * 3 + [(14, 72)] + [(160, 120)] * 2
_ODD_MODES = {5: "L", 11: "P", 17: "RGBA"}


@dataclass(frozen=True)
class DemoScene:
    """One generated image and its ground truth (boxes 0-based ``[x1, y1, x2, y2]``)."""

    image_id: str
    file_name: str
    image: Image.Image
    boxes: tuple[Box, ...]
    classes: tuple[str, ...]
    truncated: tuple[bool, ...]


def demo_folder(root: str | Path) -> Path:
    """``ROOT/demo``: the demo lives beside the real datasets under the same data root."""
    return Path(root).expanduser() / DEMO_FOLDER


def _marker_text(seed: int) -> str:
    """Written last: its presence means complete, its content which generator made it."""
    return f"lostreg demo version {DEMO_VERSION} seed {seed}\n"


def demo_is_present(root: str | Path) -> bool:
    """True when a complete demo of the current generator version is under ``root``."""
    marker = demo_folder(root) / _MARKER
    try:
        return marker.read_text(encoding="utf-8") == _marker_text(DEMO_SEED)
    except OSError:
        return False


def make_demo_scenes(seed: int = DEMO_SEED) -> list[DemoScene]:
    """Draw the scenes in memory (no I/O), so tests can compare them with what is read back."""
    rng = np.random.default_rng(seed)
    sizes = list(_FIXED_SIZES)
    while len(sizes) < _N_SCENES:
        sizes.append((int(rng.integers(60, 201)), int(rng.integers(60, 201))))
    scenes = []
    for index, (width, height) in enumerate(sizes):
        scenes.append(_make_scene(rng, index, width, height))
    return scenes


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted colour with stripes, a gradient and noise: texture without salient objects."""
    base = rng.uniform(90, 160, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 14)
    stripes = 10 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    gradient = 20 * (xx / max(width - 1, 1) - 0.5) * rng.choice([-1, 1])
    noise = rng.normal(0, 8, size=(height, width, 3))
    return base + (stripes + gradient)[..., None] + noise


def _place(
    rng: np.random.Generator, width: int, height: int, taken: list[Box], at_border: bool
) -> tuple[int, int, int, int] | None:
    """Pick a box (0-based, exclusive end) that keeps a 1 px gap from the boxes in ``taken``."""
    for _ in range(50):
        w = max(3, int(round(width * rng.uniform(0.25, 0.55))))
        h = max(3, int(round(height * rng.uniform(0.25, 0.55))))
        x0 = 0 if at_border else int(rng.integers(1, max(2, width - w)))
        y0 = int(rng.integers(0, max(1, height - h + 1)))
        x1, y1 = min(width, x0 + w), min(height, y0 + h)
        clear = all(
            x1 + 1 <= bx0 or bx1 + 1 <= x0 or y1 + 1 <= by0 or by1 + 1 <= y0
            for bx0, by0, bx1, by1 in taken
        )
        if clear:
            return x0, y0, x1, y1
    return None


def _make_scene(rng: np.random.Generator, index: int, width: int, height: int) -> DemoScene:
    pixels = _background(rng, width, height)
    n_objects = 1 if index % 3 == 0 else 2
    boxes: list[Box] = []
    classes: list[str] = []
    truncated: list[bool] = []
    colour_order = rng.permutation(len(_COLOURS))
    for k in range(n_objects):
        placed = _place(rng, width, height, boxes, at_border=(k == 0 and index % 6 == 2))
        if placed is None:
            continue
        x0, y0, x1, y1 = placed
        bh, bw = y1 - y0, x1 - x0
        shape = "ellipse" if rng.random() < 0.5 else "rectangle"
        if shape == "ellipse":
            yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float64)
            mask = ((xx + 0.5 - bw / 2) / (bw / 2)) ** 2 + ((yy + 0.5 - bh / 2) / (bh / 2)) ** 2
            mask = mask <= 1.0
        else:
            mask = np.ones((bh, bw), dtype=bool)
        colour_name, colour = _COLOURS[int(colour_order[k])]
        texture = 12 * np.sign(np.sin(np.arange(bw) / 2.0))[None, :, None]
        fill = np.asarray(colour, dtype=np.float64) + texture + rng.normal(0, 10, (bh, bw, 3))
        region = pixels[y0:y1, x0:x1]
        region[mask] = fill[mask]
        rows, cols = np.nonzero(mask)
        # The exact extent of the drawn pixels (an ellipse may not touch its frame's corners).
        box = (
            float(x0 + cols.min()), float(y0 + rows.min()),
            float(x0 + cols.max() + 1), float(y0 + rows.max() + 1),
        )
        boxes.append(box)
        classes.append(f"{colour_name}_{shape}")
        truncated.append(box[0] == 0 or box[1] == 0 or box[2] == width or box[3] == height)

    rgb = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    mode = _ODD_MODES.get(index, "RGB")
    extension = ".jpg"
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.quantize(colors=64)
        extension = ".png"
    elif mode == "RGBA":
        alpha = np.full((height, width), 255, dtype=np.uint8)
        alpha[:, : width // 4] = 128  # partly transparent: load_rgb must drop alpha
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        extension = ".png"
    image_id = f"demo_{index:03d}"
    return DemoScene(
        image_id=image_id,
        file_name=image_id + extension,
        image=image,
        boxes=tuple(boxes),
        classes=tuple(classes),
        truncated=tuple(truncated),
    )


def _scene_xml(scene: DemoScene) -> bytes:
    return voc_annotation_xml(
        scene.file_name, scene.image.width, scene.image.height,
        list(zip(scene.boxes, scene.classes, scene.truncated, strict=True)),
        folder="demo", depth=len(scene.image.getbands()))


def write_demo(folder: Path, scenes: list[DemoScene], seed: int = DEMO_SEED) -> None:
    """Write scenes as a VOC tree into ``folder`` (the marker last: it means 'complete')."""
    images, annotations = folder / "JPEGImages", folder / "Annotations"
    split_dir = folder / "ImageSets" / "Main"
    for directory in (images, annotations, split_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        if scene.file_name.endswith(".jpg"):
            scene.image.save(images / scene.file_name, "JPEG", quality=95)
        else:
            scene.image.save(images / scene.file_name, "PNG")
        (annotations / f"{scene.image_id}.xml").write_bytes(_scene_xml(scene))
    ids = "".join(f"{scene.image_id}\n" for scene in scenes)
    (split_dir / "trainval.txt").write_text(ids, encoding="utf-8")
    (folder / _MARKER).write_text(_marker_text(seed), encoding="utf-8")


def generate_demo(root: str | Path, seed: int = DEMO_SEED) -> Path:
    """Generate ``ROOT/demo`` unless a current one is there; return its folder.

    Written into a temporary sibling folder and renamed, so a killed run or a concurrent one
    never leaves a half-written demo that looks complete.
    """
    root = Path(root).expanduser()
    target = demo_folder(root)
    if seed == DEMO_SEED and demo_is_present(root):
        return target
    new_root = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LostregError(f"{root}: cannot create the data root ({exc})") from None
    if target.is_symlink():  # rmtree refuses a link ("OSError: Cannot call rmtree on a
        # symbolic link", naming nothing), and what it points to is not ours to replace
        raise LostregError(f"{target}: is a symbolic link to a demo of another version or "
                           "seed; remove the link to regenerate the demo here")
    if target.exists():
        if not (target / _MARKER).is_file():
            raise LostregError(
                f"{target}: exists but is not a generated demo; move it away to regenerate"
            )
        shutil.rmtree(target)  # an older generator version or another seed: ours to replace
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", suffix=".tmp", dir=root))
    try:
        write_demo(tmp, make_demo_scenes(seed), seed)
        try:
            os.rename(tmp, target)
        except OSError:
            if not demo_is_present(root):  # lost a race only if the winner's demo is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # one line naming what was written where; a new root is a warning: a mistyped --data-root
    # must not silently become a new folder
    where = Path(os.path.abspath(target))
    print(f"warning: created the data root {where.parent} for the demo dataset" if new_root
          else f"note: generated the demo dataset in {where}", file=sys.stderr)
    return target


def load_demo(root: str | Path, no_hard: bool = False) -> DatasetIndex:
    """Index ``ROOT/demo`` through the VOC adapter."""
    return load_voc_folder(demo_folder(root), DEMO_FOLDER, split="trainval", no_hard=no_hard)

"""Generated saliency trees with known masks: offline runs, tests and benchmarks.

``generate_mask_tree(root, "ecssd", count)`` writes ``count`` scenes in the set's official
layout (``ECSSD/images/*.jpg`` with ``ECSSD/ground_truth_mask/*.png``, and likewise for
``duts_te`` and ``dut_omron``), so the same loader, checks and runs as for the real data apply.
Each scene is a textured background with one object (an ellipse or a rectangle of its own
colour); its GT is 255 inside and 0 outside, and with ``grey_borders`` every other scene's GT
has an anti-aliased border of grey values (as real GT files have). Sizes vary from scene to
scene (so TokenCut's rounding to a patch multiple goes both ways). A tree with fewer images
than the benchmark's runs with ``--allow-partial-dataset``; a run on it with random weights is
a smoke run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lostreg.datasets.saliency_sets import IMAGE_SUFFIX, MASK_SUFFIX, SETS, SaliencySet
from lostreg.errors import LostregError


def saliency_set(name: str) -> SaliencySet:
    for candidate in SETS:
        if candidate.name == name:
            return candidate
    raise LostregError(f"no saliency set {name!r}; one of {', '.join(s.name for s in SETS)}")


def make_scene(rng: np.random.Generator, width: int, height: int,
               grey_border: bool) -> tuple[Image.Image, Image.Image]:
    """One RGB scene and its 8-bit GT mask."""
    base = rng.integers(40, 200, size=3)
    noise = rng.integers(-25, 25, size=(height, width, 3))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    w, h = rng.integers(width // 4, width * 3 // 4), rng.integers(height // 4, height * 3 // 4)
    x, y = rng.integers(0, width - w), rng.integers(0, height - h)
    box = (int(x), int(y), int(x + w), int(y + h))
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape(box, fill=255)
    inside = np.asarray(mask) > 0
    colour = (base + rng.integers(80, 160, size=3)) % 256
    pixels[inside] = np.clip(colour[None, :] + rng.integers(-10, 10, size=(int(inside.sum()), 3)),
                             0, 255)
    if grey_border:
        shape(box, outline=128, width=2)
    return Image.fromarray(pixels, "RGB"), mask


def generate_mask_tree(root: str | Path, name: str, count: int, seed: int = 0,
                       sizes: tuple[int, int] = (40, 90), grey_borders: bool = False) -> Path:
    """Write ``count`` scenes of set ``name`` under ``root`` in its official layout; sides
    drawn in ``sizes`` (pixels). Returns the image folder."""
    spec = saliency_set(name)
    images, masks = (Path(root) / folder for folder in spec.layouts[0])
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        image, mask = make_scene(rng, width, height, grey_borders and index % 2 == 1)
        stem = f"{index:05d}"
        image.save(images / (stem + IMAGE_SUFFIX), quality=92)
        mask.save(masks / (stem + MASK_SUFFIX))
    return images

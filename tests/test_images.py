"""Odd image files: every mode becomes RGB the way LOST's PIL convert does; bad files name
themselves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lostreg.datasets.base import load_rgb
from lostreg.errors import LostregError


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".jpg"), ("CMYK", ".jpg"), ("P", ".png"), ("RGBA", ".png"), ("LA", ".png"),
     ("1", ".png")],
)
def test_modes_convert_to_rgb_like_pil(tmp_path, mode, suffix) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (21, 17, 3), dtype=np.uint8))
    img = rgb.convert(mode)  # 16-bit images: tests/test_hardening_images.py (high bytes kept)
    path = tmp_path / f"img{suffix}"
    img.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (17, 21)
    with Image.open(path) as reference:
        assert np.array_equal(np.asarray(loaded), np.asarray(reference.convert("RGB")))


def test_missing_truncated_and_garbage_files_are_named(tmp_path) -> None:
    with pytest.raises(LostregError, match="missing.jpg: image file not found"):
        load_rgb(tmp_path / "missing.jpg")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"hello")
    with pytest.raises(LostregError, match="garbage.jpg: cannot decode image"):
        load_rgb(garbage)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(LostregError, match="truncated.jpg: cannot decode image"):
        load_rgb(truncated)

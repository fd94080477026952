"""Issue 20, rows 7, 12 and 19: image files that used to be silently wrong or a traceback.

* 16-bit samples are decoded to their high byte (a 16-bit grayscale PNG used to come out all
  white), 32-bit integer and float images are refused with one line;
* a decompression bomb is one line per image and the run goes on;
* ``--cache-features`` never hashes a file larger than any image of ``--max-pixels`` pixels.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lostreg.features.cache as cache_module
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets import load_dataset
from lostreg.datasets.base import (
    DEFAULT_MAX_PIXELS,
    IMAGE_METADATA_BYTES,
    MAX_BYTES_PER_PIXEL,
    load_rgb,
    max_image_file_bytes,
)
from lostreg.datasets.voc import load_voc
from lostreg.errors import LostregError
from lostreg.features.cache import image_fingerprint
from lostreg.run import main


def png(width: int, height: int, bit_depth: int, colour: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand, so its header can say anything (sizes PIL would not write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row for row in rows)))
            + chunk(b"IEND", b""))


SAMPLES = np.array([[0x0000, 0x00FF, 0x0100, 0x1234], [0x7FFF, 0x8000, 0xABCD, 0xFFFF]],
                   dtype=">u2")
HIGH_BYTES = (SAMPLES >> 8).astype(np.uint8)


# --- row 7: 16-bit and wider samples --------------------------------------------------------------


def test_a_16_bit_grayscale_png_keeps_its_high_bytes(tmp_path: Path) -> None:
    gray = tmp_path / "gray16.png"
    gray.write_bytes(png(4, 2, 16, 0, [row.tobytes() for row in SAMPLES]))
    with Image.open(gray) as image:
        assert image.mode == "I;16"
    loaded = np.asarray(load_rgb(gray))
    assert loaded.shape == (2, 4, 3) and np.array_equal(loaded[..., 0], HIGH_BYTES)
    assert np.array_equal(loaded[..., 1], HIGH_BYTES) and np.array_equal(loaded[..., 2], HIGH_BYTES)
    # the same samples as a 16-bit RGB PNG, which PIL itself reads by the high byte
    colour = tmp_path / "rgb16.png"
    colour.write_bytes(png(4, 2, 16, 2, [np.repeat(row, 3).astype(">u2").tobytes()
                                         for row in SAMPLES]))
    assert np.array_equal(np.asarray(load_rgb(colour)), loaded)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_tiffs_keep_their_high_bytes(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "gray16.tiff"
    raw = SAMPLES.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    Image.frombytes(mode, (4, 2), raw).save(path)  # (PIL's convert to I;16B clips)
    with Image.open(path) as image:
        assert image.mode == mode
    assert np.array_equal(np.asarray(load_rgb(path))[..., 0], HIGH_BYTES)


def test_a_16_bit_pgm_keeps_its_high_bytes(tmp_path: Path) -> None:
    path = tmp_path / "gray16.pgm"  # PIL reads it as mode I, scaled to 0..65535
    path.write_bytes(b"P5\n4 2\n65535\n" + SAMPLES.tobytes())
    with Image.open(path) as image:
        assert image.mode == "I"
    assert np.array_equal(np.asarray(load_rgb(path))[..., 0], HIGH_BYTES)


@pytest.mark.parametrize(("array", "what"), [
    (np.array([[0, 70_000], [-5, 3]], dtype=np.int32), "32-bit integer samples (PIL mode I)"),
    (np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), "floating-point samples (PIL mode F)"),
])
def test_wide_samples_without_a_range_are_refused(tmp_path: Path, array: np.ndarray,
                                                  what: str) -> None:
    path = tmp_path / "wide.tiff"
    Image.fromarray(array).save(path)
    with pytest.raises(LostregError) as info:
        load_rgb(path)
    assert str(info.value) == (f"{path}: {what} have no defined 8-bit range; convert the "
                               "image to 8 or 16 bits per sample")


# --- row 12: decompression bombs ------------------------------------------------------------------


def bomb(path: Path, side: int = 20_000) -> Path:
    """A tiny PNG whose header declares ``side`` x ``side`` pixels (400 M: over PIL's limit)."""
    path.write_bytes(png(side, side, 8, 0, [b"\x00" * 8]))
    return path


def test_a_decompression_bomb_is_one_line(tmp_path: Path) -> None:
    path = bomb(tmp_path / "bomb.png")
    with pytest.raises(LostregError) as info:
        load_rgb(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused as a decompression bomb (Image size "
                              "(400000000 pixels) exceeds limit")
    assert "\n" not in message


def test_max_pixels_refuses_a_large_header_before_decoding(tmp_path: Path) -> None:
    path = bomb(tmp_path / "large.png", side=3000)  # 9 M pixels: under PIL's limit
    with pytest.raises(LostregError, match=r"large.png: 3000x3000 = 9,000,000 pixels is above "
                                           r"--max-pixels 4000000"):
        load_rgb(path, max_pixels=4_000_000)


TINY = BackboneSpec("tiny_img_hard", "vit_small_patch16_224.dino", "dino", 16, 0,
                    pos_embed="dino", model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))
LIMIT = 4


def cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", TINY.name, "--weights", "random", "--dataset", "demo",
            "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
            "--num-workers", "0", "--no-progress", "--limit", str(LIMIT), *extra]


@pytest.mark.usefixtures("one_thread")
def test_a_run_reports_a_bomb_in_one_line_and_keeps_the_rest(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    index = load_dataset("demo", tmp_path / "data")
    monkeypatch.setitem(BACKBONES, TINY.name, TINY)
    target = index.records[1].path  # its XML still says its real (small) size
    bomb(target)
    assert main(cli(tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {target}: refused as a "
                                                     "decompression bomb")
    (run_dir,) = (tmp_path / "runs").iterdir()
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == LIMIT - 1  # the other images are saved


def test_a_bomb_without_an_annotated_size_is_one_line_at_index_time(tmp_path: Path) -> None:
    folder = tmp_path / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True)
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("a\n")
    (folder / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</filename>"
                                                  "</annotation>")
    bomb(folder / "JPEGImages" / "a.jpg")
    with pytest.raises(LostregError, match=r"a.xml: no usable <size> and .*a.jpg cannot be read "
                                           r"\(Image size \(400000000 pixels\) exceeds limit"):
        load_voc(tmp_path, 2007)


@pytest.mark.parametrize("which", ["image", "mask"])
def test_a_bomb_in_a_saliency_set_is_one_line_at_index_time(tmp_path: Path, which: str) -> None:
    """A saliency set reads both sizes from the headers when it is indexed; PIL refuses to
    open a bomb with ``DecompressionBombError``, which is no ``OSError`` (it was a traceback)."""
    from lostreg.datasets.mask_demo import generate_mask_tree
    from lostreg.datasets.saliency_sets import MASK_SUFFIX

    images = generate_mask_tree(tmp_path / "data", "ecssd", 2)
    first = sorted(images.iterdir())[0]
    target = first if which == "image" else sorted(
        (tmp_path / "data").rglob("*" + MASK_SUFFIX))[0]
    bomb(target)
    with pytest.raises(LostregError) as info:
        load_dataset("ecssd", tmp_path / "data", download=False)
    message = str(info.value)
    assert message.startswith(f"{target}: cannot read the image header (Image size "
                              "(400000000 pixels) exceeds limit"), message
    assert "\n" not in message


# --- row 19: no hashing of files no image can be -------------------------------------------------


def test_the_byte_cap_follows_max_pixels() -> None:
    from lostreg.run import DEFAULT_MAX_PIXELS as run_default

    assert DEFAULT_MAX_PIXELS == run_default  # the same default as --max-pixels
    assert max_image_file_bytes() == 4_000_000 * 16 + (64 << 20) == 128_000_000 + 3_108_864
    assert max_image_file_bytes(10) == 10 * MAX_BYTES_PER_PIXEL + IMAGE_METADATA_BYTES


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files ``image_fingerprint`` hashes."""
    names: list[str] = []
    real = hashlib.file_digest

    def spy(handle, digest):
        names.append(handle.name)
        return real(handle, digest)

    monkeypatch.setattr(cache_module.hashlib, "file_digest", spy)
    return names


def sparse(path: Path, size: int = 8 << 30) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def test_a_file_too_large_for_any_image_is_not_hashed(tmp_path: Path, hashed: list[str]) -> None:
    big = sparse(tmp_path / "big.jpg")
    assert image_fingerprint(big) is None and hashed == []
    small = sparse(tmp_path / "small.jpg", 1000)
    assert image_fingerprint(small) == "sha256:" + hashlib.sha256(b"\0" * 1000).hexdigest()
    assert image_fingerprint(small, max_pixels=1) is not None  # 16 bytes + 64 MiB > 1000
    assert hashed == [str(small), str(small)]
    sparse(small, max_image_file_bytes(10) + 1)
    assert image_fingerprint(small, max_pixels=10) is None and len(hashed) == 2
    with pytest.raises(LostregError, match=r"small.jpg: the file is 67,109,025 bytes, more than "
                                           r"any image of --max-pixels 10 pixels can be"):
        load_rgb(small, max_pixels=10)


@pytest.mark.usefixtures("one_thread")
def test_a_cached_run_does_not_hash_an_8_gib_file(tmp_path: Path, monkeypatch, capsys,
                                                  hashed: list[str]) -> None:
    index = load_dataset("demo", tmp_path / "data")
    monkeypatch.setitem(BACKBONES, TINY.name, TINY)
    target = sparse(index.records[2].path)
    assert main(cli(tmp_path, "--cache-features", str(tmp_path / "cache"))) == 2
    assert str(target) not in hashed and len(hashed) == LIMIT - 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    # the pipeline decodes with the run's --max-pixels: refused by its size, before decoding
    assert len(errors) == 1 and errors[0].startswith(f"error: {target}: the file is "), errors
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == LIMIT - 1
    assert json.loads((run_dir / "config.json").read_text())["run_id"] == run_dir.name

"""Shared pieces of the benchmarks: VOC-like generated data, machine facts, result blocks.

Every benchmark measures on data generated here so it runs offline and is repeatable: image
sizes follow the common PASCAL VOC shapes (500 px long side, landscape and portrait), and the
generated VOC-format tree is read back with lostreg's own VOC adapter, like a real dataset.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lostreg.cli import workers_count
from lostreg.datasets.base import DatasetIndex
from lostreg.datasets.voc import load_voc_folder, voc_annotation_xml
from lostreg.errors import LostregError
from lostreg.features.pipeline import (
    decode_workers,
    resolve_device,  # noqa: F401 - re-exported for the scripts
)
from lostreg.io import atomic_write_bytes, atomic_write_json, atomic_write_text

# (width, height) of common VOC07 image shapes with rough relative weights: most VOC images
# are 500x375 or 375x500, the rest spread over other 500-px-long-side shapes. The weights are
# an approximation for benchmarking, not statistics taken from the dataset.
VOC_LIKE_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((500, 375), 0.40),
    ((375, 500), 0.14),
    ((500, 333), 0.12),
    ((333, 500), 0.05),
    ((500, 400), 0.04),
    ((400, 500), 0.02),
    ((500, 500), 0.04),
    ((500, 334), 0.04),
    ((500, 332), 0.03),
    ((500, 366), 0.03),
    ((500, 281), 0.03),
    ((500, 353), 0.03),
    ((353, 500), 0.03),
)

_COLOURS = np.array([(220, 30, 30), (30, 190, 40), (30, 60, 220), (235, 215, 20),
                     (210, 30, 200), (20, 200, 210), (245, 130, 10)], dtype=np.float32)


def sample_sizes(n: int, seed: int = 0, scale: float = 1.0) -> list[tuple[int, int]]:
    """``n`` image sizes ``(height, width)`` drawn from the VOC-like shapes, scaled by ``scale``.

    ``scale`` < 1 shrinks images for CPU runs (the ViT forward grows with the pixel count).
    """
    if n < 1:
        raise LostregError(f"--images {n}: need at least one image")
    if not 0 < scale <= 4:
        raise LostregError(f"--size-scale {scale}: expected a number in (0, 4]")
    rng = np.random.default_rng(seed)
    shapes = [shape for shape, _ in VOC_LIKE_SIZES]
    weights = np.array([weight for _, weight in VOC_LIKE_SIZES], dtype=np.float64)
    picks = rng.choice(len(shapes), size=n, p=weights / weights.sum())
    return [(max(1, round(shapes[i][1] * scale)), max(1, round(shapes[i][0] * scale)))
            for i in picks]


def draw_scene(rng: np.random.Generator, height: int, width: int
               ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A textured background with one or two coloured shapes; boxes are 0-based, end-exclusive."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(80, 170, size=3).astype(np.float32)
    gradient = 25 * (xx / max(width - 1, 1) - 0.5) + 10 * np.sin(yy / rng.uniform(4, 12))
    pixels = base + gradient[..., None] + rng.normal(0, 8, (height, width, 3)).astype(np.float32)
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        h = max(1, int(height * rng.uniform(0.2, 0.6)))
        w = max(1, int(width * rng.uniform(0.2, 0.6)))
        y0 = int(rng.integers(0, max(1, height - h + 1)))
        x0 = int(rng.integers(0, max(1, width - w + 1)))
        colour = _COLOURS[int(rng.integers(len(_COLOURS)))]
        pixels[y0:y0 + h, x0:x0 + w] = colour + rng.normal(0, 10, (h, w, 3))
        boxes.append((x0, y0, x0 + w, y0 + h))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), boxes


def write_voc_tree(folder: str | Path, sizes: Sequence[tuple[int, int]], seed: int = 0,
                   name: str = "bench", quality: int = 90) -> DatasetIndex:
    """Write a VOC-format tree (JPEGImages, Annotations, ImageSets/Main/trainval.txt) of
    generated scenes of the given ``(height, width)`` sizes and index it with lostreg's adapter."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    ids = []
    for number, (height, width) in enumerate(sizes):
        image_id = f"{name}_{number:06d}"
        pixels, boxes = draw_scene(rng, height, width)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
        atomic_write_bytes(folder / "JPEGImages" / f"{image_id}.jpg", buffer.getvalue())
        objects = [(box, "shape", False) for box in boxes]
        atomic_write_bytes(folder / "Annotations" / f"{image_id}.xml",
                           voc_annotation_xml(f"{image_id}.jpg", width, height, objects))
        ids.append(image_id)
    atomic_write_text(folder / "ImageSets" / "Main" / "trainval.txt", "\n".join(ids) + "\n")
    return load_voc_folder(folder, name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device) -> None:
    """Start CUDA, cuBLAS and cuDNN before anything is timed: a process pays for them once
    (about a second), so otherwise the first timed call alone would carry it."""
    if device.type != "cuda":
        return
    x = torch.ones(1, 1, 8, 8, device=device)
    torch.nn.functional.conv2d(x, x[:, :, :3, :3], padding=1)
    torch.bmm(x[0], x[0])
    synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds taken by ``fn()`` (device work included) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: torch.device | None = None) -> dict[str, Any]:
    """What a figure depends on: CPU, cores, load, library versions and the GPU if used."""
    import timm

    facts: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if device is not None:
        facts["device"] = str(device)
        if device.type == "cuda":
            facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def result_block(title: str, rows: Sequence[tuple[str, Any]]) -> str:
    """A fixed-width block of ``name: value`` lines, easy to read and to copy into README.md."""
    width = max(len(name) for name, _ in rows) if rows else 0
    lines = [f"== {title} ==", *(f"{name:<{width}} : {value}" for name, value in rows)]
    return "\n".join(lines)


def facts_rows(facts: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(f"machine.{key}", value) for key, value in facts.items()]


def save_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    """Write the result atomically when ``--json PATH`` was given."""
    if path is not None:
        atomic_write_json(path, payload, undefined_as_null=True)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--workdir --seed --json``: where the generated data goes, its seed, and the result as
    JSON; the same in every script."""
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where generated data and runs go (default: a temp folder, "
                             "removed afterwards)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")


@contextmanager
def scratch_folder(given: Path | None, name: str) -> Iterator[Path]:
    """``--workdir`` when given (kept), else a temporary folder removed on the way out."""
    if given is not None:
        yield Path(given)
        return
    folder = Path(tempfile.mkdtemp(prefix=f"lostreg-bench-{name}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def add_run_options(parser: argparse.ArgumentParser, device: str = "auto") -> None:
    """``--device --batch-size --num-workers`` of the scripts that call ``lostreg.run``
    (the run's own defaults: 16 images per batch, ``auto`` workers)."""
    parser.add_argument("--device", default=device, help="auto, cpu or cuda[:N]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=workers_count, default=None,
                        help="DataLoader workers of the run (default: auto, as lostreg.run)")


def workers_label(num_workers: int | None, device: torch.device | str) -> str:
    """How many decoding workers a run used: the number given, or ``auto (N)``."""
    if num_workers is not None:
        return str(num_workers)
    return f"auto ({decode_workers(torch.device(device))})"


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))

"""Dataset indexing at startup: parsing every VOC XML vs the stored index (issue 13).

A VOC07-sized tree (5011 XMLs of VOC-like image sizes, 1-3 objects each) is generated; images
are not written, since the index never opens them when the XML has a ``<size>``. After the
files are older than ``RACY_WINDOW_NS`` (fresher files get no stat memo), it times:

* ``parse``        ``load_voc_folder(cache=False)``: every XML read, hashed and parsed (the
  pre-cache path, plus the sha256 of each XML);
* ``build``        the first load: parse everything and write the stored index;
* ``stat_hit``     a load with the stored index and untouched XMLs (one ``stat`` per XML);
* ``hash_verify``  a load after every XML's mtime changed but not its content (each XML read
  and hashed, none parsed; every memo refreshed);
* and the two keys issue 13 and 14 name, alone: ``stat`` of every XML, ``read+sha256`` of
  every XML.

CPU seconds (``process_time``) are reported besides wall seconds: on a shared machine the wall
time mostly measures the other processes. Each figure is the minimum over ``--repeats``.

    python benchmarks/bench_index.py                  # ~1 min on 2 busy cores
    python benchmarks/bench_index.py --images 11540   # VOC12-sized
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_model, result_block, sample_sizes, save_json  # noqa: E402
from lostreg.datasets import derived  # noqa: E402
from lostreg.datasets.voc import (  # noqa: E402
    index_cache_name,
    load_voc_folder,
    voc_annotation_xml,
)


def write_xml_tree(folder: Path, n_images: int, seed: int = 0) -> list[str]:
    """Annotations and split file of a VOC-like tree (no images); returns the ids."""
    rng = np.random.default_rng(seed)
    (folder / "Annotations").mkdir(parents=True, exist_ok=True)
    (folder / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids = []
    for number, (height, width) in enumerate(sample_sizes(n_images, seed=seed)):
        image_id = f"{number:06d}"
        objects = []
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            x2, y2 = int(rng.integers(x1 + 1, width + 1)), int(rng.integers(y1 + 1, height + 1))
            objects.append(((x1, y1, x2, y2), "shape", bool(rng.integers(0, 2))))
        xml = voc_annotation_xml(f"{image_id}.jpg", width, height, objects, folder="VOC2007")
        (folder / "Annotations" / f"{image_id}.xml").write_bytes(xml)
        ids.append(image_id)
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return ids


def measure(fn: Callable[[], object], repeats: int,
            before: Callable[[], None] | None = None) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn``, each the minimum over ``repeats``; ``before``
    runs untimed before each repeat."""
    cpu, wall = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return min(cpu), min(wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5011)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        folder = work / "VOC2007"
        ids = write_xml_tree(folder, args.images)
        time.sleep(derived.RACY_WINDOW_NS / 1e9 + 0.5)  # let every file outgrow the window
        xmls = [f"{folder}/Annotations/{image_id}.xml" for image_id in ids]
        store = folder / index_cache_name("trainval", False)

        def read_and_hash() -> None:
            for path in xmls:
                with open(path, "rb") as handle:
                    hashlib.sha256(handle.read()).digest()

        def touch_all() -> None:
            shift = time.time_ns() - 3600 * 10**9  # an hour back, content unchanged
            for path in xmls:
                os.utime(path, ns=(shift, shift))

        figures = {
            "stat": measure(lambda: [os.stat(path) for path in xmls], args.repeats),
            "read+sha256": measure(read_and_hash, args.repeats),
            "parse": measure(lambda: load_voc_folder(folder, "bench", cache=False), args.repeats),
            "build": measure(lambda: load_voc_folder(folder, "bench"), args.repeats,
                             before=lambda: store.unlink(missing_ok=True)),
        }
        load_voc_folder(folder, "bench")
        reference = load_voc_folder(folder, "bench", cache=False).records
        assert load_voc_folder(folder, "bench").records == reference
        figures["stat_hit"] = measure(lambda: load_voc_folder(folder, "bench"), args.repeats)
        figures["hash_verify"] = measure(lambda: load_voc_folder(folder, "bench"), args.repeats,
                                         before=touch_all)
        assert load_voc_folder(folder, "bench").records == reference
        store_bytes = store.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)

    parse_cpu = figures["parse"][0]
    rows = [(f"{name} (s)", f"cpu {cpu:.3f}  wall {wall:.3f}") for name, (cpu, wall) in figures.items()]
    rows += [
        ("parse / stat_hit (cpu)", f"{parse_cpu / figures['stat_hit'][0]:.1f}x"),
        ("parse / hash_verify (cpu)", f"{parse_cpu / figures['hash_verify'][0]:.1f}x"),
        ("stored index (bytes)", store_bytes),
        ("images", args.images),
        ("machine.cpu", cpu_model()),
        ("machine.cpu_count", os.cpu_count()),
        ("machine.loadavg_1min", round(os.getloadavg()[0], 2)),
    ]
    print(result_block("dataset index (VOC XMLs)", rows))
    save_json(args.json, {"images": args.images, "store_bytes": store_bytes,
                          "seconds": {k: {"cpu": c, "wall": w} for k, (c, w) in figures.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bilateral solver refinement: ``lostreg.methods.bilateral`` vs the reference transcription.

On generated images (a coloured shape on a textured background, ``common.draw_scene``) with a
coarse blocky target mask like TokenCut's (patch-16 cells whose centre falls in the object's
box, a few border cells flipped, upsampled nearest), per image and interleaved over
``--rounds`` rounds (the order of the two paths alternates; medians, so machine load hits both
alike):

* ``reference``: ``tests/saliency_references.reference_bilateral``, TokenCut's
  ``bilateral_solver.py`` transcribed step by step (SciPy sparse matrices, ``np.unique``,
  per-dimension ``searchsorted``, ``cg`` with the legacy tolerance rule, a list comprehension
  for component sizes);
* ``ours``: ``lostreg.methods.bilateral.bilateral_refine``.

Both get the same uint8 image and float64 0/1 target; the binary masks must be identical on
every image (asserted) and the largest soft difference is printed. Ratio = reference / ours
(goal >= 3 on the CPU). Both paths call BLAS (``tensordot``, ``dot``); ``--blas-threads``
sets ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS`` before NumPy loads (default 1: on a shared
2-core machine multi-threaded BLAS on these tiny products mostly measures thread wake-ups).

    python benchmarks/bench_bilateral.py                  # 20 images of 400x300, 5 rounds
    python benchmarks/bench_bilateral.py --images 5 --rounds 2 --blas-threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _blas_threads(argv: Sequence[str] | None) -> str:
    """``--blas-threads`` read before NumPy is imported (BLAS reads its variables once)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg.startswith("--blas-threads="):
            return arg.split("=", 1)[1]
        if arg == "--blas-threads" and i + 1 < len(args):
            return args[i + 1]
    return "1"


if __name__ == "__main__":  # only a script run may set them: an importer's NumPy is loaded
    for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, _blas_threads(None))

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    draw_scene,
    facts_rows,
    machine_facts,
    median,
    result_block,
    save_json,
)
from lostreg.errors import LostregError  # noqa: E402
from lostreg.methods.bilateral import bilateral_refine  # noqa: E402
from tests.saliency_references import reference_bilateral  # noqa: E402

GOAL = 3.0


def blocky_target(rng: np.random.Generator, box: tuple[int, int, int, int], height: int,
                  width: int, patch: int = 16, flip: float = 0.05) -> np.ndarray:
    """A TokenCut-like mask: the patch cells whose centre is in ``box``, ``flip`` of the cells
    next to its border toggled, upsampled nearest to ``height x width`` (float64 0/1)."""
    rows, cols = -(-height // patch), -(-width // patch)
    cy = (np.arange(rows) + 0.5) * patch
    cx = (np.arange(cols) + 0.5) * patch
    x1, y1, x2, y2 = box
    cells = ((cy[:, None] >= y1) & (cy[:, None] < y2)) & ((cx[None, :] >= x1) & (cx[None, :] < x2))
    if not cells.any():
        cells[int(min(rows - 1, (y1 + y2) // 2 // patch)), int(min(cols - 1, (x1 + x2) // 2 // patch))] = True
    grown = cells.copy()
    grown[1:] |= cells[:-1]
    grown[:-1] |= cells[1:]
    grown[:, 1:] |= cells[:, :-1]
    grown[:, :-1] |= cells[:, 1:]
    border = grown & ~cells
    toggle = border & (rng.random(cells.shape) < flip * 4)
    cells = cells ^ toggle
    full = np.kron(cells, np.ones((patch, patch), dtype=bool))[:height, :width]
    return full.astype(np.float64)


def make_inputs(n: int, height: int, width: int, seed: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (image, target) pairs, portrait for odd indices."""
    if n < 1 or height < 2 or width < 2:
        raise LostregError(f"--images {n} --size {height}x{width}: need >= 1 image of >= 2x2 px")
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = (height, width) if i % 2 == 0 else (width, height)
        image, boxes = draw_scene(rng, h, w)
        pairs.append((image, blocky_target(rng, boxes[0], h, w)))
    return pairs


def compare(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Run both paths once: identical binary masks asserted, largest soft difference."""
    worst = 0.0
    for image, target in pairs:
        soft, binary = reference_bilateral(image, target)
        ours = bilateral_refine(image, target)
        if not np.array_equal(binary, ours.binary):
            raise AssertionError("bilateral: binary masks differ from the reference")
        worst = max(worst, float(np.abs(soft - ours.soft).max()))
    return {"identical_masks": True, "max_soft_abs_diff": worst}


def measure(pairs: Sequence[tuple[np.ndarray, np.ndarray]], rounds: int) -> dict[str, Any]:
    """Median seconds per image of each path over interleaved rounds."""
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    paths = {"reference": reference_bilateral, "ours": bilateral_refine}
    for round_number in range(rounds):
        order = ("reference", "ours") if round_number % 2 == 0 else ("ours", "reference")
        for name in order:
            start = time.perf_counter()
            for image, target in pairs:
                paths[name](image, target)
            times[name].append((time.perf_counter() - start) / len(pairs))
    seconds = {name: median(values) for name, values in times.items()}
    return {"seconds_per_image": seconds, "ratio": seconds["reference"] / seconds["ours"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="generated images")
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blas-threads", default="1",
                        help="OPENBLAS_NUM_THREADS / OMP_NUM_THREADS for a script run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = make_inputs(args.images, args.height, args.width, args.seed)
    except LostregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checked = compare(pairs)
    result = {**checked, **measure(pairs, max(1, args.rounds)), "n_images": len(pairs)}
    secs = result["seconds_per_image"]
    rows: list[tuple[str, object]] = [
        ("images", f"{len(pairs)} generated, {args.width}x{args.height} and "
                   f"{args.height}x{args.width}, blocky patch-16 targets"),
        ("BLAS threads (env)", os.environ.get("OPENBLAS_NUM_THREADS", "unset")),
        ("binary masks identical", "yes (asserted)"),
        ("max |soft - reference soft|", f"{result['max_soft_abs_diff']:.2e}"),
        ("reference, ms/image", f"{1e3 * secs['reference']:.2f}"),
        ("ours, ms/image", f"{1e3 * secs['ours']:.2f}"),
        ("RATIO reference / ours", f"{result['ratio']:.2f}"),
        ("goal", f">= {GOAL}: {'MET' if result['ratio'] >= GOAL else 'NOT MET'}"),
    ]
    facts = machine_facts()
    print(result_block("bench_bilateral: bilateral solver vs TokenCut's reference",
                       rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_bilateral",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **result, "machine": facts})
    return 0


if __name__ == "__main__":
    sys.exit(main())

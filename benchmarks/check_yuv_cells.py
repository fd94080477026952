"""Exactness check, not a timing: the bilateral solver's colour cells for all 2^24 RGB colours.

``lostreg.methods.bilateral.cell_channels`` computes the (luma, u, v) cell of each pixel in
exact integer arithmetic and hands the pixels whose value lies within a rounding error of a
cell border to the reference's own expression (``exact_colour_cells``). This script runs
every 24-bit colour through both: TokenCut's ``BilateralGrid`` lines as transcribed in
``tests/saliency_references.reference_colour_cells`` (``np.tensordot`` on the image, ``+
offset``, ``/ sigma``, ``.astype(int)``) and ours, on images of ``--chunk`` colours in a
shuffled order (so the border colours sit at arbitrary positions of the images), for each
``--sigmas`` pair. It exits 1 unless every cell of every colour is identical, and prints how
many colours were near a border and how many of those the reference truncated to the lower
cell (there the exact value is an integer and the reference's float falls an ulp short:
plain exact arithmetic would get them wrong).

The reference's bits come from NumPy's product on this machine (its uint8 x float64 product
sums the three terms with this build's dot kernel: FMA or not), which is why the check is
run here and not argued once. A few seconds per sigma pair on one core (4-5 s on this
2-core machine); ``tests/test_bilateral.py`` runs the border colours and a random sample. The
border counts are informational: they take sigma in whole millionths.

    python benchmarks/check_yuv_cells.py                     # sigmas 16/8 (TokenCut) and two more
    python benchmarks/check_yuv_cells.py --sigmas 16:8 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make ``tests`` and ``lostreg`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lostreg.errors import LostregError  # noqa: E402
from lostreg.io import atomic_write_json  # noqa: E402
from lostreg.methods.bilateral import YUV_MICRO, YUV_OFFSET_MICRO, BilateralParams, cell_channels  # noqa: E402
from tests.saliency_references import reference_colour_cells  # noqa: E402

ALL_COLOURS = 1 << 24


def colour_image(codes: np.ndarray, width: int) -> np.ndarray:
    """uint8 ``(len/width, width, 3)`` image of the 24-bit ``codes`` (R high byte); one row
    when ``width`` does not divide their number."""
    rgb = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=-1)
    return rgb.astype(np.uint8).reshape(-1, width if len(codes) % width == 0 else len(codes), 3)


def check_sigmas(order: np.ndarray, sigma_luma: float, sigma_chroma: float, chunk: int
                 ) -> dict[str, int | float | str]:
    """Compare every colour's three cells; count mismatches and the colours on a border."""
    params = BilateralParams(sigma_luma=sigma_luma, sigma_chroma=sigma_chroma)
    sigmas = np.array([sigma_luma, sigma_chroma, sigma_chroma])
    width = 1024 if chunk % 1024 == 0 else chunk
    mismatches = on_border = rounded_down = 0
    start = time.perf_counter()
    for begin in range(0, len(order), chunk):
        image = colour_image(order[begin:begin + chunk], width)
        luma, chroma = reference_colour_cells(image, sigma_luma, sigma_chroma)
        expected = np.concatenate([luma[..., None], chroma], axis=-1).reshape(-1, 3).T
        _, _, ours = cell_channels(image, params)
        mismatches += int(np.count_nonzero(ours != expected))
        exact = YUV_MICRO @ image.reshape(-1, 3).T.astype(np.float64) + YUV_OFFSET_MICRO[:, None]
        units = 1e6 * sigmas[:, None]
        border = (exact % units == 0) & (exact > 0)  # an exact cell border (integer units only)
        on_border += int(np.count_nonzero(border))
        rounded_down += int(np.count_nonzero(border & (expected < exact // units)))
    return {"sigma_luma": sigma_luma, "sigma_chroma": sigma_chroma, "colours": len(order),
            "cell_mismatches": mismatches, "exact_border_cells": on_border,
            "reference_rounded_down": rounded_down,
            "seconds": round(time.perf_counter() - start, 2)}


def parse_sigmas(text: str) -> list[tuple[float, float]]:
    """``"16:8,10:3"`` -> ``[(16.0, 8.0), (10.0, 3.0)]``."""
    pairs = []
    for item in text.split(","):
        try:
            luma, chroma = (float(v) for v in item.split(":"))
        except ValueError as exc:
            raise LostregError(f"--sigmas {text!r}: expected LUMA:CHROMA[,LUMA:CHROMA...]") from exc
        pairs.append((luma, chroma))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigmas", default="16:8,10:3,0.7:0.3", help="luma:chroma pairs")
    parser.add_argument("--chunk", type=int, default=1 << 20, help="colours per image")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the colours' positions")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        pairs = parse_sigmas(args.sigmas)
        if args.chunk < 1:
            raise LostregError(f"--chunk {args.chunk}: need >= 1")
    except LostregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    order = np.random.default_rng(args.seed).permutation(ALL_COLOURS).astype(np.uint32)
    results = []
    for sigma_luma, sigma_chroma in pairs:
        result = check_sigmas(order, sigma_luma, sigma_chroma, args.chunk)
        results.append(result)
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    identical = all(r["cell_mismatches"] == 0 for r in results)
    print("all 2^24 colours: cells identical to the reference" if identical
          else "MISMATCH: some colour's cell differs from the reference")
    if args.json is not None:
        atomic_write_json(args.json, {"check": "check_yuv_cells", "identical": identical,
                                      "results": results})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

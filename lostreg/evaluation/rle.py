"""Binary masks as pycocotools' compressed RLE, written and read back checked.

A mask run stores each image's predicted binary mask as ``{"size": [height, width], "counts":
"<ascii>"}``: ``pycocotools.mask.encode`` of the Fortran-order uint8 array (column-major runs,
starting with a run of zeros), its ``counts`` bytes decoded to ASCII. Reports draw overlays
from it; the run checks it against the line's counts.

pycocotools' C decoder trusts its input (counts that sum to less than ``height * width``
decode to uninitialised memory), so a stored RLE is parsed here first (``string_counts``) and
decoded only when its runs cover exactly its size.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from lostreg.errors import LostregError


def encode(mask: np.ndarray) -> dict[str, Any]:
    """The compressed RLE of a 2-D bool mask, JSON-ready."""
    from pycocotools import mask as mask_utils

    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise LostregError(f"RLE: expected a 2-D mask, got {getattr(mask, 'shape', type(mask))}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def string_counts(text: str, where: str) -> list[int]:
    """The run lengths of pycocotools' compressed string (``rleFrString`` in ``maskApi.c``):
    6-bit groups from ``chr(48 + g)``, 5 value bits each, least significant first, bit 5 for
    "more", sign-extended; from the fourth run on, each is a difference to the run two
    before. A malformed string or a negative run is a ``LostregError`` naming ``where``."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text) or not 48 <= ord(text[position]) < 48 + 64:
                raise LostregError(f"{where}: RLE counts string is malformed")
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise LostregError(f"{where}: RLE counts string has a negative run")
        counts.append(value)
    return counts


def rle_problem(rle: Any, height: int | None = None, width: int | None = None) -> str | None:
    """Why ``rle`` (parsed JSON) is not a compressed RLE of a ``height x width`` mask (sizes
    not checked when None), or None."""
    if not isinstance(rle, dict) or set(rle) != {"size", "counts"}:
        return "expected {\"size\": [height, width], \"counts\": \"...\"}"
    size, counts = rle["size"], rle["counts"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(type(v) is int and v > 0 for v in size)):
        return "size must be [height, width], two positive integers"
    if (height, width) != (None, None) and size != [height, width]:
        return f"size {size} is not the image's [{height}, {width}]"
    if not isinstance(counts, str):
        return "counts must be a string"
    try:
        runs = string_counts(counts, "RLE")
    except LostregError as exc:
        return str(exc).removeprefix("RLE: ")
    if sum(runs) != size[0] * size[1]:
        return f"counts cover {sum(runs)} pixels, not {size[0]}x{size[1]}"
    return None


def foreground(rle: dict[str, Any]) -> int:
    """Pixels set in a checked RLE (every second run, from the second)."""
    return sum(string_counts(rle["counts"], "RLE")[1::2])


def decode(rle: dict[str, Any]) -> np.ndarray:
    """The bool ``(height, width)`` mask of an RLE that ``rle_problem`` accepted."""
    from pycocotools import mask as mask_utils

    problem = rle_problem(rle)
    if problem:
        raise LostregError(f"RLE: {problem}")
    with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy=
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": rle["size"],
                                  "counts": rle["counts"].encode("ascii")}).astype(bool)


def mask_box(mask: np.ndarray) -> list[int]:
    """``[x1, y1, x2, y2]`` around the set pixels, in continuous 0-based pixel coordinates
    (``x2 = last column + 1``); ``[0, 0, 0, 0]`` for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]

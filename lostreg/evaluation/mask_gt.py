"""Ground-truth saliency masks, read once and remembered: every run of a pass scores against
the same GT, and a resumed run checks every stored line against it.

A GT mask is read as TokenCut's ``get_saliency.py`` reads it
(``np.array(Image.open(gt).convert('L'))``, ``lostreg.evaluation.saliency.read_gray_mask``)
and checked to have its image's size (one line naming the file otherwise). Two caches, both
keyed by the file's path *and* its stat (size, mtime, ctime, inode), so a replaced file is
read again:

* the last few arrays, bounded in bytes (``ARRAY_CACHE_BYTES``): the runs of one pass (LOST,
  TokenCut, DINO-seg, each refinement) ask for the same image's GT one after the other, so one
  decode serves all of them without holding a dataset's masks in memory;
* each file's summary (its grey-pixel count: a few bytes per image), so checking a run's lines
  against the dataset after the pass decodes nothing again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from lostreg.errors import LostregError
from lostreg.evaluation.saliency import grey_pixel_count, read_gray_mask

ARRAY_CACHE_BYTES = 64 << 20

_lock = threading.Lock()
_arrays: OrderedDict[tuple, np.ndarray] = OrderedDict()
_array_bytes = 0
_grey: dict[tuple, int] = {}


def _key(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LostregError(f"{path}: ground-truth mask not found") from None
    except OSError as exc:
        raise LostregError(f"{path}: cannot read the ground-truth mask ({exc})") from None
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def read_gt(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The 8-bit gray GT at ``path`` (read-only uint8 HxW), which must be ``size = (width,
    height)``: its image's size."""
    global _array_bytes
    path = Path(path)
    key = _key(path)
    with _lock:
        if key in _arrays:
            _arrays.move_to_end(key)
            return _arrays[key]
    gray = read_gray_mask(path)
    if (gray.shape[1], gray.shape[0]) != tuple(size):
        raise LostregError(f"{path}: ground-truth mask is {gray.shape[1]}x{gray.shape[0]}, its "
                           f"image is {size[0]}x{size[1]}")
    gray.setflags(write=False)
    with _lock:
        _grey[key] = grey_pixel_count(gray)
        _arrays[key] = gray
        _array_bytes += gray.nbytes
        while _array_bytes > ARRAY_CACHE_BYTES and len(_arrays) > 1:
            _, dropped = _arrays.popitem(last=False)
            _array_bytes -= dropped.nbytes
    return gray


def grey_pixels(path: str | Path, size: tuple[int, int]) -> int:
    """Pixels of the GT at ``path`` that are neither 0 nor 255 (read only when not known)."""
    key = _key(Path(path))
    with _lock:
        if key in _grey:
            return _grey[key]
    read_gt(path, size)
    with _lock:
        return _grey[key]


def forget() -> None:
    """Empty both caches (tests)."""
    global _array_bytes
    with _lock:
        _arrays.clear()
        _grey.clear()
        _array_bytes = 0

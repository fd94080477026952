"""Writing the leaderboard's figures, each redrawn only when what it shows changed.

Drawing a matplotlib figure is the slow part of a leaderboard build, and a rebuild where
nothing changed must not pay it again. Each figure is a pure function of its inputs (the
comparison rows, a run's ``histogram_svg.Histogram``) and of the code that draws it;
``figures/.drawn.json`` records, for each figure written, the sha256 of those inputs (with
matplotlib's version and the drawing modules' source) and of the file's bytes. A figure is
kept when both still match, the file being a regular file (not a link) with those bytes;
otherwise it is drawn again, so a changed run, changed code, an edited or deleted figure or a
damaged record all lead to a fresh drawing. The per-run histograms are SVG written directly
(well under a millisecond each), so thousands of runs cost no matplotlib time at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from lostreg.errors import LostregError
from lostreg.io import (
    atomic_write_bytes,
    atomic_write_text,
    dumps_strict,
    loads_bounded,
    read_bounded,
)
from lostreg.reports.leaderboard import figures
from lostreg.reports.leaderboard.figures import figure_png
from lostreg.reports.leaderboard.histogram_svg import Histogram, histogram_svg

MANIFEST = ".drawn.json"
BOX_HISTOGRAMS = "iou"  # figures/<this>/<run id>.svg: each box run's IoU histogram
MASK_HISTOGRAMS = "saliency_iou"  # the same for mask runs
MASK_OVERVIEW = ("saliency_iou.png", "saliency_f_curves.png")  # removed when no mask run is left
PRUNED_SUFFIXES = (".svg", ".png")  # a histogram folder's files of runs no longer listed go
MANIFEST_FORMAT = "lostreg-drawn-figures/1"


@lru_cache(maxsize=1)
def drawing_code() -> str:
    """sha256 of what draws the figures: matplotlib's version and this package's modules
    (the figures, and the labels and tables they show)."""
    from importlib.metadata import version  # not matplotlib itself: a rebuild with nothing
    # to draw never imports it

    digest = hashlib.sha256(version("matplotlib").encode())
    for path in sorted(Path(figures.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def source_key(kind: str, inputs: Any) -> str:
    """The key of one figure: its kind, its inputs (JSON) and the drawing code."""
    text = json.dumps([MANIFEST_FORMAT, kind, drawing_code(), inputs], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_manifest(folder: Path) -> dict[str, dict[str, str]]:
    """The record of drawn figures; anything unexpected reads as none drawn."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        data = loads_bounded(read_bounded(path, 64 << 20, "figure record"), str(path),
                             max_bytes=None)
    except LostregError:
        return {}
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return {}
    entries = data.get("figures")
    if not isinstance(entries, dict):
        return {}
    return {name: entry for name, entry in entries.items()
            if isinstance(entry, dict) and all(isinstance(entry.get(k), str)
                                               for k in ("source", "sha256"))}


def _file_sha256(path: Path) -> str | None:
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def refuse_linked_folder(path: Path) -> None:
    """One line for a figures folder that is a symbolic link: the leaderboard writes there and
    removes the figures of runs no longer listed, so through a link it would write, and delete
    every other ``.svg``/``.png``, in a folder outside ``--output``."""
    if path.is_symlink():
        raise LostregError(f"{path}: is a symbolic link; the leaderboard writes its figures "
                           "there and removes those of runs no longer listed, so it never "
                           "follows a link out of --output: remove the link")


class FigureWriter:
    """Writes the figures of one output folder, keeping those whose record still holds.
    ``folder`` and ``subfolders`` (where ``histograms`` will write) are checked first: none
    may be a link (``refuse_linked_folder``)."""

    def __init__(self, folder: Path, subfolders: Sequence[str] = ()) -> None:
        for path in (folder, *(folder / name for name in subfolders)):
            refuse_linked_folder(path)
        self.folder = folder
        self.old = _read_manifest(folder)
        self.new: dict[str, dict[str, str]] = {}
        self.drawn = 0

    def _kept(self, name: str, key: str) -> bool:
        entry = self.old.get(name)
        if entry is None or entry["source"] != key:
            return False
        if _file_sha256(self.folder / name) != entry["sha256"]:
            return False
        self.new[name] = entry
        return True

    def _write(self, name: str, key: str, png: bytes) -> None:
        atomic_write_bytes(self.folder / name, png)
        self.new[name] = {"source": key, "sha256": hashlib.sha256(png).hexdigest()}
        self.drawn += 1

    def figure(self, name: str, inputs: Any, draw: Callable[[], Any]) -> None:
        """One figure (``draw`` returns a matplotlib figure), drawn if its key changed."""
        key = source_key(name, inputs)
        if not self._kept(name, key):
            self._write(name, key, figure_png(draw()))

    def histograms(self, histograms: Sequence[tuple[str, Histogram]], subfolder: str) -> None:
        """Every run's histogram (``<subfolder>/<run id>.svg``, from ``(run id, histogram)``
        pairs); the folder's other figures, of runs no longer listed or drawn as PNG by an
        older lostreg, are removed."""
        for run_id, histogram in histograms:
            name = f"{subfolder}/{run_id}.svg"
            key = source_key("histogram", asdict(histogram))
            if not self._kept(name, key):
                self._write(name, key, histogram_svg(histogram).encode("utf-8"))
        listed = {f"{run_id}.svg" for run_id, _ in histograms}
        folder = self.folder / subfolder
        for stale in folder.iterdir() if folder.is_dir() else ():
            if stale.suffix in PRUNED_SUFFIXES and stale.name not in listed:
                stale.unlink()

    def close(self) -> None:
        """Write the record of what this build's figures were drawn from."""
        record = {"format": MANIFEST_FORMAT, "figures": self.new}
        atomic_write_text(self.folder / MANIFEST,
                          dumps_strict(record, self.folder / MANIFEST, sort_keys=True, indent=1)
                          + "\n")

"""The build record: a leaderboard whose inputs, code and outputs are all as the last build
left them is not built again.

Even with per-run summaries a rebuild of hundreds of runs reads every summary, recomputes
every table and checks every figure (about 2 s at 500 runs on two cores, issue 20). When
nothing changed none of that can change a byte, so ``<out>/.build.json`` records, after a
build that reported nothing (no skipped folder, no store warning):

* the **inputs**: the command's options (and the methods' titles and order the tables show),
  the published CSV's sha256, and per run folder
  (``scan_runs``' listing: every non-hidden folder) whether it is finished, the sha256 of its
  ``config.json`` and ``metrics.json``, and its ``predictions.jsonl`` by stat (size, times,
  inode, device) when the file had settled (not changed in the last ``RACY_NS`` before the
  build: the rule ``summaries`` uses), else by sha256;
* the **code**: the sha256 of every lostreg source file and the versions of the libraries
  that shape the outputs (numpy, pandas, scipy, matplotlib), and Python's;
* the **outputs**: the sha256 of every file the build wrote, with the figure folders' listing;
* what the summary line says (``BuildSummary``).

The inputs are taken before the build and checked again after it: a file that changed while
the build read it leaves no record. Nothing read back is trusted: the record is read with the
bounded JSON reader, its format and own sha256 (damage) must hold, and it counts only when the
inputs and code taken now equal it and every output file (a regular file, not a link) hashes
to it with no stray figure in the folders a build prunes. Anything else, and the leaderboard is
built as usual (from the summaries: only changed runs are read). A ``--reread`` build
(``leaderboard.build``) never consults the record: it is built in full, from every run's
predictions. What the record says of the
build (the summary line's counts) is believed only with all of that equal: the checks catch a
damaged or stale record, not a consistent forgery by someone who can write the outputs folder
(and could as well write the outputs).
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lostreg
from lostreg.errors import LostregError
from lostreg.io import (
    MAX_JSON_BYTES,
    atomic_write_text,
    dumps_strict,
    loads_bounded,
    read_bounded,
)
from lostreg.reports.leaderboard.drawing import (
    BOX_HISTOGRAMS,
    MASK_HISTOGRAMS,
    MASK_OVERVIEW,
    PRUNED_SUFFIXES,
)
from lostreg.runs.store import CONFIG, METRICS, PREDICTIONS
from lostreg.runs.summaries import file_stat, payload_digest, settled

RECORD = ".build.json"
FORMAT = "lostreg-leaderboard-build/1"
LIBRARIES = ("numpy", "pandas", "scipy", "matplotlib")
MAX_RECORD_BYTES = 64 << 20
# folders a build prunes of figures of runs no longer listed, and figures it removes when no
# mask run is left: any such figure there that the record does not list means a build would differ
PRUNED_FOLDERS = tuple(f"figures/{name}" for name in (BOX_HISTOGRAMS, MASK_HISTOGRAMS))
PRUNED_FILES = tuple(f"figures/{name}" for name in MASK_OVERVIEW)


@dataclass(frozen=True)
class BuildSummary:
    """What the summary line says of a build (``leaderboard.summary_line``)."""

    runs: int  # rows of leaderboard.csv
    smoke: int  # of them, smoke runs
    pairs: int  # register pairs, box and mask
    smoke_excluded: int
    skipped: int
    unfinished: int
    # a ``--reread`` build's (stored summaries compared with the predictions, of them those
    # that differed); never recorded (``COUNTS``): a build the record skips reads nothing
    reread: tuple[int, int] | None = None


# what the record keeps of a build's summary
COUNTS = ("runs", "smoke", "pairs", "smoke_excluded", "skipped", "unfinished")


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of what makes the outputs: lostreg's source files, the libraries' versions and
    Python's (``json.dumps`` of floats, ``repr``)."""
    digest = hashlib.sha256(FORMAT.encode())
    root = Path(lostreg.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={version(name)}\0".encode())
        except PackageNotFoundError:
            digest.update(f"{name}=none\0".encode())
    digest.update(platform.python_version().encode())
    return digest.hexdigest()


def _sha256(path: Path, limit: int = MAX_JSON_BYTES) -> str:
    return hashlib.sha256(read_bounded(path, limit, "file")).hexdigest()


def _predictions(path: Path, before_ns: int) -> dict[str, Any]:
    """A predictions file as a record entry: its stat when settled (an equal stat later
    proves the same content), else its sha256 (``limit``: the readers' own bound)."""
    stat = file_stat(path)
    if settled(stat, before_ns):
        return {"stat": stat}
    return {"sha256": _sha256(path)}


def _folder(folder: Path, before_ns: int) -> dict[str, Any] | None:
    """A run folder as a record entry: None for an unfinished one (no metrics.json)."""
    if not (folder / METRICS).exists():
        return None
    return {"config": _sha256(folder / CONFIG), "metrics": _sha256(folder / METRICS),
            "predictions": _predictions(folder / PREDICTIONS, before_ns)}


def take_inputs(runs_dir: Path, options: dict[str, Any], published: Path | None
                ) -> dict[str, Any] | None:
    """The inputs of a build as the record keeps them; None when a file cannot be read (the
    build says why; such a build is not recorded)."""
    before = time.time_ns()
    try:
        folders = sorted(path for path in runs_dir.iterdir()
                         if path.is_dir() and not path.name.startswith("."))
        runs = {folder.name: _folder(folder, before) for folder in folders}
        published_sha = None if published is None else _sha256(published, MAX_RECORD_BYTES)
    except (OSError, LostregError):
        return None
    return {"options": options, "published": published_sha, "runs": runs,
            "code": code_digest()}


def _same_predictions(path: Path, recorded: Any) -> bool:
    if not isinstance(recorded, dict):
        return False
    if "stat" in recorded:
        return file_stat(path) == recorded["stat"]
    return _sha256(path) == recorded.get("sha256")


def inputs_unchanged(recorded: Any, runs_dir: Path, options: dict[str, Any],
                     published: Path | None) -> bool:
    """Whether the inputs taken now are the recorded ones (a predictions file recorded by its
    stat is compared by stat, one recorded by hash is hashed again)."""
    if not isinstance(recorded, dict) or recorded.get("options") != options:
        return False
    if recorded.get("code") != code_digest() or not isinstance(recorded.get("runs"), dict):
        return False
    try:
        published_sha = None if published is None else _sha256(published, MAX_RECORD_BYTES)
        if recorded.get("published") != published_sha:
            return False
        folders = sorted(path.name for path in runs_dir.iterdir()
                         if path.is_dir() and not path.name.startswith("."))
        if folders != sorted(recorded["runs"]):
            return False
        for name, entry in recorded["runs"].items():
            folder = runs_dir / name
            finished = (folder / METRICS).exists()
            if entry is None and not finished:
                continue
            if (entry is None or not finished or not isinstance(entry, dict)
                    or entry.get("config") != _sha256(folder / CONFIG)
                    or entry.get("metrics") != _sha256(folder / METRICS)
                    or not _same_predictions(folder / PREDICTIONS, entry.get("predictions"))):
                return False
    except (OSError, LostregError):
        return False
    return True


def take_outputs(out_dir: Path, names: list[str]) -> dict[str, str] | None:
    """sha256 of each output file (regular files only); None if one is missing or a link."""
    digests = {}
    for name in sorted(set(names)):
        path = out_dir / name
        if path.is_symlink() or not path.is_file():
            return None
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def outputs_unchanged(recorded: Any, out_dir: Path) -> bool:
    """Every recorded output still has its bytes, and the pruned folders hold no figure the
    record does not list."""
    if not isinstance(recorded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        return False
    for folder in PRUNED_FOLDERS:
        path = out_dir / folder
        listed = ({f"{folder}/{figure.name}" for figure in path.iterdir()
                   if figure.suffix in PRUNED_SUFFIXES} if path.is_dir() else set())
        if not listed <= set(recorded):
            return False
    if any((out_dir / name).exists() and name not in recorded for name in PRUNED_FILES):
        return False
    try:
        return take_outputs(out_dir, list(recorded)) == recorded
    except OSError:
        return False


def read_record(out_dir: Path) -> dict[str, Any] | None:
    """The record of the last build, if its file passes its own checks."""
    path = out_dir / RECORD
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = loads_bounded(read_bounded(path, MAX_RECORD_BYTES, "build record"), str(path),
                             max_bytes=None)
    except (LostregError, OSError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    payload = {key: value for key, value in data.items() if key != "digest"}
    if data.get("digest") != payload_digest(payload):
        return None
    return data


def recorded_summary(data: dict[str, Any], runs_dir: Path, out_dir: Path,
                     options: dict[str, Any], published: Path | None) -> BuildSummary | None:
    """The recorded build's summary when inputs, code and outputs are all unchanged."""
    summary = data.get("summary")
    if (not isinstance(summary, dict) or set(summary) != set(COUNTS)
            or not all(type(v) is int and v >= 0 for v in summary.values())):
        return None
    if not inputs_unchanged(data.get("inputs"), runs_dir, options, published):
        return None
    if not outputs_unchanged(data.get("outputs"), out_dir):
        return None
    return BuildSummary(**summary)


def forget(out_dir: Path) -> None:
    """Remove the record before a build writes outputs (a build that fails half way must not
    leave a record of other outputs)."""
    path = out_dir / RECORD
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)


def write_record(out_dir: Path, inputs: dict[str, Any], outputs: dict[str, str],
                 summary: BuildSummary) -> None:
    payload = {"format": FORMAT, "inputs": inputs, "outputs": outputs,
               "summary": {name: getattr(summary, name) for name in COUNTS}}
    payload["digest"] = payload_digest(payload)
    atomic_write_text(out_dir / RECORD,
                      dumps_strict(payload, out_dir / RECORD, sort_keys=True) + "\n")


__all__ = ["COUNTS", "RECORD", "BuildSummary", "code_digest", "forget", "inputs_unchanged",
           "outputs_unchanged", "read_record", "recorded_summary", "take_inputs",
           "take_outputs", "write_record"]

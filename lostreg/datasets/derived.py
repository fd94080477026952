"""Derived indexes (a parsed VOC index, the COCO 20k subset): stored between runs, never trusted.

A derived index is a JSON document computed from source files (annotation XMLs, a 600 MB COCO
JSON). Using one that no longer matches its sources would silently change the ground truth, so:

* **Keyed by content.** Each source is recorded with the sha256 of the bytes that were parsed;
  a source whose sha256 changed is parsed again.
* **A stat memo saves the hashing.** Hashing 5011 XMLs costs about as much as a tenth of parsing
  them, and the COCO JSON takes seconds, at every start. So each source also records a *stat
  memo* ``[size, mtime_ns, ctime_ns, inode]`` taken before it was read: a source whose stat
  still equals its memo is taken to still have its recorded sha256 (git's index does the same);
  any other is hashed again, and if its sha256 is unchanged only the memo is refreshed. The
  ctime is what makes this safe: ``touch -d``, ``cp -p`` or ``rsync -t`` can restore an
  mtime, but any write or ``utime`` sets the ctime to now, and no user call can set it back.
  A file written within one timestamp tick of being hashed could keep its stat, so memos are
  recorded only for files whose mtime and ctime are ``RACY_WINDOW_NS`` older than the clock
  (a fresher file is hashed again next time, and gets its memo then).
* **The stored file is checksummed.** It is the JSON document then one line ``sha256 <hex>``
  over every byte before it. A file whose checksum fails (edited by hand, torn, damaged, or
  written by an older version without one) is ignored with a warning and rebuilt: its boxes
  are never used as ground truth. (This catches
  accidents and hand edits, not someone who recomputes the checksum.) A file that passes is
  still validated field by field by its reader before any record is built from it.
* **Written atomically, next to the dataset if possible.** A read-only dataset (a shared copy,
  a read-only mount) gets its index in the user cache instead
  (``$XDG_CACHE_HOME/lostreg/dataset-index`` or ``~/.cache/lostreg/dataset-index``); when
  neither can be written the index is rebuilt each run, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lostreg.io import atomic_write_bytes, loads_bounded

RACY_WINDOW_NS = 3_000_000_000
_TRAILER = b"sha256 "
USER_CACHE_SUBDIR = ("lostreg", "dataset-index")

StatMemo = list[int]


def stat_key(st: os.stat_result) -> StatMemo:
    """What a stat memo compares: size, mtime and ctime in ns, inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def stat_memo(st: os.stat_result, now_ns: int) -> StatMemo | None:
    """The memo to record for a file stat-ed (before reading it) at ``now_ns`` or later; None
    when the file changed too recently for its stat to tell a later change apart."""
    if max(st.st_mtime_ns, st.st_ctime_ns) >= now_ns - RACY_WINDOW_NS:
        return None
    return stat_key(st)


def memo_matches(memo: Any, st: os.stat_result) -> bool:
    """True when a recorded memo (anything read from disk) equals the file's current stat."""
    return isinstance(memo, list) and memo == stat_key(st)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lostreg/dataset-index``, else ``~/.cache/lostreg/dataset-index``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base).expanduser() if base else Path.home() / ".cache"
    return root.joinpath(*USER_CACHE_SUBDIR)


def encode(document: dict[str, Any]) -> bytes:
    """The stored form: compact JSON, a newline, then ``sha256 <hex of the JSON line>``."""
    body = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"
    return body + _TRAILER + sha256_hex(body).encode("ascii") + b"\n"


def decode(data: bytes) -> dict[str, Any] | None:
    """The document of a stored file, or None when its checksum line is missing or wrong or the
    JSON does not parse (anything but an intact file written by ``encode``)."""
    body, sep, trailer = data[:-1].rpartition(b"\n")
    if not sep or not data.endswith(b"\n") or not trailer.startswith(_TRAILER):
        return None
    body += b"\n"
    if trailer[len(_TRAILER):] != sha256_hex(body).encode("ascii"):
        return None
    try:  # bounded: a deep body under a valid checksum (anyone can compute one) is refused too
        document = loads_bounded(body, "stored dataset index", max_bytes=None)
    except ValueError:  # JsonInputError: not JSON, not UTF-8, too deep, NaN
        return None
    return document if isinstance(document, dict) else None


class DerivedStore:
    """Where one derived index lives: ``folder/name`` first, then the user cache.

    ``kind`` and ``params`` (e.g. the split) are stored in the document and must match on read,
    so a file of another format version or for other settings is never taken for this one.
    """

    def __init__(self, folder: Path, name: str, kind: str, params: dict[str, Any]) -> None:
        self.kind = kind
        self.params = params
        folder_id = sha256_hex(str(Path(os.path.abspath(folder))).encode("utf-8"))[:16]
        self.paths = [folder / name]
        try:
            self.paths.append(user_cache_dir() / f"{folder_id}-{name.lstrip('.')}")
        except RuntimeError:  # no home directory to put a user cache in: the folder only
            pass

    def read_all(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every intact stored document for this kind and params, in preference order. A file
        that exists but fails its checksum is reported (one warning line) and skipped."""
        found = []
        for path in self.paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue  # absent or unreadable: nothing stored there
            document = decode(data)
            if document is None:
                print(f"warning: {path}: not an intact lostreg index (checksum mismatch: edited, "
                      "damaged or from an older version); ignored, rebuilt from its sources",
                      file=sys.stderr)
                continue
            if document.get("kind") == self.kind and document.get("params") == self.params:
                found.append((path, document))
        return found

    def write(self, body: dict[str, Any]) -> Path | None:
        """Store ``body`` (plus kind and params) at the first writable place; return it, or None
        with one warning when no place can be written (the next run rebuilds the index)."""
        data = encode({"kind": self.kind, "params": self.params, **body})
        failures = []
        for path in self.paths:
            try:
                atomic_write_bytes(path, data)
                return path
            except OSError as exc:
                failures.append(f"{path}: {exc.strerror or exc}")
        print(f"warning: cannot store the dataset index ({'; '.join(failures)}); it is rebuilt "
              "on every run", file=sys.stderr)
        return None


def now_ns() -> int:
    """The clock stat memos are judged against (a function, so tests can move it)."""
    return time.time_ns()


__all__ = [
    "RACY_WINDOW_NS",
    "DerivedStore",
    "decode",
    "encode",
    "memo_matches",
    "now_ns",
    "sha256_hex",
    "stat_key",
    "stat_memo",
    "user_cache_dir",
]

"""What the feature cache holds on disk, and removing the folders no code of this version reads.

Every cache folder is named by its key's hash, and the key holds the code versions that
computed the features (cache format, lostreg version, result version: ``cache_key``). So an
upgrade that changes one of them leaves the old folders behind, several GB each on a real
dataset, never read again. Each folder under a cache root is one of:

* **current**: its key names this code's format, lostreg version and result version, so a run
  of this code with the same settings reads it;
* **stale**: its key names another format, lostreg version or result version (older or newer):
  no run of this code reads or writes it;
* **unreadable**: named like a cache folder, but its ``key.json`` is missing, damaged, not a
  cache key, or the key of another folder name: as far as we can tell not a cache folder.

Anything else under the root (a file, a folder of another name, a symbolic link) is left alone.

**Why removing stale folders needs no lock.** A lock protects only against code that takes
it, and the only code that can be inside a stale folder is code of another version, older
releases included, which takes none. What makes removal safe is the *current-only rule*:
this code never reads nor writes a stale folder (its name is the hash of a key holding the
other versions), so no run of this code can be touched, and current and unreadable folders are
never removed. A run of another version still using a stale folder loses only speed: every
lostreg release reads each shard through a check, so a shard that has gone is a cache miss
(warned, recomputed), and a write into a folder that has gone either fails (warned once, the
run goes on) or makes the folder again, which the next listing reports stale again. No
prediction is ever computed from a half-removed folder.

**How a folder is removed.** Checked again (a real folder, not a link), renamed to
``.deleting-<name>.<tag>`` in the same root (atomic: the folder leaves its name whole), then
emptied with ``key.json`` last and removed. An interrupted removal leaves that hidden folder
with its key, which the next listing shows as stale (partly removed) and the next
``--delete-stale`` finishes. Nothing is followed through a symbolic link: a linked folder is
skipped with one line, a link inside a folder is removed as a link (``shutil.rmtree``, which
on Linux works on open folder descriptors and never follows one).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lostreg
from lostreg import version
from lostreg.errors import LostregError, os_error_message
from lostreg.features import cache_key as cache_key_module
from lostreg.features.cache_key import folder_name, read_key_file

CURRENT, STALE, UNREADABLE = "current", "stale", "unreadable"
STATUSES = (CURRENT, STALE, UNREADABLE)
#: ``folder_name``'s shape: safe characters, then ``-`` and the key hash's first 12 hex digits.
FOLDER_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+-[0-9a-f]{12}$")
#: A folder being removed (``remove_folder``): its old name, then a random tag.
TRASH_PATTERN = re.compile(r"^\.deleting-(?P<name>[A-Za-z0-9_.-]+-[0-9a-f]{12})\.[0-9a-f]{8}$")
#: The fields a key must hold, with their types, to name its folder and its code versions.
KEY_FIELDS: dict[str, type] = {"format": int, "lostreg_version": str, "timm_name": str,
                               "dataset": str, "split": str, "feature": str}
#: The fields that say which code wrote a key; ``result_version`` is absent from keys written
#: before result versions existed (result version 1).
VERSION_FIELDS = (("format", "format"), ("lostreg_version", "lostreg"),
                  ("result_version", "result version"))
#: What an absent version field means: a key written before result versions existed.
_ABSENT_VERSIONS = {"result_version": 1}


def code_versions() -> dict[str, Any]:
    """The versions this code writes into every key (read at call time, so a test can stand
    for code of another result version)."""
    return {"format": cache_key_module.FORMAT_VERSION, "lostreg_version": lostreg.__version__,
            "result_version": version.RESULT_VERSION}


@dataclass(frozen=True)
class CacheFolder:
    """One folder named like a cache folder; ``why`` says what makes it stale or unreadable."""

    path: Path
    status: str
    key: dict[str, Any] | None
    why: str = ""
    partly_removed: bool = False


@dataclass
class CacheScan:
    """Everything under a cache root: its folders, the links skipped, how many other entries."""

    root: Path
    folders: list[CacheFolder] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)
    others: int = 0

    def with_status(self, status: str) -> list[CacheFolder]:
        return [folder for folder in self.folders if folder.status == status]


def key_versions(key: dict[str, Any]) -> dict[str, Any]:
    """The versions of the code that wrote ``key`` (``VERSION_FIELDS``' names), the one place
    that reads an absent ``result_version`` as result version 1."""
    return {name: key.get(name, _ABSENT_VERSIONS.get(name)) for name, _ in VERSION_FIELDS}


def key_problem(key: object) -> str | None:
    """What keeps ``key`` (parsed ``key.json``) from being a cache key, or None."""
    if not isinstance(key, dict):
        return f"not a JSON object ({type(key).__name__})"
    for name, kind in KEY_FIELDS.items():
        if not isinstance(key.get(name), kind) or isinstance(key.get(name), bool):
            return f"no {kind.__name__} {name!r}: not a cache key"
    result = key_versions(key)["result_version"]
    if not isinstance(result, int) or isinstance(result, bool):
        return "'result_version' is not a whole number: not a cache key"
    return None


def stale_because(key: dict[str, Any]) -> str:
    """Which of ``key``'s code versions differ from this code's (empty: none, it is current)."""
    code, found = code_versions(), key_versions(key)
    return ", ".join(f"{label} {found[name]} (this code: {code[name]})"
                     for name, label in VERSION_FIELDS if found[name] != code[name])


def read_key(folder: Path, name: str) -> tuple[dict[str, Any] | None, str]:
    """``folder``'s key and "" when ``key.json`` is a readable cache key that names ``name``;
    else None and one line naming the file and what is wrong (``read_key_file``)."""
    key_file = folder / "key.json"
    try:
        key = read_key_file(key_file)
    except LostregError as exc:  # missing, a link, not a file, unreadable, too large, not JSON
        return None, str(exc)
    problem = key_problem(key)
    if problem is not None:
        return None, f"{key_file}: {problem}"
    expected = folder_name(key)
    if expected != name:
        return None, f"{key_file}: the key of folder {expected}, not of this one"
    return key, ""


def _examine(path: Path, name: str, partly_removed: bool) -> CacheFolder:
    key, problem = read_key(path, name)
    if key is None:
        return CacheFolder(path, UNREADABLE, None, problem, partly_removed)
    why = stale_because(key)
    return CacheFolder(path, STALE if why else CURRENT, key, why, partly_removed)


def scan(root: str | os.PathLike) -> CacheScan:
    """Every entry under ``root``, sorted by name, read from ``key.json`` files only (no shard
    is read). ``root`` itself is followed if it is a link (the user named it); nothing under
    it is. A root that is missing or not a folder is one ``LostregError`` line."""
    root = Path(root)
    if not root.exists():
        raise LostregError(f"{root}: no such folder (python -m lostreg.run --cache-features "
                           f"{shlex.quote(str(root))} creates it)")
    if not root.is_dir():
        raise LostregError(f"{root}: not a folder (a feature cache is a folder)")
    found = CacheScan(root)
    with os.scandir(root) as entries:
        names = sorted(entry.name for entry in entries)
    for name in names:
        trash = TRASH_PATTERN.match(name)
        if not trash and not FOLDER_PATTERN.match(name):
            found.others += 1
            continue
        path = root / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError as exc:
            found.folders.append(CacheFolder(path, UNREADABLE, None, os_error_message(exc)))
            continue
        if stat.S_ISLNK(st.st_mode):
            found.links.append(path)
        elif not stat.S_ISDIR(st.st_mode):
            found.others += 1
        else:
            found.folders.append(_examine(path, trash.group("name") if trash else name,
                                          bool(trash)))
    return found


def _blocks(st: os.stat_result) -> int:
    """Bytes an entry takes on disk (its blocks, as ``du`` counts); its size where the system
    gives no block count."""
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else blocks * 512


def disk_usage(folder: Path) -> tuple[int, bool]:
    """Bytes ``folder`` takes on disk, every inode once, never following a link; and whether
    everything in it could be looked at (False: the size is a lower bound)."""
    complete, seen, total = True, set(), 0
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
            own = os.lstat(current)
        except FileNotFoundError:
            continue
        except OSError:
            complete = False
            continue
        total += _blocks(own)
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile: takes no space
                continue
            except OSError:
                complete = False
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(Path(entry.path))
            elif (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += _blocks(st)
    return total, complete


def index_lines(folder: Path) -> int | None:
    """How many complete lines the folder's index files hold (one per image stored; an image
    stored again, after a bad shard, counts again); None when they cannot be read. Counted in
    chunks, nothing parsed; a linked index file is not followed."""
    index = folder / "index"
    try:
        entries = [e for e in os.scandir(index)
                   if e.name.endswith(".jsonl") and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    lines = 0
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                    lines += chunk.count(b"\n")
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return lines


def human_size(size: int) -> str:
    """``1.5 GiB``, ``12.0 MiB``, ``512 B``: binary units, as ``du -h``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def delete_command(root: Path) -> str:
    """The command that removes ``root``'s stale folders, ready to paste."""
    return f"python -m lostreg.cache {shlex.quote(str(root))} --delete-stale"


def stale_note(root: str | os.PathLike) -> str | None:
    """The one line a run prints when stale folders lie under its cache root, or None: none,
    or the root cannot be looked at (this note never fails a run). Reads ``key.json`` files and
    sizes the stale folders; no shard is read."""
    try:
        found = scan(root)
        stale = found.with_status(STALE)
        size = sum(disk_usage(folder.path)[0] for folder in stale)
    except (LostregError, OSError):
        return None
    if not stale:
        return None
    one = len(stale) == 1
    return (f"note: {len(stale)} feature-cache folder{'' if one else 's'} under {found.root} "
            f"{'was' if one else 'were'} written by other lostreg versions ({human_size(size)}) "
            f"and {'is' if one else 'are'} never read again: {delete_command(found.root)}")


def _empty_aside(aside: Path) -> None:
    """Remove the folder ``aside`` (moved aside already), its ``key.json`` last, so that an
    interrupted removal still says what it was."""
    st = os.lstat(aside)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise LostregError(f"{aside}: no longer a folder (a link or a file took its place); "
                           "left alone")
    with os.scandir(aside) as entries:
        inside = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in inside:
        if name == "key.json":
            continue
        try:
            if is_dir:
                shutil.rmtree(aside / name)
            else:
                os.unlink(aside / name)  # a link is removed as a link
        except FileNotFoundError:  # removed meanwhile
            pass
    (aside / "key.json").unlink(missing_ok=True)
    os.rmdir(aside)


def remove_folder(folder: CacheFolder) -> None:
    """Remove one stale folder: checked again (a real folder), renamed aside, emptied (see the
    module docstring). A ``LostregError`` or ``OSError`` says why it was left."""
    if folder.status != STALE:  # never current, never unreadable
        raise LostregError(f"{folder.path}: {folder.status}, not stale; left alone")
    aside = folder.path
    if not folder.partly_removed:
        st = os.lstat(folder.path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise LostregError(f"{folder.path}: no longer a folder; left alone")
        aside = folder.path.with_name(f".deleting-{folder.path.name}.{secrets.token_hex(4)}")
        os.rename(folder.path, aside)
    _empty_aside(aside)


def delete_stale(found: CacheScan, say: Callable[[str], None]) -> tuple[int, int, list[str]]:
    """Remove every stale folder of ``found``: how many were removed, the bytes freed (sized
    just before each removal) and one line per folder that could not be removed."""
    removed, freed, failures = 0, 0, []
    for folder in found.with_status(STALE):
        size, _ = disk_usage(folder.path)
        try:
            remove_folder(folder)
        except FileNotFoundError:
            failures.append(f"{folder.path}: gone before it could be removed (another "
                            "process removed it?)")
            continue
        except (LostregError, OSError) as exc:
            text = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
            failures.append(f"cannot remove {folder.path}: {text}")
            continue
        removed, freed = removed + 1, freed + size
        say(f"removed {folder.path} ({human_size(size)})")
    return removed, freed, failures

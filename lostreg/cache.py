"""``python -m lostreg.cache [DIR]``: what the feature cache holds, and freeing what no run of
this code reads again; the code is ``lostreg.features.cache_admin``.

Every folder under DIR is listed with its key (dataset, split, model, feature, precision and
stored dtype, the code versions that wrote it), its size on disk, its image count (index
lines) and its status: current, stale (written by another cache format, lostreg version or
result version) or unreadable (not a cache folder as far as we can tell). ``--delete-stale``
removes the stale folders only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lostreg.cli import HelpFormatter
from lostreg.errors import LostregError, error_line
from lostreg.features.cache_admin import (
    STALE,
    STATUSES,
    VERSION_FIELDS,
    CacheFolder,
    CacheScan,
    code_versions,
    delete_command,
    delete_stale,
    disk_usage,
    human_size,
    index_lines,
    key_versions,
    scan,
)
from lostreg.features.cache_key import DEFAULT_CACHE_DIR

COLUMNS = ("status", "size", "images", "dataset", "split", "model", "feature", "precision",
           "dtype", "format", "lostreg", "result", "folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lostreg.cache",
        description=(
            "List the feature cache's folders (python -m lostreg.run --cache-features DIR): each "
            "key's dataset, split, model, feature, precision and stored dtype, the cache format, "
            "lostreg version and result version that wrote it, its size on disk, its images "
            "(index lines) and its status: current (this code reads it), stale (written by "
            "another format, lostreg version or result version: this code never reads it) or "
            "unreadable (key.json missing or damaged: not a cache folder as far as we can "
            "tell). Exit status 0; 1 when --delete-stale could not remove a stale folder; 2 "
            "on bad input."),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_CACHE_DIR, metavar="DIR",
                        help=f"the cache folder (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--delete-stale", action="store_true",
                        help="remove the stale folders (never a current or unreadable one, "
                             "never through a symbolic link) and say how much space that freed; "
                             "deleting one only costs a recompute")
    return parser


def _key_cells(key: dict[str, Any] | None) -> list[str]:
    if key is None:
        return ["-"] * 9
    feature = str(key["feature"]) + (f"@L{key['layer']}" if "layer" in key else "")
    model = key.get("model") or str(key["timm_name"]).split(".")[0]
    versions = key_versions(key)
    return [str(key["dataset"]), str(key["split"]), str(model), feature,
            str(key.get("precision", "-")), str(key.get("dtype", "-")),
            *(str(versions[name]) for name, _ in VERSION_FIELDS)]


def _skipped(link: Path) -> str:
    """The line for a link under the cache root, listed and deleting alike."""
    return f"skipped: {link} is a symbolic link (never followed)"


def _row(folder: CacheFolder) -> tuple[list[str], int]:
    size, complete = disk_usage(folder.path)
    images = index_lines(folder.path) if folder.key is not None else None
    cells = [folder.status, ("" if complete else ">=") + human_size(size),
             "-" if images is None else str(images), *_key_cells(folder.key), folder.path.name]
    return cells, size


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def listing(found: CacheScan) -> list[str]:
    """The listing's lines: what this code reads, one row per folder (with the reason under a
    stale or unreadable one), the links skipped, and the size of each status."""
    code = code_versions()
    lines = [f"feature cache {found.root}: {len(found.folders)} folder(s); this code reads "
             f"format {code['format']}, lostreg {code['lostreg_version']}, result version "
             f"{code['result_version']}"]
    rows, notes, totals = [list(COLUMNS)], {}, {status: [0, 0] for status in STATUSES}
    for folder in found.folders:
        cells, size = _row(folder)
        rows.append(cells)
        totals[folder.status][0] += 1
        totals[folder.status][1] += size
        why = folder.why + (" (partly removed: --delete-stale finishes it)"
                            if folder.partly_removed else "")
        if why:
            notes[len(rows) - 1] = f"    {'written by ' if folder.status == STALE else ''}{why}"
    for number, line in enumerate(_table(rows) if found.folders else []):
        lines.append(line)
        if number in notes:
            lines.append(notes[number])
    lines += [_skipped(path) for path in found.links]
    if found.others:
        lines.append(f"{found.others} other entr{'y' if found.others == 1 else 'ies'} under "
                     f"{found.root} (not named like cache folders): left alone")
    for status, (count, size) in totals.items():
        lines.append(f"{status}: {count} folder{'' if count == 1 else 's'}, {human_size(size)}")
    if totals[STALE][0]:
        lines.append(f"stale folders are never read by this code: {delete_command(found.root)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        found = scan(args.dir)
        if not args.delete_stale:
            print("\n".join(listing(found)))
            return 0
        removed, freed, failures = delete_stale(found, print)
    except (LostregError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: a folder whose removal was cut short stays as .deleting-*; "
              f"{delete_command(args.dir)} finishes it", file=sys.stderr)
        return 130
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    for path in found.links:
        print(_skipped(path))
    kept = len(found.folders) - removed - len(failures)
    print(f"removed {removed} stale folder{'' if removed == 1 else 's'}, freed "
          f"{human_size(freed)}; {kept} current or unreadable folder{'' if kept == 1 else 's'} "
          "kept")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""COCO 20k adapter: the 19817 COCO train2014 images LOST evaluates on, as records.

Layout under the data root::

    COCO/images/train2014/COCO_train2014_*.jpg
    COCO/annotations/instances_train2014.json
    COCO/coco_20k_filenames.txt          # the published list, one ``train2014/<file>`` a line

Conventions, matching LOST's ``select_coco_20k`` and ``extract_gt_COCO``:

* the dataset order is the order of the 20k list;
* crowd annotations (``iscrowd == 1``) are removed;
* a box ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]`` with each value rounded by Python's
  ``round`` (half to even, as LOST's ``int(round(v))``), stored as floats;
* an image left with no box after removing crowds is kept (CorLoc counts it, it can never be
  a hit), except with ``no_hard``, where LOST skips images without a GT box.

Reading the 600 MB annotation file takes a while, so the 20k subset is built once (in linear
time, with dict lookups) and cached in ``COCO/coco20k_index.json``. The cache records the
list's sha256 and the annotation file's size and mtime, so changing either rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path, PureWindowsPath
from typing import Any

from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.datasets.voc import is_plain_file_name, read_name_list
from lostreg.errors import LostregError
from lostreg.io import atomic_write_text

COCO20K_LIST_SHA256 = "74637e9b4f93f2ebef9b1f664aff53edd1f41ef08dad97bd22ce8e455052b335"
COCO20K_IMAGES = 19817
LIST_NAME = "coco_20k_filenames.txt"
ANNOTATION_REL = "annotations/instances_train2014.json"
IMAGES_REL = "images/train2014"
CACHE_NAME = "coco20k_index.json"
_CACHE_VERSION = 1
_IMAGE_FOLDER = "train2014"


def coco_folder(root: str | Path) -> Path:
    """The ``COCO`` folder under a data root (where list, annotations and images live)."""
    return Path(root).expanduser() / "COCO"


def coco20k_is_present(root: str | Path) -> bool:
    """True when the list, the annotation file and the image folder are all there."""
    folder = coco_folder(root)
    return (
        (folder / LIST_NAME).is_file()
        and (folder / ANNOTATION_REL).is_file()
        and (folder / IMAGES_REL).is_dir()
    )


def read_coco20k_list(list_path: Path) -> list[str]:
    """Return the listed image file names (bare ``COCO_train2014_*.jpg``) in list order.

    Entries are ``train2014/<file>`` (as published) or a bare ``<file>``; anything else could
    point outside the image folder and is refused.
    """
    return read_name_list(list_path, "COCO 20k image list not found", _list_entry_name,
                          "is not a file name inside train2014/")


def load_coco20k(
    root: str | Path,
    no_hard: bool = False,
    list_sha256: str | None = None,
    name: str = "coco20k",
    use_cache: bool = True,
) -> DatasetIndex:
    """Index COCO 20k under ``root``; ``list_sha256`` (if given) pins the list's content.

    The registry passes the published list's sha256 so a different list cannot silently
    produce a different benchmark; tests pass ``None`` to use small generated lists.
    """
    folder = coco_folder(root)
    list_path = folder / LIST_NAME
    ann_path = folder / ANNOTATION_REL
    if not list_path.is_file():
        raise LostregError(f"{list_path}: COCO 20k image list not found")
    list_bytes = list_path.read_bytes()
    digest = hashlib.sha256(list_bytes).hexdigest()
    if list_sha256 is not None and digest != list_sha256:
        raise LostregError(
            f"{list_path}: not the published COCO 20k list (sha256 {digest}, expected "
            f"{list_sha256}); delete it and run `python -m lostreg.datasets download coco20k`"
        )
    if not ann_path.is_file():
        raise LostregError(f"{ann_path}: COCO annotation file not found")
    stat = ann_path.stat()
    key = {
        "version": _CACHE_VERSION,
        "list_sha256": digest,
        "annotation_file": ANNOTATION_REL,
        "annotation_size": stat.st_size,
        "annotation_mtime_ns": stat.st_mtime_ns,
    }
    cache_path = folder / CACHE_NAME
    entries = _read_cache(cache_path, key) if use_cache else None
    if entries is None:
        entries = build_coco20k_entries(list_path, ann_path)
        if use_cache:
            _write_cache(cache_path, {**key, "images": entries})

    records: list[ImageRecord] = []
    for entry in entries:
        if not is_plain_file_name(str(entry["file"])):
            raise LostregError(f"{cache_path}: bad file name {entry['file']!r}; delete the cache")
        boxes = tuple(tuple(float(v) for v in box) for box in entry["boxes"])
        if no_hard and not boxes:
            continue
        rel_file = f"{IMAGES_REL}/{entry['file']}"
        records.append(
            ImageRecord(
                image_id=str(entry["id"]),
                path=folder / rel_file,
                width=int(entry["width"]),
                height=int(entry["height"]),
                boxes=boxes,  # type: ignore[arg-type]
                extra={
                    "file": rel_file,
                    "coco_id": int(entry["id"]),
                    "classes": list(entry["classes"]),
                    "category_ids": list(entry["category_ids"]),
                },
            )
        )
    return DatasetIndex(
        name=name, split="train2014-20k", records=tuple(records), root=folder, no_hard=no_hard
    )


def build_coco20k_entries(list_path: Path, ann_path: Path) -> list[dict[str, Any]]:
    """Select the listed images and their non-crowd boxes from the full annotation file.

    Linear in the annotation size: pycocotools indexes images and annotations by id once,
    then every listed file is a dict lookup (LOST's list comprehension per image is quadratic).
    """
    names = read_coco20k_list(list_path)
    coco = _load_coco_api(ann_path)

    by_name: dict[str, int] = {}
    for image_id, image in coco.imgs.items():
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not is_plain_file_name(file_name):
            raise LostregError(
                f"{ann_path}: image {image_id} has file_name {file_name!r}, which is not a plain "
                f"file name inside {_IMAGE_FOLDER}/"
            )
        by_name[file_name] = image_id
    categories = {cat_id: str(cat.get("name", cat_id)) for cat_id, cat in coco.cats.items()}

    entries: list[dict[str, Any]] = []
    for file_name in names:
        image_id = by_name.get(file_name)
        if image_id is None:
            raise LostregError(
                f"{list_path}: {file_name!r} is not an image of {ann_path} (wrong annotation file?)"
            )
        image = coco.imgs[image_id]
        boxes: list[list[float]] = []
        category_ids: list[int] = []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) == 1:
                continue
            boxes.append(_xywh_to_rounded_xyxy(ann, ann_path))
            category_ids.append(ann.get("category_id"))
        try:
            width, height = int(image["width"]), int(image["height"])
        except (KeyError, TypeError, ValueError):
            raise LostregError(f"{ann_path}: image {image_id} has no valid width/height") from None
        entries.append(
            {
                "file": file_name,
                "id": int(image_id),
                "width": width,
                "height": height,
                "boxes": boxes,
                "category_ids": category_ids,
                "classes": [categories.get(c, str(c)) for c in category_ids],
            }
        )
    return entries


def _list_entry_name(entry: str) -> str | None:
    """``train2014/<name>`` or ``<name>`` -> ``<name>``; None when the entry could escape."""
    if "\\" in entry or entry.startswith("/") or PureWindowsPath(entry).drive:
        return None
    parts = entry.split("/")
    if len(parts) == 2 and parts[0] == _IMAGE_FOLDER:
        parts = parts[1:]
    if len(parts) != 1 or not is_plain_file_name(parts[0]):
        return None
    return parts[0]


def _xywh_to_rounded_xyxy(ann: dict[str, Any], ann_path: Path) -> list[float]:
    """``[x, y, w, h]`` -> ``[x, y, x+w, y+h]`` each ``round``-ed (half to even), like LOST."""
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
        return [float(round(v)) for v in (x, y, x + w, y + h)]
    except (TypeError, ValueError, OverflowError):
        raise LostregError(
            f"{ann_path}: annotation {ann.get('id')} has bbox {bbox!r}, expected [x, y, w, h]"
        ) from None


def _load_coco_api(ann_path: Path) -> Any:
    """Load the annotation file with pycocotools, keeping its progress prints off stdout."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_path))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        # json.JSONDecodeError is a ValueError; pycocotools asserts the top level is a dict.
        raise LostregError(
            f"{ann_path}: cannot read COCO annotations ({exc.__class__.__name__}: {exc})"
        ) from None


def _read_cache(cache_path: Path, key: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Return the cached entries when the cache matches ``key``; None means rebuild."""
    try:
        with open(cache_path, encoding="utf-8") as handle:
            cached = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or any(cached.get(k) != v for k, v in key.items()):
        return None
    images = cached.get("images")
    return images if isinstance(images, list) else None


def _write_cache(cache_path: Path, payload: dict[str, Any]) -> None:
    """Write the cache atomically; a read-only dataset folder only costs a rebuild next time."""
    try:
        atomic_write_text(cache_path, json.dumps(payload, separators=(",", ":")) + "\n")
        os.chmod(cache_path, 0o644)  # the temp file was 0600; others sharing the data read it
    except OSError as exc:
        print(f"warning: cannot write {cache_path} ({exc}); it will be rebuilt next time",
              file=sys.stderr)


__all__ = [
    "COCO20K_IMAGES",
    "COCO20K_LIST_SHA256",
    "build_coco20k_entries",
    "coco20k_is_present",
    "coco_folder",
    "load_coco20k",
    "read_coco20k_list",
]

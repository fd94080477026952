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

The annotation file is read with lostreg's bounded JSON reader (``lostreg.io.loads_bounded``:
a file nested too deep or too large is one line, never a traceback) and indexed with
pycocotools' ``COCO`` (``imgToAnns``: each image's annotations in file order, as LOST reads
them). It is validated where it is parsed: a file without an ``images`` or ``annotations``
list, an image or annotation without the integer ids pycocotools indexes by, or an annotation
of a listed image with a wrong type (``iscrowd`` not 0 or 1, ``bbox`` not four finite
numbers, a negative width or height, ``category_id`` not an integer) is an error naming the
file and the annotation. Boxes then follow the checks of
``lostreg.datasets.base.checked_box`` (zero-area boxes kept and counted, boxes more than a
pixel outside the image clipped and counted).

Reading the 600 MB annotation file takes a while, so the 20k subset is built once (in linear
time, with dict lookups) and stored as ``COCO/coco20k_index.json`` (or in the user cache when
``COCO/`` is read-only). It is keyed by the sha256 of the list and of the annotation file
and checksummed itself (see ``lostreg.datasets.derived``): a changed source rebuilds it, and an
edited or damaged index is never used.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import reprlib
from pathlib import Path, PureWindowsPath
from typing import Any

from lostreg.datasets import derived
from lostreg.datasets.base import DatasetIndex, ImageRecord, checked_box, is_zero_area, valid_box
from lostreg.datasets.derived import DerivedStore, memo_matches, sha256_hex
from lostreg.datasets.voc import is_plain_file_name, read_name_list
from lostreg.errors import LostregError
from lostreg.io import JsonInputError, gc_paused, loads_bounded, sha256_file

COCO20K_LIST_SHA256 = "74637e9b4f93f2ebef9b1f664aff53edd1f41ef08dad97bd22ce8e455052b335"
COCO20K_IMAGES = 19817
LIST_NAME = "coco_20k_filenames.txt"
ANNOTATION_REL = "annotations/instances_train2014.json"
IMAGES_REL = "images/train2014"
CACHE_NAME = "coco20k_index.json"
_INDEX_KIND = "lostreg-coco20k-index-2"
_IMAGE_FOLDER = "train2014"
# instances_train2014.json is 330 MB; a file ten times that is not a COCO annotation file.
MAX_ANNOTATION_BYTES = 4 << 30


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
    list_digest = sha256_hex(list_path.read_bytes())
    if list_sha256 is not None and list_digest != list_sha256:
        raise LostregError(
            f"{list_path}: not the published COCO 20k list (sha256 {list_digest}, expected "
            f"{list_sha256}); delete it and run `python -m lostreg.datasets download coco20k`"
        )
    if not ann_path.is_file():
        raise LostregError(f"{ann_path}: COCO annotation file not found")
    store = DerivedStore(folder, CACHE_NAME, _INDEX_KIND, {"annotation_file": ANNOTATION_REL})
    with gc_paused():
        records = _stored_records(store, folder, list_digest, ann_path) if use_cache else None
    if records is None:
        now = derived.now_ns()
        st = os.stat(ann_path)  # before reading: a later change shows in the stat
        document, ann_digest = read_coco_annotations(ann_path)
        entries = select_coco20k(read_coco20k_list(list_path), document, ann_path, list_path)
        del document
        records = [_record(folder, entry, ann_path) for entry in entries]
        if use_cache:
            store.write({"list_sha256": list_digest, "annotation_sha256": ann_digest,
                         "annotation_stat": derived.stat_memo(st, now), "images": entries})
    return DatasetIndex(
        name=name, split="train2014-20k",
        records=tuple(record for record in records if record.boxes or not no_hard),
        root=folder, no_hard=no_hard,
    )


def _stored_records(store: DerivedStore, folder: Path, list_digest: str,
                    ann_path: Path) -> list[ImageRecord] | None:
    """The records of a stored index built from this list and annotation file, or None.

    The annotation file is hashed only when its stat differs from the stored memo; a file
    that hashes the same gets a fresh memo (the index is rewritten with it).
    """
    for _, document in store.read_all():
        if document.get("list_sha256") != list_digest or not isinstance(
                document.get("images"), list):
            continue
        now = derived.now_ns()  # before the stat: the memo's racy window counts from here
        st = os.stat(ann_path)
        by_stat = memo_matches(document.get("annotation_stat"), st)
        if not by_stat:
            if sha256_file(ann_path) != document.get("annotation_sha256"):
                continue
        try:
            records = [_record(folder, entry, ann_path) for entry in document["images"]]
        except (KeyError, TypeError, ValueError):
            continue  # intact file, malformed entry (another version's bug): rebuild
        memo = document.get("annotation_stat") if by_stat else derived.stat_memo(st, now)
        if memo != document.get("annotation_stat"):
            store.write({key: value for key, value in document.items()
                         if key not in ("kind", "params")} | {"annotation_stat": memo})
        return records
    return None


def read_coco_annotations(ann_path: Path) -> tuple[dict[str, Any], str]:
    """The annotation file as JSON, checked to have ``images`` and ``annotations`` lists, and
    the sha256 of the exact bytes parsed. Parsed with ``loads_bounded`` (no deeper than
    ``lostreg.io.MAX_JSON_DEPTH``, no larger than ``MAX_ANNOTATION_BYTES``)."""
    try:
        size = os.stat(ann_path).st_size
        if size > MAX_ANNOTATION_BYTES:
            raise LostregError(f"{ann_path}: cannot read COCO annotations ({size:,} bytes, more "
                               f"than the {MAX_ANNOTATION_BYTES:,} an annotation file may have)")
        data = ann_path.read_bytes()
    except OSError as exc:
        raise LostregError(f"{ann_path}: cannot read COCO annotations ({exc})") from None
    digest = sha256_hex(data)
    try:
        document = loads_bounded(data, str(ann_path), max_bytes=MAX_ANNOTATION_BYTES)
    except JsonInputError as exc:
        raise LostregError(f"{ann_path}: cannot read COCO annotations ({exc.reason})") from None
    del data
    if not isinstance(document, dict):
        raise LostregError(f"{ann_path}: not COCO annotations (a JSON object was expected, "
                           f"found {type(document).__name__})")
    for key in ("images", "annotations"):
        if not isinstance(document.get(key), list):
            found = "missing" if key not in document else type(document[key]).__name__
            raise LostregError(f"{ann_path}: not COCO annotations: {key!r} must be a list "
                               f"({found})")
    return document, digest


def coco_index(document: dict[str, Any]) -> Any:
    """pycocotools' ``COCO`` index of an already parsed and checked document (never its own
    unbounded ``json.load`` of the file), built without its "creating index..." prints. The
    document must have passed ``_check_index_fields``: pycocotools assumes every field."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = document
        coco.createIndex()
    return coco


def build_coco20k_entries(list_path: Path, ann_path: Path) -> list[dict[str, Any]]:
    """The 20k entries straight from the list and annotation file (no stored index)."""
    document, _ = read_coco_annotations(ann_path)
    return select_coco20k(read_coco20k_list(list_path), document, ann_path, list_path)


def select_coco20k(names: list[str], document: dict[str, Any], ann_path: Path,
                   list_path: Path) -> list[dict[str, Any]]:
    """Select the listed images and their non-crowd boxes, validating what is used.

    Linear in the annotation size: pycocotools' index holds every image's annotations in file
    order (``imgToAnns``), then every listed file is a dict lookup (LOST's list comprehension
    per image is quadratic).
    """
    by_name = _images_by_name(document["images"], ann_path)
    images = []
    for file_name in names:
        image = by_name.get(file_name)
        if image is None:
            raise LostregError(
                f"{list_path}: {file_name!r} is not an image of {ann_path} (wrong annotation file?)"
            )
        images.append(image)
    categories = _category_names(document.get("categories", []), ann_path)
    _check_index_fields(document["annotations"], ann_path)
    coco = coco_index(document)
    return [_entry(image, coco.imgToAnns.get(image["id"], []), categories, ann_path)
            for image in images]


def _check_index_fields(annotations: list[Any], ann_path: Path) -> None:
    """Every annotation has what pycocotools' ``createIndex`` indexes it by: an integer
    ``image_id`` and ``id``, and a ``category_id`` (its type is checked where it is used)."""
    for number, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if type(image_id) is not int:
            raise LostregError(f"{ann_path}: annotations[{number}] has no integer image_id "
                               f"({_short(ann)})")
        if type(ann.get("id")) is not int:
            raise LostregError(f"{ann_path}: annotations[{number}] has no integer id "
                               f"({_short(ann)})")
        if "category_id" not in ann or isinstance(ann["category_id"], (list, dict)):
            raise LostregError(f"{ann_path}: annotations[{number}] (id {ann['id']}) has no "
                               f"category_id ({_short(ann)})")


def _images_by_name(images: list[Any], ann_path: Path) -> dict[str, dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    ids: set[int] = set()
    for number, image in enumerate(images):
        image_id = image.get("id") if isinstance(image, dict) else None
        if type(image_id) is not int:
            raise LostregError(f"{ann_path}: images[{number}] has no integer id ({_short(image)})")
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not is_plain_file_name(file_name):
            raise LostregError(
                f"{ann_path}: image {image_id} has file_name {file_name!r}, which is not a plain "
                f"file name inside {_IMAGE_FOLDER}/"
            )
        if image_id in ids or file_name in by_name:
            raise LostregError(f"{ann_path}: image {image_id} ({file_name}) appears twice")
        ids.add(image_id)
        by_name[file_name] = image
    return by_name


def _category_names(categories: Any, ann_path: Path) -> dict[int, str]:
    """Category id -> name, checked (pycocotools indexes categories by an integer ``id``)."""
    if not isinstance(categories, list):
        raise LostregError(f"{ann_path}: 'categories' must be a list")
    names: dict[int, str] = {}
    for number, cat in enumerate(categories):
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        if type(cat_id) is not int:
            raise LostregError(f"{ann_path}: categories[{number}] has no integer id")
        names[cat_id] = str(cat.get("name", cat_id))
    return names


def _entry(image: dict[str, Any], anns: list[dict[str, Any]], categories: dict[int, str],
           ann_path: Path) -> dict[str, Any]:
    """One listed image's entry: size, non-crowd boxes (checked), classes, what was tolerated."""
    image_id, width, height = image["id"], image.get("width"), image.get("height")
    if type(width) is not int or type(height) is not int or width <= 0 or height <= 0:
        raise LostregError(f"{ann_path}: image {image_id} has width {width!r} and height "
                           f"{height!r}, expected positive integers")
    entry: dict[str, Any] = {"file": image["file_name"], "id": image_id, "width": width,
                             "height": height, "boxes": [], "category_ids": [], "classes": [],
                             "clipped": [], "zero_area": []}
    for ann in anns:
        what = f"annotation {_short(ann.get('id'))} (image {image_id})"
        iscrowd = ann.get("iscrowd")
        if type(iscrowd) is not int or iscrowd not in (0, 1):
            raise LostregError(f"{ann_path}: {what} has iscrowd {_short(iscrowd)}, expected 0 or 1")
        if iscrowd == 1:  # LOST skips crowds before reading anything else
            continue
        category_id = ann.get("category_id")
        if type(category_id) is not int:
            raise LostregError(f"{ann_path}: {what} has category_id {_short(category_id)}, "
                               "expected an integer")
        box, clipped = _xywh_to_rounded_xyxy(ann.get("bbox"), width, height, f"{ann_path}: {what}")
        entry["boxes"].append(list(box))
        entry["category_ids"].append(category_id)
        entry["classes"].append(categories.get(category_id, str(category_id)))
        if clipped:
            entry["clipped"].append(what)
        if is_zero_area(box):
            entry["zero_area"].append(what)
    return entry


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


def _xywh_to_rounded_xyxy(bbox: Any, width: int, height: int,
                          where: str) -> tuple[tuple[float, float, float, float], bool]:
    """``[x, y, w, h]`` -> ``[x, y, x+w, y+h]`` each ``round``-ed (half to even), like LOST,
    then checked against the image (``checked_box``); also returns whether it was clipped.
    Runs once per annotation of 20k images: plain statements, no generators."""
    if type(bbox) is not list or len(bbox) != 4:
        raise LostregError(f"{where} has bbox {_short(bbox)}, expected [x, y, w, h] (4 numbers)")
    x, y, w, h = bbox
    if not (type(x) in _NUMBERS and type(y) in _NUMBERS and type(w) in _NUMBERS
            and type(h) in _NUMBERS):
        raise LostregError(f"{where} has bbox {_short(bbox)}, expected [x, y, w, h] (4 numbers)")
    x2, y2 = x + w, y + h
    if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(x2) and math.isfinite(y2)):
        raise LostregError(f"{where}: bbox {bbox!r} is not finite")
    if w < 0 or h < 0:
        raise LostregError(f"{where}: bbox {bbox!r} is inverted (negative width or height)")
    rounded = (float(round(x)), float(round(y)), float(round(x2)), float(round(y2)))
    return checked_box(rounded, width, height, where, f"bbox {bbox!r}")


_NUMBERS = (int, float)


def _all_of_type(values: Any, kind: type) -> bool:
    if type(values) is not list:
        return False
    for value in values:
        if type(value) is not kind:
            return False
    return True


def _record(folder: Path, entry: dict[str, Any], ann_path: Path) -> ImageRecord:
    """The record of one entry, validated field by field (a stored entry is not trusted):
    raises ``KeyError``/``TypeError``/``ValueError`` on anything a build could not produce."""
    file_name, image_id = entry["file"], entry["id"]
    width, height = entry["width"], entry["height"]
    if not isinstance(file_name, str) or not is_plain_file_name(file_name):
        raise ValueError(f"bad file name {file_name!r}")
    if type(image_id) is not int or type(width) is not int or type(height) is not int:
        raise TypeError("id, width and height must be integers")
    if width <= 0 or height <= 0:
        raise ValueError(f"bad size {width}x{height}")
    boxes = tuple([valid_box(box, width, height) for box in entry["boxes"]])
    category_ids, classes = entry["category_ids"], entry["classes"]
    if (not _all_of_type(category_ids, int) or not _all_of_type(classes, str)
            or not len(category_ids) == len(classes) == len(boxes)):
        raise ValueError("one integer category id and one class name per box")
    rel_file = f"{IMAGES_REL}/{file_name}"
    extra: dict[str, Any] = {"file": rel_file, "coco_id": image_id, "classes": list(classes),
                             "category_ids": list(category_ids), "annotation": str(ann_path)}
    for key in ("clipped", "zero_area"):
        notes = entry[key]
        if not _all_of_type(notes, str):
            raise TypeError(f"{key} must be a list of strings")
        if notes:
            extra[key] = list(notes)
    return ImageRecord(image_id=str(image_id), path=folder / rel_file, width=width,
                       height=height, boxes=boxes, extra=extra)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 6, 60, 60


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: error lines quote values, never whole objects
    (``reprlib`` stops at a few levels and items, so a huge or deep value costs nothing)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "COCO20K_IMAGES",
    "COCO20K_LIST_SHA256",
    "build_coco20k_entries",
    "coco20k_is_present",
    "coco_index",
    "coco_folder",
    "load_coco20k",
    "read_coco20k_list",
    "read_coco_annotations",
    "select_coco20k",
]

"""PASCAL VOC adapter: a VOC year folder (JPEGImages, Annotations, ImageSets) to records.

Conventions, matching LOST's ``extract_gt_VOC`` so CorLoc numbers are comparable:

* the dataset order is the order of the ids in ``ImageSets/Main/<split>.txt``;
* VOC boxes are 1-based inclusive pixel indices, so the GT box is
  ``[xmin - 1, ymin - 1, xmax, ymax]`` (a box with ``xmin=1, xmax=W`` covers the whole image);
* LOST calls ``int(text)`` on the coordinates, which rejects text such as ``"273.0"`` that a
  few re-exported annotation sets contain; we use ``int(float(text))`` instead, which gives the
  same value on integer text and truncates toward zero otherwise (``"12.5"`` -> 12);
* ``no_hard`` drops objects flagged ``truncated`` or ``difficult``, then the images left with
  no object (LOST skips those images in its ``--no_hard`` mode);
* without ``no_hard`` an image with no object at all is kept: CorLoc counts every image and
  such an image simply can never be a hit (VOC trainval has none, but other VOC-format sets
  such as the generated demo may).

Boxes are validated as they are parsed (``lostreg.datasets.base.checked_box``): an inverted or
non-finite box is an error naming the XML and the object, a zero-area box is kept and noted,
a box more than a pixel outside the annotated size is clipped and noted.

Image files are not opened at index time (the index of 11540 images must take seconds), except
to recover the size when an XML lacks a usable ``size`` element. The parsed annotations are
stored beside the split (``.lostreg-index-<split>.json``) and reused for every XML whose content
is unchanged (``lostreg.datasets.derived``): a run's start no longer parses 5011 XMLs.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from lostreg.datasets import derived
from lostreg.datasets.base import (
    Box,
    DatasetIndex,
    ImageRecord,
    checked_box,
    is_zero_area,
    valid_box,
)
from lostreg.datasets.derived import DerivedStore, sha256_hex, stat_key
from lostreg.errors import LostregError
from lostreg.io import gc_paused, read_text_lines

_COORDS = ("xmin", "ymin", "xmax", "ymax")
_INDEX_KIND = "lostreg-voc-index-1"


def voc_year_folder(root: str | Path, year: int | str) -> Path | None:
    """Return the ``VOC<year>`` folder under ``root`` (plain or ``VOCdevkit/`` layout), if any.

    Both layouts exist in the wild: the official tar unpacks to ``VOCdevkit/VOC2007`` while
    many setups (LOST's included) point straight at ``VOC2007``.
    """
    root = Path(root).expanduser()
    for candidate in (root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    return None


def voc_is_present(root: str | Path, year: int | str, split: str = "trainval") -> bool:
    """True when the split file of ``VOC<year>`` exists under ``root`` (either layout)."""
    folder = voc_year_folder(root, year)
    return folder is not None and (folder / "ImageSets" / "Main" / f"{split}.txt").is_file()


def load_voc(
    root: str | Path, year: int | str, no_hard: bool = False, split: str = "trainval",
    name: str | None = None,
) -> DatasetIndex:
    """Index ``VOC<year>`` under ``root``; raise ``LostregError`` if the folder is missing."""
    root = Path(root).expanduser()
    folder = voc_year_folder(root, year)
    if folder is None:
        raise LostregError(
            f"{root}: no VOC{year} folder (looked for {root / f'VOC{year}'} and "
            f"{root / 'VOCdevkit' / f'VOC{year}'}, each with ImageSets/Main)"
        )
    return load_voc_folder(folder, name or f"voc{str(year)[-2:]}", split=split, no_hard=no_hard)


def read_name_list(path: Path, missing: str, to_name: Callable[[str], str | None],
                   bad: str, what: str = "") -> list[str]:
    """Names, one per line, in file order (the dataset order): blank lines skipped, an entry
    ``to_name`` rejects (returns None) or a repeated name (it would be counted twice) is a
    one-line error naming the file and line."""
    names: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(read_text_lines(path, missing), start=1):
        entry = line.strip()
        if not entry:
            continue
        name = to_name(entry)
        if name is None:
            raise LostregError(f"{path}: line {number}: {what}{entry!r} {bad}")
        if name in seen:
            raise LostregError(f"{path}: line {number}: {what}{entry!r} listed twice")
        seen.add(name)
        names.append(name)
    return names


def read_split_ids(split_file: Path) -> list[str]:
    """Image ids of a VOC split file, in file order."""
    return read_name_list(split_file, "split file not found",
                          lambda entry: entry if is_plain_file_name(entry) else None,
                          "is not a plain file name", what="image id ")


def load_voc_folder(
    folder: str | Path, name: str, split: str = "trainval", no_hard: bool = False,
    cache: bool = True,
) -> DatasetIndex:
    """Index one VOC-format folder (``folder/{JPEGImages,Annotations,ImageSets/Main}``).

    Separate from ``load_voc`` so any VOC-format tree (the generated demo) reuses the parser.
    With ``cache`` the parsed annotations are kept between runs (see ``lostreg.datasets.derived``
    for why that is safe): an unchanged XML is not parsed again, a changed one is.
    """
    folder = Path(folder).expanduser()
    ids = read_split_ids(folder / "ImageSets" / "Main" / f"{split}.txt")
    if cache:
        with gc_paused():
            parsed = _cached_records(folder, ids, split, no_hard)
    else:
        parsed = [parse_voc_xml(folder, image_id, no_hard) for image_id in ids]
    records = tuple(record for record in parsed if record.boxes or not no_hard)
    return DatasetIndex(name=name, split=split, records=records, root=folder, no_hard=no_hard)


def index_cache_name(split: str, no_hard: bool) -> str:
    """The cache file of one split and mode inside the VOC folder (``.lostreg-index-*.json``)."""
    return f".lostreg-index-{split}{'-no_hard' if no_hard else ''}.json"


def _cached_records(folder: Path, ids: list[str], split: str, no_hard: bool) -> list[ImageRecord]:
    """The record of every id, from the stored index where its XML is unchanged.

    Per XML: a stat equal to its memo is a hit; otherwise the XML is hashed, and an unchanged
    sha256 is a hit too (its memo is refreshed); anything else, or a stored entry that fails
    validation, is parsed. The stored index is rewritten only when something changed.
    """
    store = DerivedStore(folder, index_cache_name(split, no_hard), _INDEX_KIND,
                         {"split": split, "no_hard": no_hard})
    stored = [document["files"] for _, document in store.read_all()
              if isinstance(document.get("files"), dict)]
    annotations = os.path.join(str(folder), "Annotations")
    images = folder / "JPEGImages"
    now = derived.now_ns()
    kept: dict[str, list] = {}
    records: list[ImageRecord] = []
    changed = not stored
    for image_id in ids:
        xml = f"{annotations}/{image_id}.xml"
        st = _stat_or_none(xml)
        hit = _stored_hit(stored, images, image_id, xml, st) if st is not None else None
        if hit is None:
            entry, digest = _parse_entry(folder, image_id, no_hard)
            records.append(_record(images, image_id, entry, xml))
            if not entry.get("size_from_image"):  # such an entry depends on the image too
                kept[image_id] = [digest, derived.stat_memo(st, now) if st else None, entry]
                changed = True
            continue
        item, record, by_stat = hit
        if not by_stat:  # verified by its hash: refresh the memo
            memo = derived.stat_memo(st, now)  # type: ignore[arg-type]
            changed = changed or memo != item[1]
            item = [item[0], memo, item[2]]
        kept[image_id] = item
        records.append(record)
    if changed or len(stored[0]) != len(kept):
        store.write({"files": kept})
    return records


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None  # missing or unreadable: parsing says which, naming the file


def _stored_hit(stored: list[dict], images: Path, image_id: str, xml: str,
                st: os.stat_result) -> tuple[list, ImageRecord, bool] | None:
    """A stored ``[sha256, memo, entry]`` still valid for this XML (stat ``st``), its record
    and whether the stat alone vouched for it; None when the XML must be parsed. Runs once
    per image at every start: plain loops, the stat check first."""
    key = stat_key(st)
    candidates = []
    for files in stored:
        item = files.get(image_id)
        if type(item) is list and len(item) == 3:
            if item[1] == key and (record := _checked_record(images, image_id, item, xml)):
                return item, record, True
            candidates.append(item)
    if not candidates:
        return None
    try:
        with open(xml, "rb") as handle:
            digest = sha256_hex(handle.read())
    except OSError:
        return None
    for item in candidates:
        if item[0] == digest and (record := _checked_record(images, image_id, item, xml)):
            return item, record, False
    return None


def _checked_record(images: Path, image_id: str, item: list, xml: str) -> ImageRecord | None:
    """The record of a stored item, or None when its entry fails validation (an intact file
    with a malformed entry, e.g. from another version's bug: the XML is parsed instead)."""
    try:
        return _record(images, image_id, item[2], xml)
    except (KeyError, TypeError, ValueError):
        return None


def parse_voc_xml(folder: Path, image_id: str, no_hard: bool = False) -> ImageRecord:
    """Parse ``Annotations/<id>.xml`` into a record (boxes already converted to 0-based)."""
    xml = os.path.join(str(folder), "Annotations", f"{image_id}.xml")
    return _record(folder / "JPEGImages", image_id, _parse_entry(folder, image_id, no_hard)[0], xml)


def _parse_entry(folder: Path, image_id: str, no_hard: bool) -> tuple[dict, str]:
    """Read and parse one XML; return its entry (JSON-able, see ``_record``) and the sha256 of
    the exact bytes parsed."""
    xml_path = folder / "Annotations" / f"{image_id}.xml"
    if not xml_path.is_file():
        raise LostregError(f"{xml_path}: annotation file not found (image id {image_id!r})")
    try:
        data = xml_path.read_bytes()
        annotation = ET.fromstring(data)
    except (ET.ParseError, OSError) as exc:
        raise LostregError(f"{xml_path}: cannot parse XML ({exc})") from None

    file_name = _image_file_name(annotation, image_id, xml_path)
    width, height, size_from_image = _image_size(annotation, xml_path,
                                                 folder / "JPEGImages" / file_name)
    boxes: list[list[float]] = []
    classes: list[str] = []
    clipped: list[str] = []
    zero_area: list[str] = []
    for number, obj in enumerate(annotation.findall("object")):
        if no_hard and (_flag(obj, "truncated", xml_path) or _flag(obj, "difficult", xml_path)):
            continue
        name = (obj.findtext("name") or "").strip()
        what = f"object {number} ({name or '?'})"
        box, was_clipped = _parse_bndbox(obj, f"{xml_path}: {what}", width, height)
        boxes.append(list(box))
        classes.append(name)
        if was_clipped:
            clipped.append(what)
        if is_zero_area(box):
            zero_area.append(what)
    entry = {"file": file_name, "width": width, "height": height, "boxes": boxes,
             "classes": classes, "clipped": clipped, "zero_area": zero_area}
    if size_from_image:
        entry["size_from_image"] = True
    return entry, sha256_hex(data)


def _record(images: Path, image_id: str, entry: dict, xml: str) -> ImageRecord:
    """The record of one entry (``images``: the JPEGImages folder, ``xml``: its annotation),
    validated field by field, since a stored entry is not trusted: raises
    ``KeyError``/``TypeError``/``ValueError`` on anything a parse could not produce."""
    file_name, width, height = entry["file"], entry["width"], entry["height"]
    if not isinstance(file_name, str) or not is_plain_file_name(file_name):
        raise ValueError(f"bad file name {file_name!r}")
    if type(width) is not int or type(height) is not int or width <= 0 or height <= 0:
        raise ValueError(f"bad size {width!r}x{height!r}")
    boxes = tuple([valid_box(box, width, height) for box in entry["boxes"]])
    classes = _strings(entry["classes"])
    if len(classes) != len(boxes):
        raise ValueError("one class per box")
    extra: dict = {"file": f"JPEGImages/{file_name}", "classes": classes, "annotation": xml}
    for key in ("clipped", "zero_area"):
        if entry[key]:
            extra[key] = _strings(entry[key])
    return ImageRecord(image_id=image_id, path=images / file_name, width=width,
                       height=height, boxes=boxes, extra=extra)


def _strings(value: object) -> list[str]:
    if type(value) is not list:
        raise TypeError("expected a list of strings")
    for item in value:
        if type(item) is not str:
            raise TypeError("expected a list of strings")
    return list(value)


def is_plain_file_name(name: str) -> bool:
    """True for a single path component: names from data files must not escape their folder.

    Plain string tests (no pathlib): this runs once per image of every index.
    """
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not (len(name) >= 2 and name[1] == ":" and name[0].isalpha())  # Windows drive
    )


def _image_file_name(annotation: ET.Element, image_id: str, xml_path: Path) -> str:
    """Use ``<filename>`` when it names this id (any extension), else ``<id>.jpg`` like LOST.

    Generated sets store PNGs this way; official VOC XMLs always say ``<id>.jpg``. A
    ``<filename>`` naming another image is ignored, as LOST and torchvision ignore it.
    """
    file_name = (annotation.findtext("filename") or "").strip()
    if not file_name:
        return f"{image_id}.jpg"
    if not is_plain_file_name(file_name):
        raise LostregError(
            f"{xml_path}: <filename> {file_name!r} is not a plain file name inside JPEGImages"
        )
    return file_name if PurePosixPath(file_name).stem == image_id else f"{image_id}.jpg"


def _flag(obj: ET.Element, tag: str, xml_path: Path) -> bool:
    """Read a 0/1 flag (``truncated``/``difficult``); a missing flag means 0."""
    text = (obj.findtext(tag) or "").strip()
    if not text:
        return False
    try:
        return float(text) == 1.0
    except ValueError:
        raise LostregError(f"{xml_path}: <{tag}> is {text!r}, expected 0 or 1") from None


def _parse_bndbox(obj: ET.Element, where: str, width: int, height: int) -> tuple[Box, bool]:
    """The object's box, 0-based (``[xmin - 1, ymin - 1, xmax, ymax]``), checked against the
    image (``checked_box``), and whether it was clipped. Coordinates are read as LOST reads
    them, ``int()`` (truncating), after ``float()`` so that ``"273.0"`` is accepted."""
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise LostregError(f"{where} has no <bndbox>")
    values: list[int] = []
    texts: list[str] = []
    for coord in _COORDS:
        text = (bndbox.findtext(coord) or "").strip()
        if not text:
            raise LostregError(f"{where} has no bndbox/{coord}")
        try:
            value = float(text)
        except ValueError:
            raise LostregError(f"{where} bndbox/{coord} is {text!r}, not a number") from None
        if not math.isfinite(value):
            raise LostregError(f"{where} bndbox/{coord} is {text!r}, not a finite number")
        values.append(int(value))
        texts.append(f"{coord} {text}")
    xmin, ymin, xmax, ymax = values
    return checked_box((xmin - 1, ymin - 1, xmax, ymax), width, height, where,
                       f"bndbox ({', '.join(texts)})")


def _image_size(annotation: ET.Element, xml_path: Path,
                image_path: Path) -> tuple[int, int, bool]:
    """``size/width`` and ``size/height``; when absent or unusable, read the image header.
    The flag says the size came from the image (such an entry depends on the image file)."""
    size = annotation.find("size")
    if size is not None:
        try:
            width = int(float((size.findtext("width") or "").strip()))
            height = int(float((size.findtext("height") or "").strip()))
        except (ValueError, OverflowError):
            width = height = 0
        if width > 0 and height > 0:
            return width, height, False
    if not image_path.is_file():
        raise LostregError(
            f"{xml_path}: no usable <size> and the image {image_path} is missing, "
            "so the image size is unknown"
        )
    try:
        with Image.open(image_path) as image:  # reads the header only
            return image.size[0], image.size[1], True
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise LostregError(
            f"{xml_path}: no usable <size> and {image_path} cannot be read ({exc})"
        ) from None


def voc_annotation_xml(
    file_name: str, width: int, height: int,
    objects: Sequence[tuple[Box, str, bool]], folder: str = "", depth: int = 3,
) -> bytes:
    """The inverse of ``parse_voc_xml``: VOC XML for ``objects`` = ``(box, name, truncated)``
    with boxes in our 0-based ``[x1, y1, x2, y2]`` (written 1-based inclusive: ``xmin = x1+1``,
    ``xmax = x2``), so generated trees (demo, benchmarks) read back to the same boxes."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = file_name
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = str(depth)
    ET.SubElement(ann, "segmented").text = "0"
    for box, name, truncated in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "1" if truncated else "0"
        ET.SubElement(obj, "difficult").text = "0"
        bndbox = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = (int(v) for v in box)
        for tag, value in zip(_COORDS, (x1 + 1, y1 + 1, x2, y2), strict=True):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8") + b"\n"

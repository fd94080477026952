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

Image files are not opened at index time (the index of 11540 images must take seconds), except
to recover the size when an XML lacks a usable ``size`` element.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from lostreg.datasets.base import Box, DatasetIndex, ImageRecord
from lostreg.errors import LostregError
from lostreg.io import read_text_lines

_COORDS = ("xmin", "ymin", "xmax", "ymax")


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
    folder: str | Path, name: str, split: str = "trainval", no_hard: bool = False
) -> DatasetIndex:
    """Index one VOC-format folder (``folder/{JPEGImages,Annotations,ImageSets/Main}``).

    Separate from ``load_voc`` so any VOC-format tree (the generated demo) reuses the parser.
    """
    folder = Path(folder).expanduser()
    ids = read_split_ids(folder / "ImageSets" / "Main" / f"{split}.txt")
    records: list[ImageRecord] = []
    for image_id in ids:
        record = parse_voc_xml(folder, image_id, no_hard=no_hard)
        if no_hard and not record.boxes:
            continue
        records.append(record)
    return DatasetIndex(
        name=name, split=split, records=tuple(records), root=folder, no_hard=no_hard
    )


def parse_voc_xml(folder: Path, image_id: str, no_hard: bool = False) -> ImageRecord:
    """Parse ``Annotations/<id>.xml`` into a record (boxes already converted to 0-based)."""
    xml_path = folder / "Annotations" / f"{image_id}.xml"
    if not xml_path.is_file():
        raise LostregError(f"{xml_path}: annotation file not found (image id {image_id!r})")
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as exc:
        raise LostregError(f"{xml_path}: cannot parse XML ({exc})") from None
    annotation = tree.getroot()

    file_name = _image_file_name(annotation, image_id, xml_path)
    rel_file = f"JPEGImages/{file_name}"
    image_path = folder / "JPEGImages" / file_name

    boxes: list[Box] = []
    classes: list[str] = []
    for number, obj in enumerate(annotation.findall("object")):
        if no_hard and (_flag(obj, "truncated", xml_path) or _flag(obj, "difficult", xml_path)):
            continue
        boxes.append(_parse_bndbox(obj, number, xml_path))
        classes.append((obj.findtext("name") or "").strip())

    width, height = _image_size(annotation, xml_path, image_path)
    return ImageRecord(
        image_id=image_id,
        path=image_path,
        width=width,
        height=height,
        boxes=tuple(boxes),
        extra={"file": rel_file, "classes": classes},
    )


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


def _parse_bndbox(obj: ET.Element, number: int, xml_path: Path) -> Box:
    label = (obj.findtext("name") or "").strip() or "?"
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise LostregError(f"{xml_path}: object {number} ({label}) has no <bndbox>")
    values: list[int] = []
    for coord in _COORDS:
        text = (bndbox.findtext(coord) or "").strip()
        if not text:
            raise LostregError(f"{xml_path}: object {number} ({label}) has no bndbox/{coord}")
        try:
            values.append(int(float(text)))
        except (ValueError, OverflowError):
            raise LostregError(
                f"{xml_path}: object {number} ({label}) bndbox/{coord} is {text!r}, not a number"
            ) from None
    xmin, ymin, xmax, ymax = values
    return (float(xmin - 1), float(ymin - 1), float(xmax), float(ymax))


def _image_size(annotation: ET.Element, xml_path: Path, image_path: Path) -> tuple[int, int]:
    """``size/width`` and ``size/height``; when absent or unusable, read the image header."""
    size = annotation.find("size")
    if size is not None:
        try:
            width = int(float((size.findtext("width") or "").strip()))
            height = int(float((size.findtext("height") or "").strip()))
        except (ValueError, OverflowError):
            width = height = 0
        if width > 0 and height > 0:
            return width, height
    if not image_path.is_file():
        raise LostregError(
            f"{xml_path}: no usable <size> and the image {image_path} is missing, "
            "so the image size is unknown"
        )
    try:
        with Image.open(image_path) as image:  # reads the header only
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
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

"""Dataset adapters: VOC and COCO 20k conventions (as LOST reads them), the demo, the registry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lostreg.datasets import (
    DATASETS,
    default_data_root,
    get_dataset,
    load_dataset,
)
from lostreg.datasets.__main__ import main as datasets_main
from lostreg.datasets.base import load_rgb
from lostreg.datasets.coco import (
    CACHE_NAME,
    COCO20K_LIST_SHA256,
    load_coco20k,
    read_coco20k_list,
)
from lostreg.datasets.demo import (
    DEMO_SEED,
    demo_folder,
    demo_is_present,
    generate_demo,
    load_demo,
    make_demo_scenes,
)
from lostreg.datasets.voc import load_voc, load_voc_folder
from lostreg.errors import LostregError

REPO = Path(__file__).resolve().parents[1]
SHARED_LIST = REPO.parent / "shared" / "data" / "coco_20k_filenames.txt"


# ----------------------------------------------------------------------------------------- VOC


def _obj(name: str, box: tuple, truncated: int = 0, difficult: int = 0) -> str:
    tags = ("xmin", "ymin", "xmax", "ymax")
    coords = "".join(f"<{tag}>{value}</{tag}>" for tag, value in zip(tags, box, strict=True))
    return (
        f"<object><name>{name}</name><truncated>{truncated}</truncated>"
        f"<difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"
    )


def _xml(objects: list[str], width: int = 50, height: int = 40, filename: str = "") -> str:
    name = f"<filename>{filename}</filename>" if filename else ""
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation>{name}{size}{''.join(objects)}</annotation>"


def make_voc(folder: Path, annotations: dict[str, str], images: bool = False) -> Path:
    """Write a VOC-format folder; ids listed in the given (insertion) order."""
    (folder / "Annotations").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, xml in annotations.items():
        (folder / "Annotations" / f"{image_id}.xml").write_text(xml)
        if images:
            Image.new("RGB", (50, 40), (10, 20, 30)).save(folder / "JPEGImages" / f"{image_id}.jpg")
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(annotations) + "\n")
    return folder


def standard_voc(folder: Path) -> Path:
    return make_voc(
        folder,
        {
            "000009": _xml([_obj("dog", (1, 1, 50, 40)), _obj("cat", (10, 5, 20, 15), 1, 0)]),
            "000005": _xml([_obj("cat", (3, 4, 10, 12), 0, 1)]),
            "000007": _xml([_obj("car", ("273.0", "12.5", "300.0", "30"))], width=500, height=375),
        },
    )


def test_voc_minus_one_convention_and_order(tmp_path: Path) -> None:
    standard_voc(tmp_path / "VOC2007")
    index = load_voc(tmp_path, 2007)
    assert [r.image_id for r in index.records] == ["000009", "000005", "000007"]
    first = index.records[0]
    assert first.boxes[0] == (0.0, 0.0, 50.0, 40.0)  # 1-based inclusive full image
    assert first.boxes[1] == (9.0, 4.0, 20.0, 15.0)
    assert all(isinstance(v, float) for v in first.boxes[0])
    assert (first.width, first.height) == (50, 40)
    assert first.path == tmp_path / "VOC2007" / "JPEGImages" / "000009.jpg"
    assert first.extra == {"file": "JPEGImages/000009.jpg", "classes": ["dog", "cat"],
                           "annotation": str(tmp_path / "VOC2007" / "Annotations" / "000009.xml")}
    assert index.name == "voc07" and index.split == "trainval"
    assert index.root == tmp_path / "VOC2007"


def test_voc_float_coordinates(tmp_path: Path) -> None:
    standard_voc(tmp_path / "VOC2007")
    record = load_voc(tmp_path, 2007).records[2]
    # int(float(text)): "273.0" -> 273, "12.5" -> 12 (LOST's int() would reject both).
    assert record.boxes == ((272.0, 11.0, 300.0, 30.0),)
    assert (record.width, record.height) == (500, 375)


def test_voc_no_hard_drops_objects_then_empty_images(tmp_path: Path) -> None:
    standard_voc(tmp_path / "VOC2007")
    index = load_voc(tmp_path, 2007, no_hard=True)
    assert index.no_hard
    assert [r.image_id for r in index.records] == ["000009", "000007"]  # 000005: only difficult
    assert index.records[0].boxes == ((0.0, 0.0, 50.0, 40.0),)  # truncated cat dropped
    assert index.records[0].extra["classes"] == ["dog"]


def test_voc_image_without_objects_is_kept(tmp_path: Path) -> None:
    make_voc(tmp_path / "VOC2007", {"a": _xml([]), "b": _xml([_obj("x", (1, 1, 2, 2))])})
    assert [len(r.boxes) for r in load_voc(tmp_path, 2007).records] == [0, 1]
    assert [r.image_id for r in load_voc(tmp_path, 2007, no_hard=True).records] == ["b"]


@pytest.mark.parametrize("year", [2007, 2012])
def test_voc_devkit_layout(tmp_path: Path, year: int) -> None:
    standard_voc(tmp_path / "VOCdevkit" / f"VOC{year}")
    index = load_voc(tmp_path, year)
    assert len(index) == 3
    assert index.root == tmp_path / "VOCdevkit" / f"VOC{year}"
    assert index.records[0].path == index.root / "JPEGImages" / "000009.jpg"


def test_voc_missing_split_file(tmp_path: Path) -> None:
    folder = standard_voc(tmp_path / "VOC2007")
    split = folder / "ImageSets" / "Main" / "trainval.txt"
    split.unlink()
    with pytest.raises(LostregError, match="trainval.txt: split file not found") as info:
        load_voc(tmp_path, 2007)
    assert str(split) in str(info.value)


def test_voc_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(LostregError, match="no VOC2012 folder"):
        load_voc(tmp_path, 2012)


def test_voc_missing_xml(tmp_path: Path) -> None:
    folder = standard_voc(tmp_path / "VOC2007")
    (folder / "Annotations" / "000005.xml").unlink()
    with pytest.raises(LostregError, match="000005.xml: annotation file not found"):
        load_voc(tmp_path, 2007)


def test_voc_bad_xml(tmp_path: Path) -> None:
    make_voc(tmp_path / "VOC2007", {"a": "<annotation><size>"})
    with pytest.raises(LostregError, match=r"a\.xml: cannot parse XML"):
        load_voc(tmp_path, 2007)


def test_voc_missing_bndbox_and_coordinate(tmp_path: Path) -> None:
    no_box = "<object><name>dog</name></object>"
    make_voc(tmp_path / "A" / "VOC2007", {"a": _xml([no_box])})
    with pytest.raises(LostregError, match=r"a\.xml: object 0 \(dog\) has no <bndbox>"):
        load_voc(tmp_path / "A", 2007)
    partial = "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax>"
    partial += "</bndbox></object>"
    make_voc(tmp_path / "B" / "VOC2007", {"b": _xml([_obj("x", (1, 1, 2, 2)), partial])})
    with pytest.raises(LostregError, match=r"b\.xml: object 1 \(cat\) has no bndbox/ymax"):
        load_voc(tmp_path / "B", 2007)
    bad = _obj("cow", ("one", 1, 2, 2))
    make_voc(tmp_path / "C" / "VOC2007", {"c": _xml([bad])})
    with pytest.raises(LostregError, match=r"c\.xml: .*xmin is 'one', not a number"):
        load_voc(tmp_path / "C", 2007)


def test_voc_missing_size_falls_back_to_image(tmp_path: Path) -> None:
    xml = f"<annotation>{_obj('x', (1, 1, 2, 2))}</annotation>"
    folder = make_voc(tmp_path / "VOC2007", {"a": xml}, images=True)
    record = load_voc(tmp_path, 2007).records[0]
    assert (record.width, record.height) == (50, 40)
    (folder / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(LostregError, match=r"a\.xml: no usable <size> and the image .* missing"):
        load_voc(tmp_path, 2007)


def test_voc_filename_element(tmp_path: Path) -> None:
    make_voc(
        tmp_path / "VOC2007",
        {
            "a": _xml([], filename="a.png"),  # same id, other extension: used
            "b": _xml([], filename="zzz.jpg"),  # names another image: ignored, like LOST
            "c": _xml([]),
        },
    )
    files = [r.extra["file"] for r in load_voc(tmp_path, 2007).records]
    assert files == ["JPEGImages/a.png", "JPEGImages/b.jpg", "JPEGImages/c.jpg"]
    make_voc(tmp_path / "X" / "VOC2007", {"d": _xml([], filename="../d.jpg")})
    with pytest.raises(LostregError, match=r"d\.xml: <filename> '\.\./d\.jpg'"):
        load_voc(tmp_path / "X", 2007)


def test_voc_duplicate_id_in_split(tmp_path: Path) -> None:
    folder = standard_voc(tmp_path / "VOC2007")
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("000009\n000005\n000009\n")
    with pytest.raises(LostregError, match="line 3: image id '000009' listed twice"):
        load_voc(tmp_path, 2007)


def test_voc_index_is_fast(tmp_path: Path) -> None:
    xml = _xml([_obj("dog", (1, 2, 30, 40)), _obj("cat", (5, 5, 9, 9), 1, 1)])
    make_voc(tmp_path / "VOC2012", {f"{i:06d}": xml for i in range(1500)})
    start = time.process_time()  # CPU time: other processes on a busy machine do not count
    index = load_voc(tmp_path, 2012)
    assert len(index) == 1500
    assert time.process_time() - start < 3.0  # ~0.2 ms per XML in practice


# ---------------------------------------------------------------------------------------- COCO


def _coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def make_coco(root: Path, listed: list[int], annotations: list[dict], images: list[dict]) -> Path:
    folder = root / "COCO"
    (folder / "images" / "train2014").mkdir(parents=True)
    (folder / "annotations").mkdir()
    payload = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }
    (folder / "annotations" / "instances_train2014.json").write_text(json.dumps(payload))
    lines = "".join(f"train2014/{_coco_name(i)}\n" for i in listed)
    (folder / "coco_20k_filenames.txt").write_text(lines)
    for image in images[:2]:
        Image.new("RGB", (image["width"], image["height"])).save(
            folder / "images" / "train2014" / image["file_name"]
        )
    return folder


def _image(image_id: int, width: int = 64, height: int = 48) -> dict:
    return {"id": image_id, "file_name": _coco_name(image_id), "width": width, "height": height}


def _ann(ann_id: int, image_id: int, bbox: list[float], iscrowd: int = 0, cat: int = 1) -> dict:
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "iscrowd": iscrowd,
            "category_id": cat, "area": bbox[2] * bbox[3]}


def standard_coco(root: Path) -> Path:
    images = [_image(9), _image(25, 80, 60), _image(30), _image(42)]
    annotations = [
        _ann(1, 9, [0.5, 1.5, 2.0, 1.0]),  # -> x1=0, y1=2, x2=round(2.5)=2, y2=round(2.5)=2
        _ann(2, 25, [10.0, 10.0, 5.0, 5.0], iscrowd=1),  # crowd: removed
        _ann(3, 25, [2.5, 3.5, 10.0, 20.0], cat=2),  # -> 2, 4, 12, 24
        _ann(4, 30, [1.0, 1.0, 3.0, 3.0], iscrowd=1),  # only a crowd: image kept, no box
        _ann(5, 9, [4.4, 4.6, 10.0, 10.0]),  # -> 4, 5, 14, 15
        _ann(6, 42, [0, 0, 1, 1]),  # 42 is not listed
    ]
    return make_coco(root, [25, 9, 30], annotations, images)


def test_coco_boxes_crowds_rounding_and_order(tmp_path: Path) -> None:
    folder = standard_coco(tmp_path)
    index = load_coco20k(tmp_path)
    assert [r.image_id for r in index.records] == ["25", "9", "30"]  # list order
    by_id = {r.image_id: r for r in index.records}
    assert by_id["9"].boxes == ((0.0, 2.0, 2.0, 2.0), (4.0, 5.0, 14.0, 15.0))
    assert by_id["25"].boxes == ((2.0, 4.0, 12.0, 24.0),)  # crowd removed
    assert by_id["25"].extra["classes"] == ["dog"]
    assert by_id["25"].extra["category_ids"] == [2]
    assert by_id["30"].boxes == ()  # kept: counted, can never be a hit
    assert (by_id["25"].width, by_id["25"].height) == (80, 60)
    assert by_id["9"].path == folder / "images" / "train2014" / _coco_name(9)
    assert by_id["9"].extra["file"] == f"images/train2014/{_coco_name(9)}"
    assert index.root == folder and index.name == "coco20k"
    assert all(isinstance(v, float) for r in index.records for b in r.boxes for v in b)


def test_coco_rounding_is_half_to_even(tmp_path: Path) -> None:
    make_coco(
        tmp_path, [1],
        [_ann(1, 1, [0.5, 1.5, 2.0, 1.0]), _ann(2, 1, [2.5, 3.5, 0.0, 0.0])],
        [_image(1)],
    )
    boxes = load_coco20k(tmp_path).records[0].boxes
    assert boxes == ((0.0, 2.0, 2.0, 2.0), (2.0, 4.0, 2.0, 4.0))
    assert [round(v) for v in (0.5, 1.5, 2.5, 3.5)] == [0, 2, 2, 4]


def test_coco_no_hard_drops_images_without_boxes(tmp_path: Path) -> None:
    standard_coco(tmp_path)
    index = load_coco20k(tmp_path, no_hard=True)
    assert [r.image_id for r in index.records] == ["25", "9"]
    assert index.no_hard


def test_coco_cache_built_once_and_invalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lostreg.datasets.coco as coco

    folder = standard_coco(tmp_path)
    calls: list[int] = []
    real_select = coco.select_coco20k

    def counting_select(*args: object) -> list[dict]:
        calls.append(1)
        return real_select(*args)

    monkeypatch.setattr(coco, "select_coco20k", counting_select)
    first = load_coco20k(tmp_path)
    cache = folder / CACHE_NAME
    assert cache.is_file() and len(calls) == 1
    cached = json.loads(cache.read_bytes().splitlines()[0])
    ann_path = folder / "annotations" / "instances_train2014.json"
    assert cached["list_sha256"] == hashlib.sha256(
        (folder / "coco_20k_filenames.txt").read_bytes()
    ).hexdigest()
    assert cached["annotation_sha256"] == hashlib.sha256(ann_path.read_bytes()).hexdigest()

    second = load_coco20k(tmp_path)
    assert len(calls) == 1  # read from the cache
    assert second.records == first.records
    assert [r.extra for r in second.records] == [r.extra for r in first.records]

    # A changed list invalidates the cache.
    (folder / "coco_20k_filenames.txt").write_text(f"train2014/{_coco_name(9)}\n")
    assert [r.image_id for r in load_coco20k(tmp_path).records] == ["9"]
    assert len(calls) == 2

    # So does a changed annotation file.
    payload = json.loads(ann_path.read_text())
    payload["annotations"][0]["bbox"] = [1.0, 1.0, 1.0, 1.0]
    ann_path.write_text(json.dumps(payload, indent=1))
    assert load_coco20k(tmp_path).records[0].boxes[0] == (1.0, 1.0, 2.0, 2.0)
    assert len(calls) == 3
    # A new mtime with the same content is not a change: the sha256 decides.
    stat = ann_path.stat()
    os.utime(ann_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_coco20k(tmp_path)
    assert len(calls) == 3

    # A corrupt cache is rebuilt, not trusted.
    cache.write_text("{not json")
    load_coco20k(tmp_path)
    assert len(calls) == 4


def test_coco_escaping_file_names_refused(tmp_path: Path) -> None:
    folder = standard_coco(tmp_path)
    list_path = folder / "coco_20k_filenames.txt"
    for entry in ("../secret.jpg", "/etc/passwd", "train2014/../../x.jpg", "a/b.jpg", "..",
                  "train2014\\x.jpg"):
        list_path.write_text(f"train2014/{_coco_name(9)}\n{entry}\n")
        with pytest.raises(LostregError, match="line 2: .* is not a file name inside train2014"):
            load_coco20k(tmp_path)

    ann_path = folder / "annotations" / "instances_train2014.json"
    list_path.write_text(f"train2014/{_coco_name(9)}\n")
    for bad in ("../../evil.jpg", "/abs/path.jpg", "sub/dir.jpg"):
        payload = json.loads(ann_path.read_text())
        payload["images"][1]["file_name"] = bad
        ann_path.write_text(json.dumps(payload))
        with pytest.raises(LostregError, match="not a plain file name") as info:
            load_coco20k(tmp_path)
        assert bad in str(info.value) and str(ann_path) in str(info.value)


def test_coco_errors_name_the_file(tmp_path: Path) -> None:
    folder = standard_coco(tmp_path)
    list_path = folder / "coco_20k_filenames.txt"
    list_path.write_text(f"train2014/{_coco_name(777)}\n")
    with pytest.raises(LostregError, match="is not an image of"):
        load_coco20k(tmp_path)
    list_path.write_text(f"train2014/{_coco_name(9)}\ntrain2014/{_coco_name(9)}\n")
    with pytest.raises(LostregError, match="listed twice"):
        load_coco20k(tmp_path)
    list_path.write_text(f"train2014/{_coco_name(9)}\n")
    with pytest.raises(LostregError, match="not the published COCO 20k list"):
        load_coco20k(tmp_path, list_sha256=COCO20K_LIST_SHA256)
    ann_path = folder / "annotations" / "instances_train2014.json"
    ann_path.write_text("{broken")
    with pytest.raises(LostregError, match="cannot read COCO annotations") as info:
        load_coco20k(tmp_path)
    assert str(ann_path) in str(info.value)
    ann_path.unlink()
    with pytest.raises(LostregError, match="annotation file not found"):
        load_coco20k(tmp_path)


def test_coco_build_is_linear_on_a_larger_file(tmp_path: Path) -> None:
    n_images = 20000
    images = [_image(i) for i in range(1, n_images + 1)]
    annotations = [_ann(k, 1 + k % n_images, [1.0, 2.0, 3.0, 4.0]) for k in range(80000)]
    make_coco(tmp_path, list(range(n_images, 0, -2)), annotations, images[:2] + images[2:])
    start = time.process_time()  # CPU time: other processes on a busy machine do not count
    index = load_coco20k(tmp_path)
    assert len(index) == n_images // 2
    assert time.process_time() - start < 8.0  # ~2 s; quadratic matching would take minutes


@pytest.mark.skipif(not SHARED_LIST.is_file(), reason="shared COCO 20k list not available")
def test_real_coco20k_list() -> None:
    data = SHARED_LIST.read_bytes()
    assert data.count(b"\n") == 19817
    assert hashlib.sha256(data).hexdigest() == COCO20K_LIST_SHA256
    names = read_coco20k_list(SHARED_LIST)
    assert len(names) == len(set(names)) == 19817 == DATASETS["coco20k"].expected_images
    assert all(n.startswith("COCO_train2014_") and n.endswith(".jpg") for n in names)


# ---------------------------------------------------------------------------------------- demo


def test_demo_generation_is_deterministic(tmp_path: Path) -> None:
    generate_demo(tmp_path / "a")
    generate_demo(tmp_path / "b")

    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
        }

    first = digest(demo_folder(tmp_path / "a"))
    assert first == digest(demo_folder(tmp_path / "b"))
    assert len([k for k in first if k.startswith("JPEGImages")]) == 24
    assert not [p for p in (tmp_path / "a").iterdir() if p.name != "demo"]  # no temp left
    other = make_demo_scenes(DEMO_SEED + 1)
    assert [s.boxes for s in other] != [s.boxes for s in make_demo_scenes()]


def test_demo_round_trip_boxes_and_properties(tmp_path: Path) -> None:
    generate_demo(tmp_path)
    scenes = make_demo_scenes()
    index = load_demo(tmp_path)
    assert index.name == "demo" and len(index) == len(scenes) == 24
    sizes = []
    for scene, record in zip(scenes, index.records, strict=True):
        assert record.image_id == scene.image_id
        assert record.boxes == scene.boxes  # exact: VOC 1-based written, -1 read back
        assert 1 <= len(record.boxes) <= 2
        assert record.extra["classes"] == list(scene.classes)
        assert (record.width, record.height) == scene.image.size
        rgb = load_rgb(record.path)
        assert rgb.mode == "RGB" and rgb.size == (record.width, record.height)
        for x1, y1, x2, y2 in record.boxes:
            assert 0 <= x1 < x2 <= record.width and 0 <= y1 < y2 <= record.height
        sizes.append(scene.image.size)
    assert min(min(s) for s in sizes) < 16  # a side smaller than one ViT patch
    assert all(60 <= v <= 200 for s in sizes if min(s) >= 16 for v in s)
    assert max(sizes.count(s) for s in sizes) >= 3  # batching groups equal sizes
    modes = {Image.open(r.path).mode for r in index.records}
    assert {"RGB", "L", "P", "RGBA"} <= modes
    assert {Path(r.extra["file"]).suffix for r in index.records} == {".jpg", ".png"}

    # The drawn shapes are where the boxes say (lossless PNG: check the exact extent).
    for scene in scenes:
        if scene.image.mode != "RGBA":
            continue
        rgb = np.asarray(scene.image.convert("RGB")).astype(int)
        saturation = rgb.max(axis=2) - rgb.min(axis=2)
        for x1, y1, x2, y2 in scene.boxes:
            inside = saturation[int(y1):int(y2), int(x1):int(x2)]
            assert inside.max() > 100

    hard_free = load_demo(tmp_path, no_hard=True)
    assert sum(len(r.boxes) for r in hard_free.records) < sum(len(r.boxes) for r in index.records)


def test_demo_regenerates_only_when_needed(tmp_path: Path) -> None:
    folder = generate_demo(tmp_path)
    assert demo_is_present(tmp_path)
    stamp = (folder / "ImageSets" / "Main" / "trainval.txt").stat().st_mtime_ns
    generate_demo(tmp_path)
    assert (folder / "ImageSets" / "Main" / "trainval.txt").stat().st_mtime_ns == stamp
    (folder / ".lostreg-demo").write_text("lostreg demo version 0 seed 1\n")  # older version
    assert not demo_is_present(tmp_path)
    generate_demo(tmp_path)
    assert demo_is_present(tmp_path)
    foreign = tmp_path / "other"
    (foreign / "demo").mkdir(parents=True)
    (foreign / "demo" / "mine.txt").write_text("user data")
    with pytest.raises(LostregError, match="exists but is not a generated demo"):
        generate_demo(foreign)
    assert (foreign / "demo" / "mine.txt").is_file()


def test_a_linked_demo_of_another_version_is_one_line_and_kept(tmp_path: Path) -> None:
    """``ROOT/demo`` a link to a demo of an older generator: ``rmtree`` refused the link with
    "OSError: Cannot call rmtree on a symbolic link", naming no file."""
    real = generate_demo(tmp_path / "elsewhere")
    (real / ".lostreg-demo").write_text("lostreg demo version 0 seed 1\n")  # older version
    before = sorted(path.name for path in real.rglob("*"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(real, target_is_directory=True)
    with pytest.raises(LostregError) as info:
        generate_demo(tmp_path / "data")
    assert str(info.value) == (f"{tmp_path / 'data' / 'demo'}: is a symbolic link to a demo of "
                               "another version or seed; remove the link to regenerate the demo "
                               "here")
    assert sorted(path.name for path in real.rglob("*")) == before


def test_demo_is_voc_readable(tmp_path: Path) -> None:
    folder = generate_demo(tmp_path)
    assert load_voc_folder(folder, "x").records == load_demo(tmp_path).records


# ------------------------------------------------------------------------------------ registry


def test_registry_specs() -> None:
    assert set(DATASETS) == {"voc07", "voc12", "coco20k", "demo", "ecssd", "duts_te", "dut_omron"}
    assert [DATASETS[n].expected_images for n in ("voc07", "voc12", "coco20k", "demo")] == [
        5011, 11540, 19817, None
    ]
    assert get_dataset("voc07").title == "PASCAL VOC 2007"
    assert get_dataset("voc12").split == "trainval"
    assert all(spec.download is not None for spec in DATASETS.values())


def test_get_dataset_unknown_name() -> None:
    with pytest.raises(LostregError, match="did you mean voc07"):
        get_dataset("voc7")
    with pytest.raises(LostregError, match="known: voc07, voc12, coco20k, demo"):
        get_dataset("imagenet")


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOSTREG_DATA", raising=False)
    assert default_data_root() == Path("datasets")
    monkeypatch.setenv("LOSTREG_DATA", str(tmp_path))
    assert default_data_root() == tmp_path


def test_load_dataset_missing_data(tmp_path: Path) -> None:
    with pytest.raises(LostregError, match="python -m lostreg.datasets download voc07") as info:
        load_dataset("voc07", tmp_path, download=False)
    assert "--no-download" in str(info.value) and str(tmp_path) in str(info.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(LostregError, match="data root does not exist") as info:
        load_dataset("coco20k", missing, download=False)
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_load_dataset_demo_generates(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    with pytest.raises(LostregError):
        load_dataset("demo", root, download=False)
    index = load_dataset("demo", root)
    assert len(index) == 24 and demo_is_present(root)
    assert load_dataset("demo", str(root), no_hard=True, download=False).no_hard


def test_load_dataset_voc(tmp_path: Path) -> None:
    standard_voc(tmp_path / "VOCdevkit" / "VOC2012")
    index = load_dataset("voc12", tmp_path, download=False)
    assert index.name == "voc12" and len(index) == 3
    assert len(load_dataset("voc12", tmp_path, no_hard=True, download=False)) == 2


# ----------------------------------------------------------------------------------------- CLI


def test_cli_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    standard_voc(tmp_path / "VOC2007")
    assert datasets_main(["info", "voc07", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "images: 3 (expected 5011)" in out and "objects: 4" in out
    assert "boxes clipped to their image: 0, zero-area boxes: 0" in out
    assert datasets_main(["info", "demo", "--data-root", str(tmp_path), "--download"]) == 0
    assert "images: 24" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert datasets_main(["info", "voc12", "--data-root", str(tmp_path / "none")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert datasets_main(["download", "vocc07", "--data-root", str(tmp_path)]) == 2
    assert "did you mean voc07" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lostreg.datasets", "info", "coco20k", "--data-root",
         str(tmp_path / "none")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    result = subprocess.run(
        [sys.executable, "-m", "lostreg.datasets", "download", "demo", "--data-root",
         str(tmp_path / "d")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 0 and demo_is_present(tmp_path / "d")

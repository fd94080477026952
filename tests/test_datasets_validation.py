"""Ground truth is validated where it is parsed (issue 14): one line naming the file and the
object for a box no image can have, clipped-and-counted boxes outside the image, zero-area
boxes kept and counted, COCO files of the wrong shape refused, and the size check a run makes
when it decodes an image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_datasets import _ann, _image, _obj, _xml, make_coco, make_voc

from lostreg.datasets.base import (
    CHECK_NAMES,
    OUTSIDE_TOLERANCE,
    DataChecks,
    ImageRecord,
    checked_box,
)
from lostreg.datasets.coco import load_coco20k
from lostreg.datasets.voc import load_voc
from lostreg.errors import LostregError

# ----------------------------------------------------------------------------------- the rule


def test_checked_box_rule_on_hand_computed_cases() -> None:
    w, h = 50, 40
    assert checked_box((0, 0, 50, 40), w, h, "f", "b") == ((0.0, 0.0, 50.0, 40.0), False)
    # up to a pixel outside (VOC's xmin=0 -> -1, xmax=W+1): kept as LOST keeps it
    assert checked_box((-1, -1, 51, 41), w, h, "f", "b") == ((-1.0, -1.0, 51.0, 41.0), False)
    # more than a pixel outside: every coordinate clamped to the image
    assert checked_box((-1.5, 3, 20, 30), w, h, "f", "b") == ((0.0, 3.0, 20.0, 30.0), True)
    assert checked_box((5, 5, 51.5, 60), w, h, "f", "b") == ((5.0, 5.0, 50.0, 40.0), True)
    assert checked_box((0, 0, 1e300, 1e300), w, h, "f", "b") == ((0.0, 0.0, 50.0, 40.0), True)
    # wholly outside: clipped onto the border, where it has no area left
    assert checked_box((100, 5, 120, 9), w, h, "f", "b") == ((50.0, 5.0, 50.0, 9.0), True)
    # zero area is not an error
    assert checked_box((4, 4, 4, 9), w, h, "f", "b") == ((4.0, 4.0, 4.0, 9.0), False)
    with pytest.raises(LostregError, match=r"^f: b is inverted"):
        checked_box((10, 0, 9.5, 5), w, h, "f", "b")
    with pytest.raises(LostregError, match=r"^f: b is inverted"):
        checked_box((0, 10, 5, 2), w, h, "f", "b")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(LostregError, match=r"^f: b is not finite"):
            checked_box((0, 0, bad, 5), w, h, "f", "b")
    assert OUTSIDE_TOLERANCE == 1.0


# ----------------------------------------------------------------------------------------- VOC


def test_voc_inverted_box_names_the_file_and_the_object(tmp_path: Path) -> None:
    make_voc(tmp_path / "VOC2007", {"a": _xml([_obj("dog", (1, 1, 9, 9)),
                                               _obj("cat", (30, 5, 10, 15))])})
    with pytest.raises(LostregError) as info:
        load_voc(tmp_path, 2007)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "VOC2007" / "Annotations" / "a.xml") + ": ")
    assert "object 1 (cat)" in message and "xmin 30" in message and "xmax 10" in message
    assert "inverted" in message and "\n" not in message
    make_voc(tmp_path / "B" / "VOC2007", {"b": _xml([_obj("cow", (1, 30, 9, 5))])})
    with pytest.raises(LostregError, match=r"b\.xml: object 0 \(cow\): bndbox .* is inverted"):
        load_voc(tmp_path / "B", 2007)


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400"])
def test_voc_non_finite_coordinate_is_an_error(tmp_path: Path, text: str) -> None:
    make_voc(tmp_path / "VOC2007", {"a": _xml([_obj("dog", (1, 1, text, 9))])})
    with pytest.raises(LostregError,
                       match=rf"a\.xml: object 0 \(dog\) bndbox/xmax is '{text}', not a finite"):
        load_voc(tmp_path, 2007)


def test_voc_boxes_outside_the_image_are_clipped_and_counted(tmp_path: Path) -> None:
    objects = [
        _obj("inside", (1, 1, 50, 40)),  # [0, 0, 50, 40]: the whole image
        _obj("slack", (0, 0, 51, 41)),  # [-1, -1, 51, 41]: within a pixel, kept as is
        _obj("huge", (1, 1, "1e300", 20)),  # 1e300: clipped to the width
        _obj("negative", (-5, 2, 10, 12)),  # [-6, 1, 10, 12]: clipped at 0
        _obj("away", (101, 5, 120, 9)),  # wholly right of the image: clipped to zero width
    ]
    make_voc(tmp_path / "VOC2007", {"a": _xml([_obj("ok", (2, 2, 9, 9))]), "b": _xml(objects)})
    index = load_voc(tmp_path, 2007)
    assert index.records[1].boxes == (
        (0.0, 0.0, 50.0, 40.0), (-1.0, -1.0, 51.0, 41.0), (0.0, 0.0, 50.0, 20.0),
        (0.0, 1.0, 10.0, 12.0), (50.0, 4.0, 50.0, 9.0),
    )
    assert index.checks == {"boxes_clipped": 3, "zero_area_boxes": 1}
    xml_b = tmp_path / "VOC2007" / "Annotations" / "b.xml"
    assert index.check_examples == {"boxes_clipped": f"{xml_b}: object 2 (huge)",
                                    "zero_area_boxes": f"{xml_b}: object 4 (away)"}
    assert index.records[0].extra.get("clipped") is None  # a clean record carries nothing
    # The same counts from the stored index on the next load (the notes are part of it).
    again = load_voc(tmp_path, 2007)
    assert again.checks == index.checks and again.check_examples == index.check_examples


def test_voc_zero_area_box_is_kept_and_counted(tmp_path: Path) -> None:
    # xmin = xmax + 1 is an empty box in VOC's inclusive pixels; LOST's xmin - 1 keeps it.
    make_voc(tmp_path / "VOC2007", {"a": _xml([_obj("dot", (5, 3, 4, 9)), _obj("x", (1, 1, 3, 3))])})
    index = load_voc(tmp_path, 2007)
    assert index.records[0].boxes == ((4.0, 2.0, 4.0, 9.0), (0.0, 0.0, 3.0, 3.0))
    assert index.checks == {"boxes_clipped": 0, "zero_area_boxes": 1}
    assert index.check_examples["zero_area_boxes"].endswith("a.xml: object 0 (dot)")


def test_voc_no_hard_counts_only_the_boxes_it_keeps(tmp_path: Path) -> None:
    objects = [_obj("kept", (1, 1, 80, 9)), _obj("hard", (1, 1, 90, 9), difficult=1)]
    make_voc(tmp_path / "VOC2007", {"a": _xml(objects)})
    assert load_voc(tmp_path, 2007).checks["boxes_clipped"] == 2
    assert load_voc(tmp_path, 2007, no_hard=True).checks["boxes_clipped"] == 1


# ---------------------------------------------------------------------------------------- COCO


def _coco(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    return make_coco(tmp_path, [1], annotations, images or [_image(1)])


def test_coco_zero_area_boxes_are_kept_and_counted(tmp_path: Path) -> None:
    _coco(tmp_path, [_ann(1, 1, [3.0, 4.0, 0.0, 5.0]),  # zero width
                     _ann(2, 1, [10.2, 4.0, 0.2, 5.0]),  # zero width after rounding, like LOST
                     _ann(3, 1, [1.0, 1.0, 2.0, 2.0])])
    index = load_coco20k(tmp_path)
    assert index.records[0].boxes == ((3.0, 4.0, 3.0, 9.0), (10.0, 4.0, 10.0, 9.0),
                                      (1.0, 1.0, 3.0, 3.0))
    assert index.checks == {"boxes_clipped": 0, "zero_area_boxes": 2}
    ann_path = tmp_path / "COCO" / "annotations" / "instances_train2014.json"
    assert index.check_examples["zero_area_boxes"] == f"{ann_path}: annotation 1 (image 1)"


def test_coco_boxes_outside_the_image_are_clipped_and_counted(tmp_path: Path) -> None:
    # image 64x48; the rounding overshoot of a pixel is kept, more is clipped
    _coco(tmp_path, [_ann(1, 1, [-0.6, 0.0, 65.0, 48.6]),  # [-1, 0, 64, 49]: kept
                     _ann(2, 1, [-10.0, 5.0, 20.0, 10.0]),  # x1 = -10: clipped
                     # absurd: clipped to the image (its area, w * h, would overflow to
                     # Infinity, which is not JSON: given as a number)
                     {**_ann(3, 1, [0.0, 0.0, 1e300, 1e300]), "area": 1e300}])
    index = load_coco20k(tmp_path)
    assert index.records[0].boxes == ((-1.0, 0.0, 64.0, 49.0), (0.0, 5.0, 10.0, 15.0),
                                      (0.0, 0.0, 64.0, 48.0))
    assert index.checks == {"boxes_clipped": 2, "zero_area_boxes": 0}
    assert index.check_examples["boxes_clipped"].endswith(": annotation 2 (image 1)")


@pytest.mark.parametrize("key", ["images", "annotations"])
def test_coco_file_without_images_or_annotations_is_an_error(tmp_path: Path, key: str) -> None:
    folder = _coco(tmp_path, [_ann(1, 1, [1.0, 1.0, 2.0, 2.0])])
    ann_path = folder / "annotations" / "instances_train2014.json"
    payload = json.loads(ann_path.read_text())
    del payload[key]
    ann_path.write_text(json.dumps(payload))
    with pytest.raises(LostregError, match=rf"not COCO annotations: '{key}' must be a list "
                                           r"\(missing\)") as info:
        load_coco20k(tmp_path)
    assert str(info.value).startswith(f"{ann_path}: ")
    payload[key] = {"1": {}}
    ann_path.write_text(json.dumps(payload))
    with pytest.raises(LostregError, match=rf"'{key}' must be a list \(dict\)"):
        load_coco20k(tmp_path)


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("iscrowd", "1", r"annotation 1 \(image 1\) has iscrowd '1', expected 0 or 1"),
    ("iscrowd", True, r"annotation 1 \(image 1\) has iscrowd True, expected 0 or 1"),
    ("iscrowd", 2, r"has iscrowd 2, expected 0 or 1"),
    ("iscrowd", None, r"has iscrowd None, expected 0 or 1"),
    ("bbox", ["1", "2", "3", "4"], r"annotation 1 \(image 1\) has bbox \['1', '2', '3', '4'\], "
                                   r"expected \[x, y, w, h\] \(4 numbers\)"),
    ("bbox", [1.0, 2.0, 3.0], r"has bbox \[1\.0, 2\.0, 3\.0\], expected \[x, y, w, h\]"),
    ("bbox", [1, 2, True, 4], r"has bbox \[1, 2, True, 4\], expected"),
    ("bbox", "1 2 3 4", r"has bbox '1 2 3 4', expected"),
    ("bbox", [1.0, 2.0, -3.0, 4.0], r"annotation 1 \(image 1\): bbox \[1\.0, 2\.0, -3\.0, 4\.0\] "
                                    r"is inverted \(negative width or height\)"),
    # NaN and Infinity are not JSON (issue 20 row 11): the file is refused as it is parsed
    ("bbox", [1.0, math.nan, 3.0, 4.0], r"cannot read COCO annotations \(NaN is not JSON"),
    ("bbox", [1.0, 2.0, math.inf, 4.0], r"cannot read COCO annotations \(Infinity is not JSON"),
    ("bbox", [1e308, 2.0, 1e308, 4.0], r"bbox .* is not finite"),  # x + w overflows
    ("category_id", "1", r"annotation 1 \(image 1\) has category_id '1', expected an integer"),
])
def test_coco_wrong_types_are_one_line_errors(tmp_path: Path, field: str, value: object,
                                              needle: str) -> None:
    annotation = _ann(1, 1, [1.0, 1.0, 2.0, 2.0])
    if value is None:
        del annotation[field]
    else:
        annotation[field] = value
    folder = _coco(tmp_path, [annotation])
    with pytest.raises(LostregError, match=needle) as info:
        load_coco20k(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{folder / 'annotations' / 'instances_train2014.json'}: ")
    assert "\n" not in message


def test_coco_a_crowd_is_skipped_before_its_box_is_read(tmp_path: Path) -> None:
    # LOST drops crowds first: a crowd's odd box (RLE-era files) is not an error.
    _coco(tmp_path, [_ann(1, 1, [1.0, 1.0, 2.0, 2.0]), {**_ann(2, 1, [0, 0, 1, 1], iscrowd=1),
                                                        "bbox": None}])
    assert load_coco20k(tmp_path).records[0].boxes == ((1.0, 1.0, 3.0, 3.0),)


@pytest.mark.parametrize(("images", "needle"), [
    ([{**_image(1), "width": "64"}], r"image 1 has width '64' and height 48, expected positive"),
    ([{**_image(1), "height": 0}], r"image 1 has width 64 and height 0, expected positive"),
    ([_image(1), {**_image(1), "file_name": "other.jpg"}], r"image 1 \(other\.jpg\) appears twice"),
    ([{**_image(1), "id": "1"}], r"images\[0\] has no integer id"),
])
def test_coco_bad_images_are_one_line_errors(tmp_path: Path, images: list[dict],
                                             needle: str) -> None:
    make_coco(tmp_path, [], [], [])
    ann_path = tmp_path / "COCO" / "annotations" / "instances_train2014.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    (tmp_path / "COCO" / "coco_20k_filenames.txt").write_text(
        f"train2014/{_image(1)['file_name']}\n")
    with pytest.raises(LostregError, match=needle):
        load_coco20k(tmp_path)


def test_coco_annotation_without_an_image_id_is_an_error(tmp_path: Path) -> None:
    _coco(tmp_path, [_ann(1, 1, [1.0, 1.0, 2.0, 2.0]), {"id": 7, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(LostregError, match=r"annotations\[1\] has no integer image_id"):
        load_coco20k(tmp_path)


# ------------------------------------------------------------------------- checks of one run


def _record(image_id: str, width: int = 50, height: int = 40, **extra: object) -> ImageRecord:
    return ImageRecord(image_id, Path(f"/data/JPEGImages/{image_id}.jpg"), width, height, (),
                       {"annotation": f"/data/Annotations/{image_id}.xml", **extra})


def test_data_checks_count_a_run_and_name_the_first_case() -> None:
    records = [_record("a"), _record("b", clipped=["object 2 (dog)", "object 3 (cat)"]),
               _record("c", zero_area=["object 0 (dot)"], clipped=["object 1 (x)"])]
    checks = DataChecks.of_records(records)
    assert checks.counts == {"boxes_clipped": 3, "zero_area_boxes": 1, "image_size_mismatch": 0}
    assert checks.first == {"boxes_clipped": "/data/Annotations/b.xml: object 2 (dog)",
                            "zero_area_boxes": "/data/Annotations/c.xml: object 0 (dot)"}
    # --limit: only the records the run evaluates count
    assert DataChecks.of_records(records[:1]).counts["boxes_clipped"] == 0

    assert not checks.check_decoded_size(records[0], 40, 50)  # (height, width) as annotated
    assert checks.check_decoded_size(records[1], 64, 96)
    assert checks.check_decoded_size(records[2], 50, 40)  # transposed is a mismatch too
    assert checks.counts["image_size_mismatch"] == 2
    assert checks.first["image_size_mismatch"] == (
        "/data/Annotations/b.xml: annotated 50x40, image /data/JPEGImages/b.jpg is 96x64")

    warnings = checks.warnings("voc07")
    assert len(warnings) == 3 and all(w.startswith("warning: voc07: ") for w in warnings)
    assert "3 ground-truth box(es) reached more than a pixel outside" in warnings[0]
    assert warnings[2].endswith("first: " + checks.first["image_size_mismatch"])
    assert all("\n" not in w for w in warnings)
    payload = checks.to_json()
    assert [k for k in payload if k != "first"] == list(CHECK_NAMES)
    assert payload["image_size_mismatch"] == 2 and json.loads(json.dumps(payload)) == payload
    assert DataChecks().warnings("demo") == []
    with pytest.raises(ValueError, match="unknown data check"):
        checks.add("nonsense", "x")


def test_xml_size_that_disagrees_with_the_image_is_found_at_decode(tmp_path: Path) -> None:
    # The XML says 500x375; the JPEG is 50x40 (make_voc writes 50x40 images).
    from lostreg.datasets.base import load_rgb

    make_voc(tmp_path / "VOC2007", {"a": _xml([_obj("x", (1, 1, 9, 9))], 500, 375),
                                    "b": _xml([_obj("y", (1, 1, 9, 9))])}, images=True)
    index = load_voc(tmp_path, 2007)
    checks = DataChecks.of_records(index.records)
    for record in index.records:
        width, height = load_rgb(record.path).size
        checks.check_decoded_size(record, height, width)
    assert checks.counts["image_size_mismatch"] == 1
    assert checks.first["image_size_mismatch"].startswith(
        f"{tmp_path / 'VOC2007' / 'Annotations' / 'a.xml'}: annotated 500x375, image ")
    assert checks.first["image_size_mismatch"].endswith("a.jpg is 50x40")


def test_info_command_reports_the_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lostreg.datasets.__main__ import main as datasets_main

    make_voc(tmp_path / "VOC2007", {"a": _xml([_obj("dog", (1, 1, 90, 9))])})
    assert datasets_main(["info", "voc07", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "boxes clipped to their image: 1, zero-area boxes: 0" in out
    assert f"first boxes_clipped: {tmp_path / 'VOC2007' / 'Annotations' / 'a.xml'}: object 0 (dog)" in out


def test_data_checks_of_a_run_come_from_its_prediction_lines() -> None:
    records = [_record("a", clipped=["object 0 (x)"]), _record("b"), _record("c")]
    lines = [{"image_id": "a", "width": 50, "height": 40},
             {"image_id": "b", "width": 96, "height": 64},  # decoded size differs
             {"image_id": "c", "width": "50", "height": 40},  # not validated here: skipped
             {"image_id": "zzz", "width": 1, "height": 1}]  # not a record of the run
    checks = DataChecks.of_run(records, lines)
    assert checks.counts == {"boxes_clipped": 1, "zero_area_boxes": 0, "image_size_mismatch": 1}
    assert checks.first["image_size_mismatch"].startswith("/data/Annotations/b.xml: annotated 50x40")

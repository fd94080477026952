"""Issue 18 item 8: COCO is read with pycocotools (its ``COCO`` index over lostreg's bounded
parse, silently), with lostreg's validation on top and the same records as before; COCO
segmentations decode to masks through ``pycocotools.mask``, checked before its C code sees
them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from test_datasets import _ann, _image, make_coco, standard_coco

from lostreg.datasets.coco import load_coco20k
from lostreg.datasets.masks import segmentation_mask
from lostreg.errors import LostregError


def test_coco20k_is_indexed_by_pycocotools_without_its_prints(tmp_path: Path, monkeypatch,
                                                              capsys) -> None:
    built: list[int] = []
    real = COCO.createIndex

    def counting(self) -> None:
        built.append(len(self.dataset["annotations"]))
        real(self)

    monkeypatch.setattr(COCO, "createIndex", counting)
    standard_coco(tmp_path)
    index = load_coco20k(tmp_path, use_cache=False)
    assert built == [6]  # one index over the already parsed file
    assert capsys.readouterr().out == ""  # no "creating index..." / "index created!"
    # LOST's boxes, crowds removed, list order (as tests/test_datasets.py checks in full)
    assert [r.image_id for r in index.records] == ["25", "9", "30"]
    assert [r.boxes for r in index.records] == [((2.0, 4.0, 12.0, 24.0),),
                                                ((0.0, 2.0, 2.0, 2.0), (4.0, 5.0, 14.0, 15.0)),
                                                ()]


def test_the_stored_index_reads_back_the_same_records(tmp_path: Path) -> None:
    standard_coco(tmp_path)
    built = load_coco20k(tmp_path)
    assert (tmp_path / "COCO" / "coco20k_index.json").is_file()
    assert load_coco20k(tmp_path).records == built.records == load_coco20k(
        tmp_path, use_cache=False).records


@pytest.mark.parametrize(("change", "needle"), [
    ({"id": None}, r"annotations\[0\] has no integer id"),
    ({"id": "1"}, r"annotations\[0\] has no integer id"),
    ({"category_id": [1]}, r"annotations\[0\] \(id 1\) has no category_id"),
])
def test_annotations_pycocotools_cannot_index_are_one_line(tmp_path: Path, change: dict,
                                                           needle: str) -> None:
    annotation = {**_ann(1, 1, [1.0, 1.0, 2.0, 2.0]), **change}
    annotation = {k: v for k, v in annotation.items() if v is not None}
    folder = make_coco(tmp_path, [1], [annotation], [_image(1)])
    with pytest.raises(LostregError, match=needle) as info:
        load_coco20k(tmp_path, use_cache=False)
    assert str(info.value).startswith(f"{folder / 'annotations' / 'instances_train2014.json'}: ")
    assert "\n" not in str(info.value)


def test_a_missing_category_id_is_one_line_even_on_a_crowd(tmp_path: Path) -> None:
    crowd = {k: v for k, v in _ann(2, 1, [0, 0, 1, 1], iscrowd=1).items() if k != "category_id"}
    make_coco(tmp_path, [1], [_ann(1, 1, [1.0, 1.0, 2.0, 2.0]), crowd], [_image(1)])
    with pytest.raises(LostregError, match=r"annotations\[1\] \(id 2\) has no category_id"):
        load_coco20k(tmp_path, use_cache=False)


def test_error_lines_quote_a_huge_value_briefly(tmp_path: Path) -> None:
    annotation = {**_ann(1, 1, [1.0, 1.0, 2.0, 2.0]), "iscrowd": [[list(range(10_000))]]}
    make_coco(tmp_path, [1], [annotation], [_image(1)])
    with pytest.raises(LostregError, match=r"has iscrowd \[\[\[0, 1, 2, 3, 4, 5, 6, 7, \.\.\.\]\]\]"
                                           r", expected 0 or 1$"):
        load_coco20k(tmp_path, use_cache=False)


# --- masks ----------------------------------------------------------------------------------------

# a 3x2 rectangle at x 1..4, y 1..3 of a 6-wide, 5-tall image
RECTANGLE = np.zeros((5, 6), dtype=bool)
RECTANGLE[1:3, 1:4] = True
# its column-major run lengths, counted by hand: 6 off, 2 on, 3 off, 2 on, 3 off, 2 on, 12 off
COUNTS = [6, 2, 3, 2, 3, 2, 12]


def test_polygons_and_both_rle_forms_decode_to_the_same_mask() -> None:
    polygon = segmentation_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6, "ann 1")
    uncompressed = segmentation_mask({"size": [5, 6], "counts": COUNTS}, 5, 6, "ann 1")
    compressed_counts = mask_utils.encode(np.asfortranarray(RECTANGLE.astype(np.uint8)))["counts"]
    compressed = segmentation_mask({"size": [5, 6], "counts": compressed_counts.decode()}, 5, 6,
                                   "ann 1")
    for mask in (polygon, uncompressed, compressed):
        assert mask.dtype == bool and np.array_equal(mask, RECTANGLE)


def test_several_polygons_are_merged_and_degenerate_ones_dropped() -> None:
    two = [[1, 1, 4, 1, 4, 3, 1, 3], [5, 4, 6, 4, 6, 5, 5, 5], [0, 0, 3, 3]]
    expected = RECTANGLE.copy()
    expected[4, 5] = True
    assert np.array_equal(segmentation_mask(two, 5, 6, "ann"), expected)
    assert not segmentation_mask([[0, 0, 3, 3]], 5, 6, "ann").any()  # a line: no area


@pytest.mark.parametrize(("segmentation", "needle"), [
    ({"size": [5, 6], "counts": [6, 2, 3]}, "RLE counts cover 11 pixels, the 6x5 image has 30"),
    ({"size": [6, 5], "counts": COUNTS}, r"RLE size \[6, 5\] is not the image's \[5, 6\]"),
    ({"size": [5, 6], "counts": [6, -2, 26]}, "counts must be non-negative integers"),
    ({"size": [5, 6], "counts": "61"}, "RLE counts cover 7 pixels"),
    ({"size": [5, 6], "counts": "6\x7f"}, "RLE counts string is malformed"),
    ({"size": [5, 6], "counts": "6o"}, "RLE counts string is malformed"),
    ({"size": [5, 6]}, "counts must be a list of integers or a compressed string"),
    ([[1, 1, 4, 1, 4]], "polygon 0 is not an even-length list of numbers"),
    ([[1, 1, 4, 1, "4", 3]], "polygon 0 is not an even-length list of numbers"),
    ([[1, 1, 4, 1, 4, float("nan")]], "polygon 0 has a coordinate that is not finite"),
    ([[1, 1, 4, 1, 4, 1e12]], "lies more than an image size outside"),
    ("polygon", "must be a list of polygons or an RLE object, got str"),
])
def test_bad_segmentations_are_one_line(segmentation: object, needle: str) -> None:
    with pytest.raises(LostregError, match=needle) as info:
        segmentation_mask(segmentation, 5, 6, "instances.json: annotation 7")
    assert str(info.value).startswith("instances.json: annotation 7: ")


def test_a_short_rle_is_refused_rather_than_decoded_from_garbage() -> None:
    """pycocotools decodes counts that cover too few pixels from uninitialised memory."""
    short = mask_utils.frPyObjects({"size": [2, 2], "counts": [1, 1]}, 2, 2)
    with pytest.raises(LostregError, match="RLE counts cover 2 pixels, the 2x2 image has 4"):
        segmentation_mask({"size": [2, 2], "counts": short["counts"].decode()}, 2, 2, "a")


def test_random_masks_round_trip_through_stored_rle() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        truth = rng.random((height, width)) < rng.random()
        rle = mask_utils.encode(np.asfortranarray(truth.astype(np.uint8)))
        stored = json.loads(json.dumps({"size": rle["size"], "counts": rle["counts"].decode()}))
        assert np.array_equal(segmentation_mask(stored, height, width, "a"), truth)

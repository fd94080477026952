"""The saliency sets (ECSSD, DUTS-TE, DUT-OMRON): layouts, records, bad input, downloads."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lostreg.datasets.download as dl
from lostreg.datasets import DATASETS, get_dataset, load_dataset
from lostreg.datasets.mask_demo import generate_mask_tree
from lostreg.datasets.saliency_sets import SETS, prepare_saliency_set
from lostreg.errors import LostregError
from lostreg.evaluation.mask_gt import forget, read_gt
from lostreg.evaluation.targets import MaskTarget
from lostreg.runs.folder import check_dataset_complete


def test_registry_entries() -> None:
    expected = {"ecssd": 1000, "duts_te": 5019, "dut_omron": 5168}
    for name, count in expected.items():
        spec = get_dataset(name)
        assert spec.expected_images == count
        assert (spec.target, spec.metrics, spec.image_protocol) == ("mask", ("saliency",),
                                                                    "resize")
        assert spec.download is not None
    assert get_dataset("ecssd").layout == "ECSSD/images/*.jpg with ECSSD/ground_truth_mask/*.png"
    assert get_dataset("duts_te").layout == \
        "DUTS-TE/DUTS-TE-Image/*.jpg with DUTS-TE/DUTS-TE-Mask/*.png"
    assert get_dataset("dut_omron").layout == \
        "DUT-OMRON/DUT-OMRON-image/*.jpg with DUT-OMRON/pixelwiseGT-new-PNG/*.png"
    assert all(DATASETS[n].image_protocol == "pad" for n in ("voc07", "voc12", "coco20k", "demo"))


@pytest.mark.parametrize("name", [s.name for s in SETS])
def test_official_layout_is_indexed_in_sorted_order_with_its_masks(tmp_path: Path, name) -> None:
    images = generate_mask_tree(tmp_path, name, 4, seed=3)
    (images / "notes.txt").write_text("not an image")  # not a .jpg: not listed
    index = load_dataset(name, tmp_path, download=False)
    assert [r.image_id for r in index.records] == ["00000", "00001", "00002", "00003"]
    for record in index.records:
        assert record.boxes == () and record.gt_mask.parent.name == \
            get_dataset(name).layout.split(" with ")[1].split("/")[1]
        with Image.open(record.path) as image:
            assert image.size == (record.width, record.height)
        target = record.target
        assert isinstance(target, MaskTarget) and target.size == (record.width, record.height)
        assert target.line_fields() == {"gt_size": [record.width, record.height],
                                        "gt_grey_pixels": 0}


def test_tokencut_renamed_layout_is_read_too(tmp_path: Path) -> None:
    generate_mask_tree(tmp_path / "official", "ecssd", 3)
    (tmp_path / "renamed" / "ECSSD").mkdir(parents=True)
    (tmp_path / "official" / "ECSSD" / "images").rename(tmp_path / "renamed" / "ECSSD" / "img")
    (tmp_path / "official" / "ECSSD" / "ground_truth_mask").rename(
        tmp_path / "renamed" / "ECSSD" / "gt")
    index = load_dataset("ecssd", tmp_path / "renamed", download=False)
    assert len(index) == 3 and index.records[0].gt_mask.parent.name == "gt"


def test_gt_read_as_tokencut_reads_it_and_grey_pixels_counted(tmp_path: Path) -> None:
    generate_mask_tree(tmp_path, "ecssd", 2, grey_borders=True)
    record = load_dataset("ecssd", tmp_path, download=False).records[1]
    rgb_gt = np.zeros((record.height, record.width, 3), dtype=np.uint8)
    rgb_gt[2:6, 3:9] = (255, 0, 0)  # an RGB GT file: convert('L') gives ITU-R 601-2 luma, 76
    Image.fromarray(rgb_gt, "RGB").save(record.gt_mask)
    forget()
    gray = read_gt(record.gt_mask, (record.width, record.height))
    assert gray.dtype == np.uint8 and set(np.unique(gray)) == {0, 76}
    assert np.array_equal(gray, np.array(Image.open(record.gt_mask).convert("L")))
    assert record.target.grey_pixels() == 24  # every 76 pixel is grey


def test_missing_gt_is_one_line(tmp_path: Path) -> None:
    generate_mask_tree(tmp_path, "dut_omron", 3)
    gt = tmp_path / "DUT-OMRON" / "pixelwiseGT-new-PNG" / "00001.png"
    gt.unlink()
    with pytest.raises(LostregError, match=r"00001\.png: ground-truth mask of .*00001\.jpg is "
                                           "missing"):
        load_dataset("dut_omron", tmp_path, download=False)


def test_gt_of_another_size_is_one_line(tmp_path: Path) -> None:
    generate_mask_tree(tmp_path, "duts_te", 2)
    gt = tmp_path / "DUTS-TE" / "DUTS-TE-Mask" / "00000.png"
    Image.new("L", (7, 5)).save(gt)
    with pytest.raises(LostregError, match=r"00000\.png: ground-truth mask is 7x5, its image "
                                           r".*00000\.jpg is \d+x\d+"):
        load_dataset("duts_te", tmp_path, download=False)


def test_partial_tree_needs_allow_partial(tmp_path: Path) -> None:
    generate_mask_tree(tmp_path, "ecssd", 3)
    index = load_dataset("ecssd", tmp_path, download=False)
    with pytest.raises(LostregError, match="ecssd test lists 3 images, expected 1000.*"
                                           "--allow-partial-dataset"):
        check_dataset_complete(index, allow_partial=False)
    check_dataset_complete(index, allow_partial=True)


def test_missing_set_says_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(LostregError, match="ECSSD.*not found, expected ECSSD/images/\\*.jpg"):
        load_dataset("ecssd", tmp_path, download=False)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 255).save(buffer, "PNG")
    return buffer.getvalue()


def _jpg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_download_installs_the_official_layout_and_pins_the_checksum(
        tmp_path: Path, monkeypatch, capsys) -> None:
    """DUT-OMRON from two zips as TokenCut's script fetches them (the GT zip with its
    ``__MACOSX`` folder), through file URLs: first-use sha256 pins, then a changed archive is
    refused."""
    served = tmp_path / "served"
    served.mkdir()
    images = _zip({"DUT-OMRON-image/a.jpg": _jpg((20, 10))})
    masks = _zip({"pixelwiseGT-new-PNG/a.png": _png((20, 10)), "__MACOSX/._a.png": b"x"})
    (served / "DUT-OMRON-image.zip").write_bytes(images)
    (served / "DUT-OMRON-gt-pixelwise.zip.zip").write_bytes(masks)
    manifest = {"dut_omron": {"files": [
        {"role": "images", "url": (served / "DUT-OMRON-image.zip").as_uri(),
         "file": "DUT-OMRON-image.zip", "sha256": None, "md5": None},
        {"role": "masks", "url": (served / "DUT-OMRON-gt-pixelwise.zip.zip").as_uri(),
         "file": "DUT-OMRON-gt-pixelwise.zip.zip", "sha256": None, "md5": None}]}}
    path = tmp_path / "downloads.json"
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr(dl, "MANIFEST_PATH", path)
    root = tmp_path / "data"
    prepare_saliency_set(SETS[2], root, progress=False)
    index = load_dataset("dut_omron", root, download=False)
    assert [r.image_id for r in index.records] == ["a"]
    assert sorted(p.name for p in (root / "DUT-OMRON").iterdir()) == [
        "DUT-OMRON-image", "pixelwiseGT-new-PNG"]
    pin = root / "downloads" / "DUT-OMRON-image.zip.sha256"
    assert pin.read_text().split()[0] == hashlib.sha256(images).hexdigest()
    assert "is pinned in" in capsys.readouterr().err
    # the server's archive changes: the next download of it must match the pin
    (served / "DUT-OMRON-image.zip").write_bytes(_zip({"DUT-OMRON-image/b.jpg": _jpg((8, 8))}))
    for folder in ("DUT-OMRON-image", "pixelwiseGT-new-PNG"):
        for file in (root / "DUT-OMRON" / folder).iterdir():
            file.unlink()
        (root / "DUT-OMRON" / folder).rmdir()
    with pytest.raises(LostregError, match="sha256"):
        prepare_saliency_set(SETS[2], root, progress=False)


def test_manifest_lists_tokencuts_sources() -> None:
    urls = {name: [item["url"] for item in dl.manifest_files(name)]
            for name in ("ecssd", "duts_te", "dut_omron")}
    assert urls == {
        "ecssd": ["https://www.cse.cuhk.edu.hk/leojia/projects/hsaliency/data/ECSSD/images.zip",
                  "https://www.cse.cuhk.edu.hk/leojia/projects/hsaliency/data/ECSSD/"
                  "ground_truth_mask.zip"],
        "duts_te": ["http://saliencydetection.net/duts/download/DUTS-TE.zip"],
        "dut_omron": ["http://saliencydetection.net/dut-omron/download/DUT-OMRON-image.zip",
                      "http://saliencydetection.net/dut-omron/download/"
                      "DUT-OMRON-gt-pixelwise.zip.zip"]}

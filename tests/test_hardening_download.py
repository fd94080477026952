"""Issue 20, rows 13 and 17, and issue 18 item 7: dataset downloads.

* an archive of the wrong shape (``VOCdevkit/VOC2007`` a file) is reported, kept, and nothing
  is installed;
* an archive already in ``downloads/`` is checksummed like a download;
* the download manifest is package data, so an installed lostreg (a wheel) can download.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import lostreg.datasets.download as dl
from lostreg.datasets.download import load_manifest, prepare_coco20k, prepare_voc
from lostreg.datasets.voc import voc_is_present
from lostreg.errors import LostregError

REPO = Path(__file__).resolve().parents[1]


def tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
             files: list[dict]) -> None:
    """A manifest naming ``files`` (URLs nothing serves: every archive is already in
    ``downloads/``, so a request would fail the test)."""
    for item in files:
        item.setdefault("url", f"http://127.0.0.1:9/{item['file']}")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({name: {"files": files}}))
    monkeypatch.setattr(dl, "MANIFEST_PATH", path)


def placed(root: Path, name: str, data: bytes) -> Path:
    """An archive the user put in ``downloads/`` (fetched elsewhere)."""
    path = root / "downloads" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


# --- row 13: the extracted layout is checked before "ready" ---------------------------------------


def test_an_archive_whose_voc_folder_is_a_file_is_kept_and_not_installed(tmp_path, monkeypatch):
    root = tmp_path / "data"
    data = tar(tmp_path / "voc.tar", {"VOCdevkit/VOC2007": b"not a folder"}).read_bytes()
    archive = placed(root, "voc.tar", data)
    manifest(tmp_path, monkeypatch, "voc07", [{"role": "archive", "file": "voc.tar",
                                               "md5": hashlib.md5(data).hexdigest()}])
    with pytest.raises(LostregError) as info:
        prepare_voc(root, 2007, progress=False)
    assert str(info.value) == (f"{archive}: VOCdevkit/VOC2007 is a file, not a folder, so this "
                               "is not the dataset's archive; it is kept, nothing was installed")
    assert archive.read_bytes() == data  # kept
    assert sorted(p.name for p in root.iterdir()) == ["downloads"]  # no VOC2007, no temp folder
    assert not voc_is_present(root, 2007)


def test_an_archive_without_the_split_file_is_kept(tmp_path, monkeypatch) -> None:
    root = tmp_path / "data"
    data = tar(tmp_path / "voc.tar", {"VOCdevkit/VOC2007/Annotations/a.xml": b"<a/>"}).read_bytes()
    archive = placed(root, "voc.tar", data)
    manifest(tmp_path, monkeypatch, "voc07", [{"role": "archive", "file": "voc.tar"}])
    with pytest.raises(LostregError, match=r"VOCdevkit/VOC2007 has no ImageSets/Main/trainval"
                                           r"\.txt file, so this is not the dataset's archive"):
        prepare_voc(root, 2007, progress=False)
    assert archive.exists() and not (root / "VOC2007").exists()


@pytest.mark.parametrize(("members", "says"), [
    ({}, "has no file JPEGImages/000001.jpg"),  # no JPEGImages folder at all
    ({"JPEGImages": b"a file"}, "has no file JPEGImages/000001.jpg"),
    ({"JPEGImages/000001.jpg": b"jpg"}, "has no file Annotations/000001.xml"),
])
def test_an_archive_without_the_listed_images_is_kept(tmp_path, monkeypatch, members,
                                                      says) -> None:
    """A split file alone passed the check: the archive was deleted and "ready" reported,
    and the run then found every image missing."""
    root = tmp_path / "data"
    voc = "VOCdevkit/VOC2007/"
    data = tar(tmp_path / "voc.tar", {voc + "ImageSets/Main/trainval.txt": b"000001\n",
                                      **{voc + name: body for name, body in members.items()}}
               ).read_bytes()
    archive = placed(root, "voc.tar", data)
    manifest(tmp_path, monkeypatch, "voc07", [{"role": "archive", "file": "voc.tar",
                                               "md5": hashlib.md5(data).hexdigest()}])
    with pytest.raises(LostregError) as info:
        prepare_voc(root, 2007, progress=False)
    assert str(info.value) == (f"{archive}: VOCdevkit/VOC2007 {says}, which its trainval.txt "
                               "lists, so this is not the dataset's archive; it is kept, nothing "
                               "was installed")
    assert archive.read_bytes() == data and not (root / "VOC2007").exists()


def test_a_coco_images_archive_without_the_listed_images_is_kept(tmp_path, monkeypatch) -> None:
    """train2014.zip has no published checksum: only the layout check stands between a wrong
    zip and a deleted 13 GB download. Every image of the 20k list must be in it."""
    root = tmp_path / "data"
    (root / "COCO" / "annotations").mkdir(parents=True)
    (root / "COCO" / "coco_20k_filenames.txt").write_text("train2014/a.jpg\ntrain2014/b.jpg\n")
    (root / "COCO" / "annotations" / "instances_train2014.json").write_text("{}")
    images = io.BytesIO()
    with zipfile.ZipFile(images, "w") as zf:
        zf.writestr("train2014/a.jpg", "jpg")
        zf.writestr("train2014/c.jpg", "jpg")
    archive = placed(root, "img.zip", images.getvalue())
    manifest(tmp_path, monkeypatch, "coco20k", [
        {"role": "list", "file": "coco_20k_filenames.txt"},
        {"role": "annotations", "file": "ann.zip"}, {"role": "images", "file": "img.zip"}])
    with pytest.raises(LostregError) as info:
        prepare_coco20k(root, progress=False)
    assert str(info.value) == (f"{archive}: train2014 has no file b.jpg, which "
                               "coco_20k_filenames.txt lists, so this is not the dataset's "
                               "archive; it is kept, nothing was installed")
    assert archive.exists() and not (root / "COCO" / "images").exists()
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("train2014/b.jpg", "jpg")
    assert prepare_coco20k(root, progress=False) == root / "COCO"
    assert (root / "COCO" / "images" / "train2014" / "b.jpg").is_file() and not archive.exists()


def test_coco_archives_of_the_wrong_shape_are_kept(tmp_path, monkeypatch) -> None:
    root = tmp_path / "data"
    (root / "COCO").mkdir(parents=True)
    (root / "COCO" / "coco_20k_filenames.txt").write_text("train2014/x.jpg\n")
    annotations = io.BytesIO()
    with zipfile.ZipFile(annotations, "w") as zf:
        zf.writestr("annotations/instances_train2014.json/oops.json", "{}")
    archive = placed(root, "ann.zip", annotations.getvalue())
    manifest(tmp_path, monkeypatch, "coco20k", [
        {"role": "list", "file": "coco_20k_filenames.txt"},
        {"role": "annotations", "file": "ann.zip"}, {"role": "images", "file": "img.zip"}])
    with pytest.raises(LostregError, match="annotations/instances_train2014.json is not a file"):
        prepare_coco20k(root, progress=False)
    assert archive.exists() and not (root / "COCO" / "annotations").exists()

    images = io.BytesIO()
    with zipfile.ZipFile(images, "w") as zf:
        zf.writestr("train2014", "a file")
    shutil.rmtree(root / "downloads")
    placed(root, "img.zip", images.getvalue())
    (root / "COCO" / "annotations").mkdir()
    (root / "COCO" / "annotations" / "instances_train2014.json").write_text("{}")
    with pytest.raises(LostregError, match="img.zip: train2014 is a file, not a folder"):
        prepare_coco20k(root, progress=False)
    assert (root / "downloads" / "img.zip").exists() and not (root / "COCO" / "images").exists()


# --- row 17: an archive already in downloads/ is checksummed ------------------------------------


GOOD = {"VOCdevkit/VOC2007/ImageSets/Main/trainval.txt": b"",
        "VOCdevkit/VOC2007/Annotations/.keep": b""}


def test_a_placed_archive_with_another_md5_is_one_line_naming_both(tmp_path, monkeypatch):
    root = tmp_path / "data"
    data = tar(tmp_path / "voc.tar", GOOD).read_bytes()
    archive = placed(root, "voc.tar", data)
    manifest(tmp_path, monkeypatch, "voc07", [{"role": "archive", "file": "voc.tar",
                                               "md5": "0" * 32}])
    with pytest.raises(LostregError) as info:
        prepare_voc(root, 2007, progress=False)
    actual = hashlib.md5(data).hexdigest()
    assert str(info.value) == (f"{archive}: md5 mismatch (expected {'0' * 32}, got {actual}); "
                               "the file was already there; delete or replace it")
    assert archive.read_bytes() == data and not (root / "VOC2007").exists()


def test_a_placed_archive_with_the_right_sums_is_used(tmp_path, monkeypatch) -> None:
    root = tmp_path / "data"
    data = tar(tmp_path / "voc.tar", GOOD).read_bytes()
    archive = placed(root, "voc.tar", data)
    manifest(tmp_path, monkeypatch, "voc07", [{"role": "archive", "file": "voc.tar",
                                               "md5": hashlib.md5(data).hexdigest(),
                                               "sha256": hashlib.sha256(data).hexdigest()}])
    assert prepare_voc(root, 2007, progress=False) == root / "VOC2007"
    assert voc_is_present(root, 2007) and not archive.exists()  # checked, installed, removed


def test_a_placed_file_with_another_sha256_is_refused_and_kept(tmp_path) -> None:
    dest = tmp_path / "list.txt"
    dest.write_bytes(b"mine")
    with pytest.raises(LostregError, match=rf"list.txt: sha256 mismatch \(expected {'f' * 64}, "
                                           rf"got {hashlib.sha256(b'mine').hexdigest()}\)"):
        dl.download_file("http://127.0.0.1:9/list.txt", dest, sha256="f" * 64, progress=False)
    assert dest.read_bytes() == b"mine"


# --- issue 18 item 7: the manifest is package data ----------------------------------------------


def test_the_manifest_is_read_from_the_package() -> None:
    assert Path(str(dl.MANIFEST_PATH)) == (REPO / "lostreg" / "datasets" / "manifests"
                                           / "downloads.json")
    assert not (REPO / "datasets" / "manifests" / "downloads.json").exists()
    assert {"voc07", "voc12", "coco20k"} <= set(load_manifest())
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"lostreg.datasets" = ["manifests/*.json"]' in pyproject


def test_a_deep_or_huge_manifest_is_one_line(tmp_path) -> None:
    path = tmp_path / "m.json"
    path.write_text("[" * 100_000)
    with pytest.raises(LostregError, match=r"m.json: cannot read the download manifest \(nested"):
        load_manifest(path)
    path.write_text(json.dumps({"x": "y" * (2 << 20)}))
    with pytest.raises(LostregError, match=r"cannot read the download manifest \(.* bytes, more"):
        load_manifest(path)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked tree")
def test_a_built_wheel_carries_the_manifest(tmp_path) -> None:
    """``pip wheel`` of the tracked tree (no network: setuptools is already installed)."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "results", "tests", "notebooks", "benchmarks", "__pycache__", "*.egg-info",
        "build", "dist"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                            "--no-build-isolation", "--no-index", "-w", str(tmp_path / "whl")],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("pip is not available in this environment")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("lostreg-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "lostreg/datasets/manifests/downloads.json" in names
        assert "lostreg/backbones/neurons/dinov2_vitl14.json" in names
        assert json.loads(zf.read("lostreg/datasets/manifests/downloads.json")) == load_manifest()

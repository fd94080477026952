"""Stored dataset indexes (issues 13 and 14): the parsed VOC index and the COCO 20k subset are
reused only while their sources are unchanged (sha256; a stat memo saves the hashing), an edited
stored index is never used as ground truth, and a read-only dataset still works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_datasets import _obj, _xml, make_voc, standard_coco

import lostreg.datasets.coco as coco
import lostreg.datasets.derived as derived
import lostreg.datasets.voc as voc
from lostreg.datasets.coco import CACHE_NAME, load_coco20k
from lostreg.datasets.voc import index_cache_name, load_voc_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the fallback location inside the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "lostreg" / "dataset-index"


@pytest.fixture()
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge stat memos as if the files were written long ago (fresh files get none: a change
    in the same timestamp tick would not show in their stat)."""
    monkeypatch.setattr(derived, "now_ns", lambda: time.time_ns() + 10 * derived.RACY_WINDOW_NS)


class Counter:
    """Counts calls of a module function while passing them through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.calls = 0
        real = getattr(module, name)

        def counting(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _voc_tree(folder: Path, n: int = 6) -> Path:
    annotations = {f"{i:03d}": _xml([_obj("dog", (1 + i, 2, 20 + i, 30)),
                                     _obj("cat", (3, 3, 9, 9), truncated=i % 2)])
                   for i in range(n)}
    return make_voc(folder, annotations)


def _same(a, b) -> bool:
    return a.records == b.records and [r.extra for r in a.records] == [r.extra for r in b.records]


def _store(folder: Path) -> Path:
    return folder / index_cache_name("trainval", False)


# ----------------------------------------------------------------------------------------- VOC


def test_voc_index_is_stored_and_reused_until_an_xml_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None) -> None:
    folder = _voc_tree(tmp_path / "VOC2007")
    parses = Counter(monkeypatch, voc, "_parse_entry")
    hashes = Counter(monkeypatch, voc, "sha256_hex")
    first = load_voc_folder(folder, "voc07")
    assert parses.take() == 6 and _store(folder).is_file()
    assert _same(first, load_voc_folder(folder, "voc07", cache=False))
    parses.take(), hashes.take()

    second = load_voc_folder(folder, "voc07")
    assert (parses.take(), hashes.take()) == (0, 0)  # every stat matched its memo
    assert _same(first, second)

    # An edited XML is parsed again, alone.
    xml = folder / "Annotations" / "003.xml"
    xml.write_text(_xml([_obj("bird", (5, 5, 15, 15))]))
    third = load_voc_folder(folder, "voc07")
    assert parses.take() == 1
    hashes.take()
    assert third.records[3].boxes == ((4.0, 4.0, 15.0, 15.0),)
    assert third.records[3].extra["classes"] == ["bird"]
    assert third.records[:3] == first.records[:3]

    # A new mtime with the same content is hashed, not parsed; its memo is then refreshed.
    stat = xml.stat()
    os.utime(xml, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    assert _same(third, load_voc_folder(folder, "voc07"))
    assert (parses.take(), hashes.take()) == (0, 1)
    load_voc_folder(folder, "voc07")
    assert (parses.take(), hashes.take()) == (0, 0)


def test_voc_an_edit_that_keeps_size_and_mtime_is_still_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None) -> None:
    folder = _voc_tree(tmp_path / "VOC2007")
    assert load_voc_folder(folder, "voc07").records[2].boxes[0] == (2.0, 1.0, 22.0, 30.0)
    xml = folder / "Annotations" / "002.xml"
    before = xml.stat()
    text = xml.read_text()
    edited = text.replace("<xmin>3</xmin><ymin>2</ymin>", "<xmin>4</xmin><ymin>2</ymin>", 1)
    assert edited != text and len(edited) == len(text)
    xml.write_text(edited)
    os.utime(xml, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` / `touch -r` would
    after = xml.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert load_voc_folder(folder, "voc07").records[2].boxes[0] == (3.0, 1.0, 22.0, 30.0)


def test_fresh_files_get_no_stat_memo_so_they_are_hashed_next_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _voc_tree(tmp_path / "VOC2007", n=3)
    load_voc_folder(folder, "voc07")
    files = json.loads(_store(folder).read_bytes().splitlines()[0])["files"]
    assert [item[1] for item in files.values()] == [None, None, None]
    hashes = Counter(monkeypatch, voc, "sha256_hex")
    load_voc_folder(folder, "voc07")
    assert hashes.take() == 3
    now = time.time_ns()
    st = (folder / "Annotations" / "000.xml").stat()
    assert derived.stat_memo(st, now) is None
    assert derived.stat_memo(st, now + 2 * derived.RACY_WINDOW_NS) == derived.stat_key(st)


def test_voc_edited_store_is_ignored_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], settled: None) -> None:
    folder = _voc_tree(tmp_path / "VOC2007", n=3)
    truth = load_voc_folder(folder, "voc07")
    store = _store(folder)
    data = store.read_bytes()
    forged = data.replace(b"[0.0,1.0,20.0,30.0]", b"[0.0,1.0,21.0,30.0]", 1)
    assert forged != data and len(forged) == len(data)
    store.write_bytes(forged)
    capsys.readouterr()
    again = load_voc_folder(folder, "voc07")
    assert _same(truth, again)  # boxes from the XMLs, not from the edited file
    err = capsys.readouterr().err
    assert f"warning: {store}: not an intact lostreg index (checksum mismatch" in err
    assert store.read_bytes() != forged and derived.decode(store.read_bytes()) is not None


def test_voc_store_with_a_valid_checksum_is_still_validated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None) -> None:
    folder = _voc_tree(tmp_path / "VOC2007", n=3)
    truth = load_voc_folder(folder, "voc07")
    document = derived.decode(_store(folder).read_bytes())
    entries = document["files"]
    entries["000"][2]["boxes"][0] = [30.0, 1.0, 20.0, 30.0]  # inverted
    entries["001"][2]["width"] = "50"  # wrong type
    entries["002"][2]["file"] = "../../etc/passwd"  # escapes JPEGImages
    _store(folder).write_bytes(derived.encode(document))  # checksum recomputed: looks intact
    parses = Counter(monkeypatch, voc, "_parse_entry")
    assert _same(truth, load_voc_folder(folder, "voc07"))
    assert parses.take() == 3


def test_voc_store_follows_the_split_and_keeps_modes_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None) -> None:
    folder = _voc_tree(tmp_path / "VOC2007")
    load_voc_folder(folder, "voc07")
    split = folder / "ImageSets" / "Main" / "trainval.txt"
    split.write_text("004\n001\n")
    parses = Counter(monkeypatch, voc, "_parse_entry")
    index = load_voc_folder(folder, "voc07")
    assert [r.image_id for r in index.records] == ["004", "001"] and parses.take() == 0
    files = derived.decode(_store(folder).read_bytes())["files"]
    assert sorted(files) == ["001", "004"]  # rewritten for the new split
    # --no-hard has its own store: LOST drops hard objects before reading their boxes.
    hard = load_voc_folder(folder, "voc07", no_hard=True)
    assert parses.take() == 2 and (folder / index_cache_name("trainval", True)).is_file()
    assert [len(r.boxes) for r in hard.records] == [2, 1]
    assert [len(r.boxes) for r in load_voc_folder(folder, "voc07").records] == [2, 2]


def test_voc_xml_without_size_is_never_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              settled: None) -> None:
    # its size comes from the image, which is not a source of the stored index
    xml = f"<annotation>{_obj('x', (1, 1, 2, 2))}</annotation>"
    folder = make_voc(tmp_path / "VOC2007", {"a": xml, "b": _xml([])}, images=True)
    load_voc_folder(folder, "voc07")
    assert sorted(derived.decode(_store(folder).read_bytes())["files"]) == ["b"]
    parses = Counter(monkeypatch, voc, "_parse_entry")
    assert (load_voc_folder(folder, "voc07").records[0].width, parses.take()) == (50, 1)


def test_voc_unwritable_dataset_uses_the_user_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path,
        capsys: pytest.CaptureFixture[str], settled: None) -> None:
    folder = _voc_tree(tmp_path / "VOC2007")
    real_write = derived.atomic_write_bytes
    blocked = [folder]

    def refusing(path: Path, data: bytes) -> None:
        if any(Path(path).is_relative_to(b) for b in blocked):
            raise PermissionError(13, "Permission denied", str(path))
        real_write(path, data)

    monkeypatch.setattr(derived, "atomic_write_bytes", refusing)
    truth = load_voc_folder(folder, "voc07")
    assert not _store(folder).exists()
    stored = list(user_cache.iterdir())
    assert len(stored) == 1 and stored[0].name.endswith("-lostreg-index-trainval.json")
    parses = Counter(monkeypatch, voc, "_parse_entry")
    assert _same(truth, load_voc_folder(folder, "voc07")) and parses.take() == 0

    blocked.append(user_cache.parent)  # nowhere to write: works, says so once per load
    shutil.rmtree(user_cache)
    capsys.readouterr()
    assert _same(truth, load_voc_folder(folder, "voc07"))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: cannot store the dataset index (")
    assert str(_store(folder)) in err[0] and "rebuilt on every run" in err[0]


def _can_mount_read_only(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {probe} {probe} && touch {probe}/x"],
            capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Read-only file system" in result.stderr and not (probe / "x").exists()


_LOAD_SCRIPT = """
import json, sys, time
import lostreg.datasets.derived as derived
import lostreg.datasets.voc as voc
derived.now_ns = lambda: time.time_ns() + 10 * derived.RACY_WINDOW_NS
calls = []
real = voc._parse_entry
voc._parse_entry = lambda *args: calls.append(1) or real(*args)
index = voc.load_voc_folder(sys.argv[1], "voc07")
print(json.dumps({"parsed": len(calls), "boxes": [r.boxes for r in index.records]}))
"""


def test_voc_on_a_read_only_mount(tmp_path: Path, user_cache: Path) -> None:
    if not _can_mount_read_only(tmp_path):
        pytest.skip("no read-only bind mount here (needs unshare -m and mount)")
    folder = _voc_tree(tmp_path / "data" / "VOC2007")
    truth = [list(map(list, r.boxes)) for r in load_voc_folder(folder, "x", cache=False).records]
    before = sorted(p.name for p in folder.iterdir())
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    command = (f"mount --bind -o ro {folder} {folder} && "
               f"exec {sys.executable} -c '{_LOAD_SCRIPT}' {folder}")
    runs = [subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True,
                           text=True, env=env, timeout=120) for _ in range(2)]
    outputs = []
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "Read-only file system" not in run.stderr and "Traceback" not in run.stderr
        outputs.append(json.loads(run.stdout))
    assert [o["parsed"] for o in outputs] == [6, 0]  # the second run used the user cache
    assert outputs[0]["boxes"] == outputs[1]["boxes"] == truth
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written there
    assert len(list(user_cache.iterdir())) == 1


# ---------------------------------------------------------------------------------------- COCO


def test_coco_edited_derived_index_is_never_used_as_ground_truth(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = standard_coco(tmp_path)
    truth = load_coco20k(tmp_path)
    cache = folder / CACHE_NAME
    lines = cache.read_bytes().splitlines(keepends=True)
    document = json.loads(lines[0])
    document["images"][0]["boxes"][0] = [0.0, 0.0, 80.0, 60.0]  # "better" GT, checksum kept
    cache.write_bytes(json.dumps(document, separators=(",", ":")).encode() + b"\n" + lines[1])
    capsys.readouterr()
    again = load_coco20k(tmp_path)
    assert again.records == truth.records
    assert "not an intact lostreg index (checksum mismatch" in capsys.readouterr().err
    # An old-format index (no checksum line, as written before) is rebuilt too.
    cache.write_text(json.dumps({"version": 1, "images": document["images"]}))
    assert load_coco20k(tmp_path).records == truth.records


def test_coco_index_is_keyed_by_the_annotation_content(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None) -> None:
    folder = standard_coco(tmp_path)
    ann_path = folder / "annotations" / "instances_train2014.json"
    builds = Counter(monkeypatch, coco, "select_coco20k")
    hashes = Counter(monkeypatch, coco, "sha256_file")
    load_coco20k(tmp_path)
    assert builds.take() == 1
    load_coco20k(tmp_path)
    assert (builds.take(), hashes.take()) == (0, 0)  # the stat memo vouched for the file

    # Same size, same mtime, other content: today's size+mtime key would have kept the old GT.
    before = ann_path.stat()
    text = ann_path.read_text()
    edited = text.replace('"bbox": [2.5, 3.5, 10.0, 20.0]', '"bbox": [2.5, 3.5, 10.0, 30.0]')
    assert edited != text and len(edited) == len(text)
    ann_path.write_text(edited)
    os.utime(ann_path, ns=(before.st_atime_ns, before.st_mtime_ns))
    index = load_coco20k(tmp_path)
    assert builds.take() == 1 and hashes.take() == 1
    assert index.records[0].boxes == ((2.0, 4.0, 12.0, 34.0),)


def test_coco_unwritable_folder_uses_the_user_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path) -> None:
    folder = standard_coco(tmp_path)
    real_write = derived.atomic_write_bytes

    def refusing(path: Path, data: bytes) -> None:
        if Path(path).is_relative_to(folder):
            raise OSError(30, "Read-only file system", str(path))
        real_write(path, data)

    monkeypatch.setattr(derived, "atomic_write_bytes", refusing)
    truth = load_coco20k(tmp_path)
    assert not (folder / CACHE_NAME).exists() and len(list(user_cache.iterdir())) == 1
    builds = Counter(monkeypatch, coco, "select_coco20k")
    assert load_coco20k(tmp_path).records == truth.records and builds.take() == 0


# ------------------------------------------------------------------------------ stored format


def test_encode_decode_round_trip_and_refusals() -> None:
    document = {"kind": "k", "params": {"a": 1}, "files": {"x": [1.5, None, "s"]}}
    data = derived.encode(document)
    assert derived.decode(data) == document
    assert data.count(b"\n") == 2 and data.splitlines()[1].startswith(b"sha256 ")
    for broken in (data[:-1], data[:-5] + b"abcd\n", data.replace(b"1.5", b"2.5"), b"",
                   b"\n", data.splitlines(keepends=True)[0], b"sha256 x\n"):
        assert derived.decode(broken) is None, broken
    with pytest.raises(ValueError):
        derived.encode({"x": float("nan")})


def test_bench_index_runs_and_checks_its_paths(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark behind the README's figures keeps working (no timing is asserted)."""
    if str(REPO) not in sys.path:
        monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_index

    monkeypatch.setattr(derived, "RACY_WINDOW_NS", 0)
    assert bench_index.main(["--images", "12", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "== dataset index (VOC XMLs) ==" in out and "parse / stat_hit (cpu)" in out

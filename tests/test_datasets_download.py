"""Download helpers against a loopback HTTP server with Range support; archive extraction."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import lostreg.datasets.download as dl
from lostreg.datasets.coco import COCO20K_LIST_SHA256
from lostreg.datasets.download import (
    download_file,
    extract_archive,
    load_manifest,
    manifest_files,
    prepare_voc,
)
from lostreg.datasets.voc import load_voc
from lostreg.errors import LostregError

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes


class _Server(ThreadingHTTPServer):
    files: dict[str, bytes]
    honour_range: bool
    ranges: list[str | None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        data = self.server.files.get(self.path)
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        if data is None:
            self.send_error(404)
            return
        if requested and self.server.honour_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, _Server]]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files = {"/data.bin": PAYLOAD}
    httpd.honour_range = True
    httpd.ranges = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_download_full(server: tuple[str, _Server], tmp_path: Path) -> None:
    url, httpd = server
    dest = download_file(f"{url}/data.bin", tmp_path / "sub" / "data.bin", SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert httpd.ranges == [None]
    # An existing destination is complete by construction: no second request.
    download_file(f"{url}/data.bin", dest, SHA, progress=False)
    assert httpd.ranges == [None]


def test_download_resumes_partial_file(server: tuple[str, _Server], tmp_path: Path) -> None:
    url, httpd = server
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:30000])
    download_file(f"{url}/data.bin", dest, SHA, progress=False, md5=MD5)
    assert httpd.ranges == ["bytes=30000-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_restarts_when_range_ignored(
    server: tuple[str, _Server], tmp_path: Path
) -> None:
    url, httpd = server
    httpd.honour_range = False
    (tmp_path / "data.bin.part").write_bytes(b"garbage" * 100)
    download_file(f"{url}/data.bin", tmp_path / "data.bin", SHA, progress=False)
    assert httpd.ranges == ["bytes=700-"]
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_download_complete_partial_gets_416(server: tuple[str, _Server], tmp_path: Path) -> None:
    url, _ = server
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    download_file(f"{url}/data.bin", tmp_path / "data.bin", SHA, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_download_sha_mismatch_deletes_partial(
    server: tuple[str, _Server], tmp_path: Path
) -> None:
    url, httpd = server
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    part.write_bytes(b"\xff" * 5000)  # corrupt prefix, resumed by the server
    with pytest.raises(LostregError) as info:
        download_file(f"{url}/data.bin", dest, SHA, progress=False)
    message = str(info.value)
    corrupt = hashlib.sha256(b"\xff" * 5000 + PAYLOAD[5000:]).hexdigest()
    assert str(dest) in message and SHA in message and corrupt in message
    assert "sha256 mismatch" in message
    assert not part.exists() and not dest.exists()
    assert httpd.ranges == ["bytes=5000-"]
    # The next call starts from scratch and succeeds.
    download_file(f"{url}/data.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_download_md5_mismatch(server: tuple[str, _Server], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(LostregError, match=f"md5 mismatch \\(expected {'0' * 32}, got {MD5}\\)"):
        download_file(f"{url}/data.bin", tmp_path / "d.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "d.bin.part").exists()


def test_download_http_error(server: tuple[str, _Server], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(LostregError, match="missing.bin: download failed \\(HTTP 404"):
        download_file(f"{url}/missing.bin", tmp_path / "m.bin", progress=False)
    assert not (tmp_path / "m.bin").exists()


def test_download_file_url(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    dest = download_file(source.as_uri(), tmp_path / "out" / "x.bin", SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


# ---------------------------------------------------------------------------------- extraction


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_extract_tar_and_zip(tmp_path: Path) -> None:
    members = {"top/a.txt": b"a", "top/sub/b.txt": b"bb"}
    archives = (_tar(tmp_path / "x.tar", members), _tar(tmp_path / "x.tar.gz", members, "w:gz"))
    for archive in archives:
        out = extract_archive(archive, tmp_path / archive.name.replace(".", "_"))
        assert (out / "top" / "sub" / "b.txt").read_bytes() == b"bb"
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    out = extract_archive(tmp_path / "x.zip", tmp_path / "zip_out")
    assert (out / "top" / "a.txt").read_bytes() == b"a"


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "/tmp/evil_abs.txt",
                                  "..\\evil.txt"])
def test_extract_refuses_traversal(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    archive = _tar(tmp_path / "bad.tar", {"fine.txt": b"1", name: b"evil"})
    with pytest.raises(LostregError, match="would be written outside"):
        extract_archive(archive, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "fine.txt").exists()  # checked before anything is written
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("fine.txt", b"1")
        zf.writestr(name, b"evil")
    with pytest.raises(LostregError, match="would be written outside"):
        extract_archive(tmp_path / "bad.zip", tmp_path / "dest2")
    assert not (tmp_path / "evil.txt").exists()


def test_extract_refuses_links(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc"
        tf.addfile(info)
    with pytest.raises(LostregError, match="link or special file"):
        extract_archive(archive, tmp_path / "dest")


def test_extract_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(LostregError, match="broken.tar.gz: corrupt or truncated archive"):
        extract_archive(archive, tmp_path / "dest")


# ------------------------------------------------------------------------ manifest and prepare


def test_manifest_contents() -> None:
    manifest = load_manifest()
    urls = {item["url"]: item for name in ("voc07", "voc12", "coco20k")
            for item in manifest_files(name)}
    voc07 = urls["http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar"]
    assert voc07["md5"] == "c52e279531787c972589f7e41ab4ae64"
    voc12 = urls["http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"]
    assert voc12["md5"] == "6cd6e144f989b92b3379bac3b3de84fd"
    assert "http://images.cocodataset.org/zips/train2014.zip" in urls
    assert "http://images.cocodataset.org/annotations/annotations_trainval2014.zip" in urls
    listed = urls[
        "https://raw.githubusercontent.com/valeoai/LOST/master/datasets/coco_20k_filenames.txt"
    ]
    assert listed["sha256"] == COCO20K_LIST_SHA256
    assert set(manifest) >= {"voc07", "voc12", "coco20k"}
    with pytest.raises(LostregError, match="no download entry for 'imagenet'"):
        manifest_files("imagenet")


def test_prepare_voc_end_to_end(
    server: tuple[str, _Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, httpd = server
    xml = (
        "<annotation><size><width>20</width><height>10</height></size><object><name>a</name>"
        "<bndbox><xmin>2</xmin><ymin>3</ymin><xmax>8</xmax><ymax>9</ymax></bndbox></object>"
        "</annotation>"
    )
    members = {
        "VOCdevkit/VOC2007/Annotations/000001.xml": xml.encode(),
        "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt": b"000001\n",
        "VOCdevkit/VOC2007/JPEGImages/000001.jpg": b"not really a jpeg",
    }
    archive = _tar(tmp_path / "voc.tar", members)
    data = archive.read_bytes()
    httpd.files["/voc.tar"] = data
    manifest = {"voc07": {"files": [{
        "role": "archive", "url": f"{url}/voc.tar", "file": "voc.tar",
        "sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest(),
    }]}}
    manifest_path = tmp_path / "downloads.json"
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setattr(dl, "MANIFEST_PATH", manifest_path)

    root = tmp_path / "data"
    folder = prepare_voc(root, 2007, progress=False)
    assert folder == root / "VOC2007"
    assert load_voc(root, 2007).records[0].boxes == ((1.0, 2.0, 8.0, 9.0),)
    assert not (root / "downloads" / "voc.tar").exists()  # archive removed after unpacking
    assert sorted(p.name for p in root.iterdir()) == ["VOC2007", "downloads"]  # no temp left
    assert prepare_voc(root, 2007, progress=False) == folder  # present: nothing fetched
    assert len(httpd.ranges) == 1


def test_a_failed_automatic_download_says_where_the_data_was_looked_for(tmp_path, monkeypatch) -> None:
    """Offline, a missing dataset must not surface as a bare network error."""
    import dataclasses

    from lostreg import datasets

    def offline(root: Path) -> None:
        raise LostregError("http://example/VOC.tar: download failed (Name or service not known)")

    spec = dataclasses.replace(datasets.DATASETS["voc07"], download=offline)
    monkeypatch.setitem(datasets.DATASETS, "voc07", spec)
    with pytest.raises(LostregError, match=r"\(voc07\) is not under .*nowhere .*downloading it "
                                           r"failed: http://example/VOC.tar: download failed"):
        datasets.load_dataset("voc07", tmp_path / "nowhere")


# ------------------------------------------------------- offline, failed attempts, new roots


def _closed_port_url() -> str:
    """A loopback URL nothing listens on: the connection is refused at once, like offline."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _offline_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _closed_port_url()
    manifest = {
        "voc07": {"files": [{"role": "archive", "url": f"{url}/voc.tar", "file": "voc.tar"}]},
        "coco20k": {"files": [
            {"role": "list", "url": f"{url}/list.txt", "file": "coco_20k_filenames.txt"},
            {"role": "annotations", "url": f"{url}/ann.zip", "file": "ann.zip"},
            {"role": "images", "url": f"{url}/img.zip", "file": "img.zip"},
        ]},
    }
    path = tmp_path / "downloads.json"
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr(dl, "MANIFEST_PATH", path)


@pytest.mark.parametrize("name", ["voc07", "coco20k"])
def test_download_command_offline_says_offline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        name: str) -> None:
    from lostreg.datasets.__main__ import main as datasets_main

    _offline_manifest(tmp_path, monkeypatch)
    root = tmp_path / "data"
    root.mkdir()
    assert datasets_main(["download", name, "--data-root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: http://127.0.0.1:")
    assert "download failed" in err and "; offline? copy " in err
    assert str(root) in err and "Offline use" in err


def test_a_checksum_mismatch_is_not_called_offline(
        server: tuple[str, _Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from lostreg.datasets.__main__ import main as datasets_main

    url, _ = server
    manifest = {"voc07": {"files": [{"role": "archive", "url": f"{url}/data.bin",
                                     "file": "voc.tar", "md5": "0" * 32}]}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(dl, "MANIFEST_PATH", tmp_path / "m.json")
    assert datasets_main(["download", "voc07", "--data-root", str(tmp_path / "d"),
                          "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "md5 mismatch" in err and "offline?" not in err


def test_failed_coco_download_leaves_no_empty_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline_manifest(tmp_path, monkeypatch)
    fresh = tmp_path / "new" / "root"
    with pytest.raises(dl.NetworkError):
        dl.prepare_coco20k(fresh, progress=False)
    assert not (tmp_path / "new").exists()  # everything it created is gone, the root too

    existing = tmp_path / "mine"
    (existing / "VOC2007").mkdir(parents=True)
    (existing / "notes.txt").write_text("keep")
    with pytest.raises(dl.NetworkError):
        dl.prepare_coco20k(existing, progress=False)
    assert sorted(p.name for p in existing.iterdir()) == ["VOC2007", "notes.txt"]

    # A COCO folder the user made (or holding files) is never removed.
    (existing / "COCO").mkdir()
    with pytest.raises(dl.NetworkError):
        dl.prepare_coco20k(existing, progress=False)
    assert (existing / "COCO").is_dir() and not any((existing / "COCO").iterdir())


def test_failed_download_keeps_a_partial_file_for_resuming(
        server: tuple[str, _Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, httpd = server
    manifest = {"voc07": {"files": [{"role": "archive", "url": f"{url}/data.bin",
                                     "file": "voc.tar"}]}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(dl, "MANIFEST_PATH", tmp_path / "m.json")

    def cut(self, amount: int = -1) -> bytes:  # the connection drops mid-download
        raise ConnectionResetError(104, "Connection reset by peer")

    root = tmp_path / "new" / "d"  # created by the attempt, but holding the .part: kept
    monkeypatch.setattr("http.client.HTTPResponse.read", cut)
    with pytest.raises(dl.NetworkError, match="is kept, run again to resume"):
        dl.prepare_voc(root, 2007, progress=False)
    assert [p.name for p in (root / "downloads").iterdir()] == ["voc.tar.part"]
    assert [p.name for p in root.iterdir()] == ["downloads"]


def test_download_into_a_new_root_says_so(
        server: tuple[str, _Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, httpd = server
    archive = _tar(tmp_path / "voc.tar", {
        "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt": b"",
        "VOCdevkit/VOC2007/Annotations/.keep": b"",
    })
    httpd.files["/voc.tar"] = archive.read_bytes()
    manifest = {"voc07": {"files": [{"role": "archive", "url": f"{url}/voc.tar",
                                     "file": "voc.tar"}]}}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(dl, "MANIFEST_PATH", tmp_path / "m.json")
    root = tmp_path / "typo" / "root"
    prepare_voc(root, 2007, progress=False)
    err = capsys.readouterr().err
    assert err == f"warning: created the data root {root} for VOC2007\n"
    (tmp_path / "other").mkdir()
    prepare_voc(tmp_path / "other", 2007, progress=False)
    assert capsys.readouterr().err == ""  # an existing root: nothing to say


def test_demo_in_a_missing_root_is_generated_and_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lostreg.datasets import load_dataset

    root = tmp_path / "nonexistent" / "dir"
    assert len(load_dataset("demo", root)) == 24
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: created the data root {root} for the demo dataset"]
    load_dataset("demo", root)
    assert capsys.readouterr().err == ""

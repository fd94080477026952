"""Download and unpack the official dataset archives (standard library only: urllib, tarfile).

Downloads go to ``<dest>.part`` and resume with an HTTP Range request after an interruption
(the COCO image zip is 13 GB); the file is renamed to ``dest`` only once its checksum matches,
so a file at ``dest`` is always complete. Archives are unpacked into a temporary folder next
to the target and moved into place, and members that would land outside it are refused.

What to fetch is listed in ``lostreg/datasets/manifests/downloads.json``, package data, so an
installed lostreg (``pip install .``, a wheel) can download a dataset without a checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from lostreg.datasets.voc import is_plain_file_name, read_split_ids, voc_is_present, voc_year_folder
from lostreg.errors import LostregError
from lostreg.io import JsonInputError, atomic_write_text, loads_bounded, sha256_file

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MANIFEST_PATH: Path | Traversable = resources.files("lostreg.datasets") / "manifests" / "downloads.json"
# a manifest of one's own (a mirror: the same format, its own URLs and checksums)
MANIFEST_ENV = "LOSTREG_DOWNLOAD_MANIFEST"
_MAX_MANIFEST_BYTES = 1 << 20  # the manifest is 2 KB
DOWNLOADS_FOLDER = "downloads"
_CHUNK = 1 << 20
_USER_AGENT = "lostreg-datasets/0.1 (+urllib)"


class NetworkError(LostregError):
    """A download that could not reach its server or was cut off (offline, DNS, timeout), as
    opposed to a server's refusal or a checksum mismatch: the one case where "offline?" is the
    right hint."""


def manifest_path() -> Path | Traversable:
    """The manifest downloads read: ``$LOSTREG_DOWNLOAD_MANIFEST`` when set (a mirror, behind
    a firewall, or a local server in the tests), else the one shipped in the package."""
    override = os.environ.get(MANIFEST_ENV, "").strip()
    return Path(override).expanduser() if override else MANIFEST_PATH


def load_manifest(path: Path | Traversable | None = None) -> dict[str, Any]:
    """Read the download manifest (dataset name -> list of files with url and checksums)."""
    path = manifest_path() if path is None else path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LostregError(
            f"{path}: download manifest not found (lostreg is installed without its package "
            "data; reinstall it)") from None
    except OSError as exc:
        raise LostregError(f"{path}: cannot read the download manifest ({exc})") from None
    try:
        manifest = loads_bounded(data, str(path), max_bytes=_MAX_MANIFEST_BYTES)
    except JsonInputError as exc:
        raise LostregError(f"{path}: cannot read the download manifest ({exc.reason})") from None
    if not isinstance(manifest, dict):
        raise LostregError(f"{path}: the download manifest must be a JSON object")
    return manifest


def manifest_files(name: str, path: Path | Traversable | None = None) -> list[dict[str, Any]]:
    """The manifest entries of one dataset, checked for the fields the helpers need."""
    path = manifest_path() if path is None else path
    manifest = load_manifest(path)
    entry = manifest.get(name)
    files = entry.get("files") if isinstance(entry, dict) else None
    if not isinstance(files, list) or not files:
        raise LostregError(f"{path}: no download entry for {name!r}")
    for item in files:
        if not isinstance(item, dict) or not item.get("url") or not item.get("file"):
            raise LostregError(f"{path}: entry of {name!r} lacks 'url' or 'file': {item!r}")
        if not is_plain_file_name(str(item["file"])):
            raise LostregError(f"{path}: entry of {name!r} has a bad file name {item['file']!r}")
    return files


class _Hashes:
    """sha256 and md5 side by side, so one pass over the data checks whichever is known."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.md5.update(data)


def download_file(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: bool = True,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest``, resuming ``dest.part``; verify sha256/md5; rename atomically.

    An existing ``dest`` is checked like a download (a user may have put it there, or another
    file may have taken its name): on a mismatch a ``LostregError`` names both sums and the
    file is kept (it is not ours to delete). On a checksum mismatch of a download the partial
    file is deleted (resuming corrupt data would never succeed) and a ``LostregError`` names
    the file, the expected and the actual hash. On a network error the partial file is kept
    so the next call resumes.
    """
    dest = Path(dest).expanduser()
    if dest.is_file():
        _check_existing(dest, sha256, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0

    hashes = _Hashes()
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Nothing left to send: the partial file is already whole; checksum decides.
            _hash_file(part, hashes)
            _finish(part, dest, hashes, sha256, md5)
            return dest
        raise LostregError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NetworkError(f"{url}: download failed ({reason})") from None

    with response:
        status = getattr(response, "status", None)
        content_range = response.headers.get("Content-Range", "") or ""
        resumed = offset > 0 and status == 206 and content_range.startswith(f"bytes {offset}-")
        if resumed:
            _hash_file(part, hashes)
        else:
            offset = 0  # server ignored the Range (or gave another one): start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        try:
            _stream(response, part, "ab" if resumed else "wb", hashes,
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                         desc=dest.name, disable=not progress, leave=False))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise NetworkError(
                f"{url}: download interrupted ({exc}); {part} is kept, run again to resume"
            ) from None
    if total is not None and part.stat().st_size != total:
        raise NetworkError(
            f"{url}: download ended early ({part.stat().st_size} of {total} bytes); "
            f"{part} is kept, run again to resume"
        )
    _finish(part, dest, hashes, sha256, md5)
    return dest


def _stream(response: Any, part: Path, mode: str, hashes: _Hashes, bar: Any) -> None:
    """Append (or write) the response to ``part`` chunk by chunk, hashing as it goes, and
    make it durable before the checksum decides."""
    with open(part, mode) as handle, bar:
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            handle.write(chunk)
            hashes.update(chunk)
            bar.update(len(chunk))
        handle.flush()
        os.fsync(handle.fileno())


def _check_existing(dest: Path, sha256: str | None, md5: str | None) -> None:
    """A file already at ``dest`` (put there by the user, or left by an older lostreg) is
    checked like a download; on a mismatch it is kept, since it is not ours to delete."""
    if sha256 is None and md5 is None:
        return
    hashes = _Hashes()
    _hash_file(dest, hashes)
    _check_sums(dest, hashes, sha256, md5, "the file was already there; delete or replace it")


def _hash_file(path: Path, hashes: _Hashes) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            hashes.update(chunk)


def _check_sums(dest: Path, hashes: _Hashes, sha256: str | None, md5: str | None,
                what_now: str, on_mismatch: Callable[[], None] = lambda: None) -> None:
    """Compare the known checksums; on a mismatch call ``on_mismatch`` and raise one line
    naming ``dest``, both sums and ``what_now``."""
    for algorithm, expected, digest in (
        ("sha256", sha256, hashes.sha256), ("md5", md5, hashes.md5)
    ):
        if expected is None:
            continue
        actual = digest.hexdigest()
        if actual != expected.lower():
            on_mismatch()
            raise LostregError(
                f"{dest}: {algorithm} mismatch (expected {expected}, got {actual}); {what_now}")


def _finish(
    part: Path, dest: Path, hashes: _Hashes, sha256: str | None, md5: str | None
) -> None:
    """Check the checksums of the complete ``part``, then move it to ``dest``."""
    _check_sums(dest, hashes, sha256, md5, "the partial download was deleted",
                lambda: part.unlink(missing_ok=True))
    os.replace(part, dest)


def _member_target(dest: Path, name: str, archive: Path) -> Path:
    """Where member ``name`` would go; refuse names that could escape ``dest``."""
    normalised = name.replace("\\", "/")
    pure = PurePosixPath(normalised)
    if (
        not normalised
        or normalised.startswith("/")
        or PureWindowsPath(name).drive
        or ".." in pure.parts
        or "\x00" in name
    ):
        raise LostregError(f"{archive}: member {name!r} would be written outside {dest}; refused")
    target = (dest / pure).resolve()
    if target != dest and not target.is_relative_to(dest):
        raise LostregError(f"{archive}: member {name!r} would be written outside {dest}; refused")
    return target


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip`` into ``dest``.

    Every member is checked before anything is written: absolute names, ``..`` components,
    links and device files are refused (the official archives contain none of them).
    """
    archive = Path(archive)
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    if not archive.is_file():
        raise LostregError(f"{archive}: archive not found")
    name = archive.name.lower()
    try:
        if name.endswith(".zip") or (not _is_tar_name(name) and zipfile.is_zipfile(archive)):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _member_target(dest, info.filename, archive)
                zf.extractall(dest)
        elif _is_tar_name(name) or tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for member in members:
                    _member_target(dest, member.name, archive)
                    if not (member.isfile() or member.isdir()):
                        raise LostregError(
                            f"{archive}: member {member.name!r} is a link or special file; refused"
                        )
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tf.extractall(dest, members=members)
        else:
            raise LostregError(f"{archive}: not a .tar, .tar.gz or .zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise LostregError(f"{archive}: corrupt or truncated archive ({exc})") from None
    return dest


def _is_tar_name(name: str) -> bool:
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def _install(archive: Path, inner: str, target: Path,
             layout: Callable[[Path], str | None]) -> None:
    """Extract ``archive`` next to ``target`` and move its ``inner`` path to ``target``, once
    ``layout`` (what is wrong with the extracted ``inner``, or None) found nothing wrong.

    Unpacking into a temporary sibling and renaming means ``target`` appears complete or not
    at all, so an interrupted extraction is redone rather than mistaken for data; checking
    the layout first means an archive of the wrong shape (a file where the dataset's folder
    should be) is reported, with the archive kept, instead of being installed as "ready".
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent))
    try:
        extract_archive(archive, tmp)
        source = tmp / inner
        if not source.exists():
            raise LostregError(f"{archive}: does not contain {inner!r}")
        problem = layout(source)
        if problem:
            raise LostregError(f"{archive}: {inner} {problem}, so this is not the dataset's "
                               "archive; it is kept, nothing was installed")
        os.replace(source, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _a_folder(path: Path) -> str | None:
    return None if path.is_dir() else "is a file, not a folder"


def _first_missing(folder: Path, names: Iterable[str], listed_by: str) -> str | None:
    """What keeps ``folder`` from holding every file of a list (``names``, relative to it):
    its first missing file, as the list (``listed_by``) names it; None when all are there."""
    for name in names:
        if not (folder / name).is_file():
            return f"has no file {name}, which {listed_by} lists"
    return None


def _voc_layout(folder: Path) -> str | None:
    """What keeps an extracted ``VOCdevkit/VOC<year>`` from being a VOC folder, or None: the
    split file ``voc_is_present`` looks for, and the image and annotation of every image it
    lists (as VOC names them: ``<id>.jpg``, ``<id>.xml``). A split file alone would report
    "ready" and delete the archive, leaving a run to find every image missing."""
    if (problem := _a_folder(folder)) is not None:
        return problem
    split = folder / "ImageSets" / "Main" / "trainval.txt"
    if not split.is_file():
        return "has no ImageSets/Main/trainval.txt file"
    try:
        ids = read_split_ids(split)
    except LostregError as exc:
        return f"has a trainval.txt that is no list of image ids ({str(exc).split(': ', 1)[-1]})"
    return _first_missing(folder, (f"{sub}/{image_id}{suffix}" for image_id in ids
                                   for sub, suffix in (("JPEGImages", ".jpg"),
                                                       ("Annotations", ".xml"))),
                          "its trainval.txt")


def _holds_listed_images(list_path: Path) -> Callable[[Path], str | None]:
    """The layout check of an extracted ``train2014``: a folder holding every image of the
    COCO 20k list (read when the check runs: the list is fetched first)."""
    from lostreg.datasets.coco import read_coco20k_list

    def layout(folder: Path) -> str | None:
        return _a_folder(folder) or _first_missing(folder, read_coco20k_list(list_path),
                                                   list_path.name)

    return layout


def _a_file(path: Path) -> str | None:
    return None if path.is_file() else "is not a file"


def _fetch(item: dict[str, Any], folder: Path, progress: bool) -> Path:
    return download_file(
        item["url"], folder / item["file"], sha256=item.get("sha256"), progress=progress,
        md5=item.get("md5"),
    )


PIN_SUFFIX = ".sha256"


def fetch_pinned(item: dict[str, Any], folder: Path, progress: bool) -> Path:
    """``_fetch`` for an entry that has no published checksum: trust on first use. The first
    download's sha256 is written beside it (``<file>.sha256``, with the URL) and printed, and
    every later download of that file into the same folder must match it, so an archive the
    server replaced (or a corrupt transfer) is never unpacked unnoticed after the first time.
    An entry with a sha256 or md5 is fetched as usual."""
    if item.get("sha256") or item.get("md5"):
        return _fetch(item, folder, progress)
    pin = folder / (str(item["file"]) + PIN_SUFFIX)
    pinned = None
    if pin.is_file():
        words = pin.read_text(encoding="utf-8", errors="replace").split()
        if not words or len(words[0]) != 64 or any(c not in "0123456789abcdef" for c in words[0]):
            raise LostregError(f"{pin}: not a sha256 pin (64 hex digits, then the URL); "
                               "delete it to pin the next download")
        pinned = words[0]
    path = download_file(item["url"], folder / item["file"], sha256=pinned, progress=progress)
    if pinned is None:
        digest = sha256_file(path)
        atomic_write_text(pin, f"{digest}  {item['url']}\n")
        print(f"note: {item['url']} has no published checksum; its sha256 {digest} is pinned "
              f"in {pin} (later downloads must match it)", file=sys.stderr)
    return path


def _item(files: list[dict[str, Any]], role: str) -> dict[str, Any]:
    for item in files:
        if item.get("role") == role:
            return item
    raise LostregError(f"{manifest_path()}: no file with role {role!r}")


@contextlib.contextmanager
def removed_if_failed(*folders: Path) -> Iterator[list[Path]]:
    """Undo the folders a failed attempt created: yields the folders among ``folders`` and
    their ancestors that do not exist yet; if the body raises, each of them that is still
    empty is removed (deepest first). Only ``rmdir``: a folder holding anything (a ``.part``
    file kept for resuming, data the user put there meanwhile) stays, so nothing is lost."""
    created: list[Path] = []
    for folder in folders:
        for path in (folder, *folder.parents):
            if path.exists():
                break
            if path not in created:
                created.append(path)
    try:
        yield created
    except BaseException:
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def note_created_root(root: Path, created: list[Path], what: str) -> None:
    """One line on stderr when ``root`` was created (a mistyped ``--data-root`` should not
    silently become a new folder): names the absolute folder and what went there."""
    if root in created:
        print(f"warning: created the data root {Path(os.path.abspath(root))} for {what}",
              file=sys.stderr)


def prepare_voc(
    root: str | Path, year: int, progress: bool = True, keep_archive: bool = False
) -> Path:
    """Download the VOC ``year`` trainval tar and install it as ``ROOT/VOC<year>``."""
    root = Path(root).expanduser()
    if voc_is_present(root, year):
        return voc_year_folder(root, year)  # type: ignore[return-value]
    target = root / f"VOC{year}"
    if target.exists():
        raise LostregError(
            f"{target}: exists but has no ImageSets/Main/trainval.txt; move it away and retry"
        )
    item = _item(manifest_files(f"voc{str(year)[-2:]}"), "archive")
    with removed_if_failed(root / DOWNLOADS_FOLDER) as created:
        archive = _fetch(item, root / DOWNLOADS_FOLDER, progress)
        _install(archive, f"VOCdevkit/VOC{year}", target, _voc_layout)
        if not keep_archive:
            archive.unlink(missing_ok=True)
    note_created_root(root, created, f"VOC{year}")
    return target


def prepare_coco20k(root: str | Path, progress: bool = True, keep_archive: bool = False) -> Path:
    """Download train2014 images, their annotations and the 20k list into ``ROOT/COCO``."""
    from lostreg.datasets.coco import ANNOTATION_REL, IMAGES_REL, LIST_NAME, coco_folder

    root = Path(root).expanduser()
    folder = coco_folder(root)
    files = manifest_files("coco20k")
    downloads = root / DOWNLOADS_FOLDER

    list_item = _item(files, "list")
    steps = (
        ("annotations", "annotations/instances_train2014.json", folder / ANNOTATION_REL, _a_file),
        ("images", "train2014", folder / IMAGES_REL, _holds_listed_images(folder / LIST_NAME)),
    )
    with removed_if_failed(downloads, *(step[2].parent for step in steps)) as created:
        download_file(
            list_item["url"], folder / LIST_NAME, sha256=list_item.get("sha256"),
            progress=progress, md5=list_item.get("md5"),
        )
        for role, inner, target, layout in steps:
            if target.exists():
                continue
            archive = _fetch(_item(files, role), downloads, progress)
            _install(archive, inner, target, layout)
            if not keep_archive:
                archive.unlink(missing_ok=True)
    note_created_root(root, created, "COCO 20k")
    return folder

"""Per-image feature cache: the backbone runs once per image, LOST sweeps reuse its output.

Layout under the cache root (``results/cache`` by default), one folder per *key*::

    <root>/<dataset>-<split>-<model>-<feature>-<hash>/
        key.json                 # the key in full (for people; shards carry its hash)
        shards/<name>.feats      # one batch of features (one padded size), written atomically
        index/<writer>.jsonl     # image_id -> shard + row, one file per writing process

The key is everything that decides the features: model (short + timm name + model kwargs),
weights identity (sha256 of the file, or ``random``), dataset + split (``no_hard`` and
``--limit`` do not change features: entries are per image id), feature kind, preprocessing
(mean/std, patch size, position-embedding interpolation), ``--precision`` and the stored dtype,
and the code that computed them: the cache format, the package version and the **result
version** (``lostreg.version.RESULT_VERSION``, bumped exactly when a change alters a
prediction or figure, the features included). Features written by code of another result
version are never reused: the key, hence the folder, differs (the key and the folder name it
gives are in ``lostreg.features.cache_key``). A run never reads nor removes folders of other
keys; when some were written by another format, package or result version (*stale*: no code of
this version reads them again), it says so in one note line, and ``python -m lostreg.cache
DIR`` lists every folder and removes the stale ones (``lostreg.features.cache_admin``).

A model kwarg that JSON cannot hold enters the key as its ``repr`` (a callable, a dtype; a
NaN or an infinite float: ``nan``, ``inf``, ``-inf``), so every key is deterministic and
``key.json`` and the shard headers, written strictly (``dumps_strict``), never hold NaN.

A shard is ``MAGIC | header length (8 bytes, little endian) | sha256 (32 bytes) | JSON header |
payload``. The sha256 covers every other byte of the file (magic, length, header, payload), so
a flipped bit anywhere, a grid ``[12, 16]`` read as ``[16, 12]`` included, is caught. The
header holds the key (and its hash), dtype, grid, per-row image ids, sizes and image
fingerprints, and the payload length. Every read checks all of it: a truncated, corrupted,
foreign or older-format shard is reported as a warning and its images are recomputed, never
used. Shards are read one at a time (the index is the only thing held in memory), so memory
stays flat whatever the cache size.

Images are keyed by a fingerprint of their file's bytes (``image_fingerprint``: sha256), not
their size: an image replaced by another one of the same byte size misses the cache. The
fingerprint is checked twice: the image file's against the index entry (``lookup``), and the
index entry's against the shard header (``read``), which the checksum covers.

A cache that cannot be written (read-only, full disk, not a folder) is only a slower run: the
first failed write or removal warns once and turns writing off for that cache; reading what
is there still works.

Each writing process appends to its own index file (no two processes append to one file), and
files are read in name order (their names start with the creation time), so a later entry for
an image wins over an earlier one.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lostreg.datasets.base import DEFAULT_MAX_PIXELS, max_image_file_bytes
from lostreg.errors import LostregError, os_error_message
from lostreg.features.cache_key import (  # noqa: F401 - the key's names, imported from here too
    DEFAULT_CACHE_DIR,
    FORMAT_VERSION,
    KeyFileMissing,
    cache_key,
    folder_name,
    json_safe_kwargs,
    key_hash,
    read_key_file,
    safe_name,
)
from lostreg.io import (
    JsonlAppender,
    atomic_write_bytes,
    atomic_write_json,
    dumps_strict,
    loads_bounded,
)

MAGIC = b"LRFEATS\x02"
_OLD_MAGICS = {b"LRFEATS\x01": 1}
_DIGEST_AT = len(MAGIC) + 8  # the sha256 follows the header length
_HEADER_AT = _DIGEST_AT + 32
_SHARD_NAME = re.compile(r"^[0-9]{20}-[0-9a-f]{12}\.feats$")
FINGERPRINT_PREFIX = "sha256:"
CACHE_DTYPES = ("auto", "fp32", "bf16", "fp16")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAME_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_MAX_HEADER = 64 << 20
_MAX_INDEX_LINE = 64 << 10  # an index line is about 150 bytes


def storage_dtype(cache_dtype: str, precision: str) -> str:
    """The dtype features are stored in: ``auto`` keeps what the backbone produced, exactly.

    In fp32 runs that is fp32; with ``--precision bf16|fp16`` the last ``qkv`` projection runs
    under autocast and its output is already bf16/fp16, so storing it in that dtype loses
    nothing and halves the cache.
    """
    if cache_dtype not in CACHE_DTYPES:
        raise LostregError(f"--cache-dtype {cache_dtype!r}: expected one of "
                           f"{', '.join(CACHE_DTYPES)}")
    return precision if cache_dtype == "auto" else cache_dtype


def is_lossless(storage: str, precision: str) -> bool:
    """Whether features of a ``precision`` run survive storage in ``storage`` bit for bit."""
    return storage == "fp32" or storage == precision


class CacheProblem(Exception):
    """A shard that must not be used (missing, truncated, corrupted or foreign)."""


class CacheEntry(NamedTuple):
    shard: str
    row: int
    fingerprint: str | None


@dataclass
class Shard:
    """One verified shard: features ``(B, rows*cols, D)`` in the stored dtype, on the CPU."""

    path: Path
    image_ids: list[str]
    sizes: list[tuple[int, int]]
    grid: tuple[int, int]
    feats: torch.Tensor
    fingerprints: list[str | None]


def image_fingerprint(path: str | os.PathLike, max_pixels: int | None = None) -> str | None:
    """``sha256:<hex>`` of the image file's bytes: what the cache keys an image by.

    sha256 rather than blake2b: with the SHA extensions most x86 and ARM CPUs have, OpenSSL's
    sha256 is the faster of the two (``benchmarks/bench_fingerprint.py`` measures its cost
    against decoding the image). None when the file cannot be read, or when it is larger than
    any image of ``max_pixels`` pixels can be (``max_image_file_bytes``; the default
    ``--max-pixels`` when None), judged by its size before a byte is hashed: hashing an 8 GiB
    file took 34 s, six times the whole run without the cache. Such an image never matches a
    cache entry, and its decoding reports the problem.
    """
    limit = max_image_file_bytes(DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > limit:
                return None
            return FINGERPRINT_PREFIX + hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _index_entry(line: object) -> tuple[str, CacheEntry]:
    """One index line, validated: a line that could point outside the shard folder or carry
    the wrong types raises ``ValueError``."""
    if not isinstance(line, dict):
        raise ValueError("not an object")
    image_id, shard, row = line.get("image_id"), line.get("shard"), line.get("row")
    fingerprint = line.get("fingerprint")
    if not isinstance(image_id, str) or not isinstance(shard, str) or not _SHARD_NAME.match(shard):
        raise ValueError("bad image_id or shard")
    if not isinstance(row, int) or isinstance(row, bool) or row < 0:
        raise ValueError("bad row")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError("bad fingerprint")
    return image_id, CacheEntry(shard, row, fingerprint)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class FeatureCache:
    """The features of one key: look up image ids, read verified shards, write new ones."""

    def __init__(self, root: str | os.PathLike, key: dict[str, Any], writer_tag: str = "") -> None:
        self.key = key
        self.hash = key_hash(key)
        self.dir = Path(root) / folder_name(key, self.hash)
        self.shard_dir = self.dir / "shards"
        self.index_dir = self.dir / "index"
        self.writer_tag = safe_name(writer_tag)
        self._appender: JsonlAppender | None = None
        self._lock = threading.Lock()
        self._index: dict[str, CacheEntry] = {}
        self._loaded = False
        self.writable = True  # turned off, with one warning, by the first failed write

    # --- index --------------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        key_file = self.dir / "key.json"
        try:  # a linked, deep or huge key.json is as stale as a damaged one (never a traceback)
            stale = read_key_file(key_file) != self.key
        except KeyFileMissing:  # a folder not written yet
            stale = False
        except LostregError:  # a link, not a file, unreadable, too large or not JSON
            stale = True
        if stale:
            warn(f"feature cache {key_file}: unreadable or does not match its folder; rewriting "
                 "it (shards are checked against the key hash one by one)")
            self._write_key()
        for path in sorted(self.index_dir.glob("*.jsonl")):
            bad = self._load_index_file(path)
            if bad:
                warn(f"feature cache index {path}: {bad} bad line(s) ignored")

    def _load_index_file(self, path: Path) -> int:
        """Read one index file into ``_index``; returns how many lines were not usable (a
        torn last line, from a kill, is not counted: it was never durable)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            warn(f"feature cache index: {os_error_message(exc)}; ignoring it")
            return 0
        bad = 0
        for raw in data[: data.rfind(b"\n") + 1].splitlines():
            try:  # a deep or overlong line is a bad line: a cache never fails a run
                image_id, entry = _index_entry(loads_bounded(raw, str(path),
                                                             max_bytes=_MAX_INDEX_LINE))
            except ValueError:  # JsonInputError (bad, deep, long) and bad fields
                bad += 1
                continue
            self._index[image_id] = entry
        return bad

    def _write_key(self) -> None:
        try:
            atomic_write_json(self.dir / "key.json", self.key)
        except OSError as exc:
            self._cannot_write(exc)

    def _cannot_write(self, exc: OSError) -> None:
        """Turn writing off for this cache, warning once: a cache is an optimisation, and a
        read-only or full one must never fail a run (nor every rerun of it)."""
        with self._lock:
            first, self.writable = self.writable, False
        if first:
            warn(f"feature cache {self.dir}: cannot write ({os_error_message(exc)}); "
                 "continuing without storing features there")

    def __len__(self) -> int:
        self._load()
        return len(self._index)

    def lookup(self, image_id: str, fingerprint: str | None) -> CacheEntry | None:
        """The entry of ``image_id`` if it was stored for the same image file (same
        ``image_fingerprint``), else None; an image without a fingerprint never matches."""
        self._load()
        entry = self._index.get(image_id)
        if entry is None or fingerprint is None or entry.fingerprint != fingerprint:
            return None
        return entry

    def forget(self, shard: str) -> None:
        """Drop a bad shard and every entry pointing at it; its images are recomputed. A shard
        that cannot be removed (read-only cache) stays, and is refused again next time."""
        self._load()
        with self._lock:
            for image_id in [i for i, e in self._index.items() if e.shard == shard]:
                del self._index[image_id]
        if not _SHARD_NAME.match(shard) or not self.writable:
            return
        try:
            (self.shard_dir / shard).unlink(missing_ok=True)
        except OSError as exc:
            self._cannot_write(exc)

    # --- shards -------------------------------------------------------------------------

    def read(self, shard: str) -> Shard:
        """Read and verify one shard; raises ``CacheProblem`` saying what is wrong with it."""
        path = self.shard_dir / shard
        if not _SHARD_NAME.match(shard):
            raise CacheProblem(f"{path}: not a shard name of this cache")
        try:
            size = path.stat().st_size
            buffer = bytearray(size)
            with open(path, "rb") as handle:
                got = handle.readinto(buffer)
        except OSError as exc:
            raise CacheProblem(f"{path}: cannot read ({exc.strerror or exc})") from None
        if got != size:
            raise CacheProblem(f"{path}: changed while being read")
        header, offset = _verified_header(path, buffer)
        try:
            dtype = _NAME_DTYPES[header["dtype"]]
            rows, cols = (int(v) for v in header["grid"])
            dim = int(header["dim"])
            ids = [str(e["image_id"]) for e in header["entries"]]
            sizes = [(int(e["size"][0]), int(e["size"][1])) for e in header["entries"]]
            fingerprints = [e["fingerprint"] for e in header["entries"]]
            expected_bytes = int(header["payload_bytes"])
            foreign = (header["key"] != self.hash or header["format"] != FORMAT_VERSION
                       or header.get("cache_key", self.key) != self.key)
        except (ValueError, KeyError, TypeError, IndexError):
            raise CacheProblem(f"{path}: unreadable header") from None
        if foreign:
            raise CacheProblem(f"{path}: written for another cache key")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if expected_bytes != len(ids) * rows * cols * dim * itemsize \
                or len(buffer) - offset != expected_bytes:
            raise CacheProblem(f"{path}: header shapes disagree with its payload length")
        self._check_rows(shard, path, ids, fingerprints)
        feats = torch.frombuffer(buffer, dtype=dtype, offset=offset,
                                 count=len(ids) * rows * cols * dim)
        return Shard(path, ids, sizes, (rows, cols), feats.view(len(ids), rows * cols, dim),
                     fingerprints)

    def _check_rows(self, shard: str, path: Path, ids: list[str],
                    fingerprints: list[str | None]) -> None:
        """Every index entry pointing into the shard names the image (id and fingerprint) the
        shard's checksummed header holds at that row."""
        with self._lock:
            entries = [(i, e) for i, e in self._index.items() if e.shard == shard]
        for image_id, entry in entries:
            if entry.row >= len(ids) or ids[entry.row] != image_id \
                    or fingerprints[entry.row] != entry.fingerprint:
                raise CacheProblem(f"{path}: rows do not match the cache index "
                                   f"(image {image_id})")

    def write(self, image_ids: Sequence[str], sizes: Sequence[tuple[int, int]],
              fingerprints: Sequence[str | None], grid: tuple[int, int],
              feats: torch.Tensor) -> bool:
        """Store features ``(B, rows*cols, D)`` (CPU) of one batch: the shard atomically, then
        its index lines durably, so an index line never points at a missing or partial shard.

        ``fingerprints`` are the images' ``image_fingerprint``. Returns False, without raising,
        when the cache cannot be written (warned once; later writes are skipped)."""
        if not self.writable:
            return False
        feats = feats.detach().to("cpu").contiguous()
        if feats.dtype not in _DTYPE_NAMES or feats.ndim != 3 or feats.shape[0] != len(image_ids):
            raise ValueError(f"bad features for the cache: {feats.dtype} {tuple(feats.shape)}")
        payload = feats.view(torch.uint8).numpy().tobytes()
        header = {
            "format": FORMAT_VERSION,
            "key": self.hash,
            "cache_key": self.key,  # in full, so a stray shard still says what it holds
            "dtype": _DTYPE_NAMES[feats.dtype],
            "grid": list(grid),
            "dim": int(feats.shape[2]),
            "entries": [{"image_id": i, "size": list(s), "fingerprint": f}
                        for i, s, f in zip(image_ids, sizes, fingerprints, strict=True)],
            "payload_bytes": len(payload),
        }
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.feats"
        lines = [{"image_id": i, "shard": name, "row": row, "fingerprint": f}
                 for row, (i, f) in enumerate(zip(image_ids, fingerprints, strict=True))]
        self._load()
        try:
            if not (self.dir / "key.json").exists():
                atomic_write_json(self.dir / "key.json", self.key)
            atomic_write_bytes(self.shard_dir / name,
                               _shard_bytes(header, payload, self.shard_dir / name))
            try:
                self._append_index(lines)
            except OSError:
                (self.shard_dir / name).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._cannot_write(exc)
            return False
        with self._lock:
            for line in lines:
                self._index[line["image_id"]] = CacheEntry(name, line["row"], line["fingerprint"])
        return True

    def _append_index(self, lines: list[dict]) -> None:
        with self._lock:
            if self._appender is None:
                tag = f"-{self.writer_tag}" if self.writer_tag else ""
                stem = f"{time.time_ns():020d}-{os.getpid()}{tag}"
                self._appender = JsonlAppender(self.index_dir / f"{stem}.jsonl")
            self._appender.write_many(lines)

    def close(self) -> None:
        with self._lock:
            appender, self._appender = self._appender, None
        if appender is not None:
            try:
                appender.close()
            except OSError as exc:
                self._cannot_write(exc)


def _shard_bytes(header: dict, payload: bytes, path: Path) -> bytes:
    """The file of one shard: the checksum covers every byte but its own. The header is
    written strictly (``dumps_strict``): a NaN or infinity in it (a size or grid a caller got
    wrong) is refused here, a ``ValueError`` naming ``path`` and the field, since every later
    read would refuse the header and recompute its images without saying why."""
    header_bytes = dumps_strict(header, path, sort_keys=True).encode()
    # pad with spaces so the payload starts 64-byte aligned (tensors are views of it)
    header_bytes += b" " * (-(_HEADER_AT + len(header_bytes)) % 64)
    prefix = MAGIC + len(header_bytes).to_bytes(8, "little")
    digest = hashlib.sha256(prefix)
    digest.update(header_bytes)
    digest.update(payload)
    return prefix + digest.digest() + header_bytes + payload


def _verified_header(path: Path, buffer: bytearray) -> tuple[dict, int]:
    """The JSON header of a shard's bytes and where its payload starts, after checking the
    magic and the whole-file checksum; ``CacheProblem`` otherwise."""
    magic = bytes(buffer[: len(MAGIC)])
    if magic in _OLD_MAGICS:
        raise CacheProblem(f"{path}: written in cache format {_OLD_MAGICS[magic]} (this lostreg "
                           f"reads format {FORMAT_VERSION})")
    if len(buffer) < _HEADER_AT or magic != MAGIC:
        raise CacheProblem(f"{path}: not a lostreg feature shard (bad magic or too short)")
    header_len = int.from_bytes(buffer[len(MAGIC): _DIGEST_AT], "little")
    if header_len > min(len(buffer) - _HEADER_AT, _MAX_HEADER):
        raise CacheProblem(f"{path}: truncated or corrupted header")
    view = memoryview(buffer)
    digest = hashlib.sha256(view[:_DIGEST_AT])
    digest.update(view[_HEADER_AT:])
    offset = _HEADER_AT + header_len
    try:  # header_len is at most _MAX_HEADER; a deep header is refused, not a RecursionError
        header = loads_bounded(bytes(view[_HEADER_AT:offset]), str(path), max_bytes=None)
    except ValueError:
        header = None
    if digest.digest() != bytes(view[_DIGEST_AT:_HEADER_AT]):
        try:  # say "truncated" when the (unverified) header says so; a kill cannot do that,
            expected = int(header["payload_bytes"])  # a copy or a full disk can
        except (TypeError, KeyError, ValueError):
            expected = -1
        if expected > len(buffer) - offset:
            raise CacheProblem(f"{path}: truncated ({len(buffer) - offset} of {expected} "
                               "payload bytes)")
        raise CacheProblem(f"{path}: checksum mismatch (corrupted)")
    if not isinstance(header, dict):
        raise CacheProblem(f"{path}: unreadable header")
    return header, offset


def to_storage(feats: torch.Tensor, storage: str, lossless: bool) -> torch.Tensor:
    """Features as they go into the cache; a lossless setting that would round (it should not:
    see ``storage_dtype``) falls back to fp32 rather than change a result."""
    stored = feats.to(STORAGE_DTYPES[storage])
    if lossless and stored.dtype != feats.dtype and not torch.equal(stored.to(feats.dtype), feats):
        return feats
    return stored


def prefetch(read: Callable[[str], Shard], names: Iterable[str],
             depth: int = 2) -> Iterator[tuple[str, Shard | CacheProblem]]:
    """Read shards in a background thread ``depth`` ahead of their use (file I/O and sha256
    release the GIL, so LOST on the previous shard overlaps with reading the next)."""

    def task(name: str) -> Shard | CacheProblem:
        try:
            return read(name)
        except CacheProblem as problem:
            return problem

    names = iter(names)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lostreg-cache-read") as pool:
        queue: list[tuple[str, Future]] = []
        for name in names:
            queue.append((name, pool.submit(task, name)))
            if len(queue) >= depth:
                break
        while queue:
            name, future = queue.pop(0)
            following = next(names, None)
            if following is not None:
                queue.append((following, pool.submit(task, following)))
            yield name, future.result()


class BackgroundWriter:
    """Writes cache shards in one background thread, at most ``max_pending`` batches behind
    (bounded memory). A cache that cannot be written warns once itself (``FeatureCache.write``
    returns False); any other failure of a write only costs a recompute later, so it warns."""

    def __init__(self, max_pending: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lostreg-cache-write")
        self._slots = threading.BoundedSemaphore(max_pending)
        self.failures = 0

    def submit(self, cache: FeatureCache, *args: Any) -> None:
        if not cache.writable:  # warned once already; do not even copy the features
            return
        self._slots.acquire()
        future = self._pool.submit(cache.write, *args)
        future.add_done_callback(lambda f, c=cache: self._done(f, c))

    def _done(self, future: Future, cache: FeatureCache) -> None:
        self._slots.release()
        exc = future.exception()
        if exc is not None:
            self.failures += 1
            if self.failures == 1:
                warn(f"feature cache {cache.dir}: cannot write ({exc.__class__.__name__}: {exc}); "
                     "continuing without caching these features")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Per-image feature cache: the backbone runs once per image, LOST sweeps reuse its output.

Layout under the cache root (``results/cache`` by default), one folder per *key*::

    <root>/<dataset>-<split>-<model>-<feature>-<hash>/
        key.json                 # the key in full (for people; shards carry its hash)
        shards/<name>.feats      # one batch of features (one padded size), written atomically
        index/<writer>.jsonl     # image_id -> shard + row, one file per writing process

The key is everything that decides the features: model (short + timm name + model kwargs),
weights identity (sha256 of the file, or ``random``), dataset + split (``no_hard`` and
``--limit`` do not change features: entries are per image id), feature kind, preprocessing
(mean/std, patch size, position-embedding interpolation), ``--precision`` and the stored dtype.

A shard is ``MAGIC | header length (8 bytes, little endian) | JSON header | payload``. The
header holds the key (and its hash), dtype, grid, per-row image ids and sizes, the payload
length and its sha256. Every read checks all of it: a truncated, corrupted or foreign shard
is reported as a warning and its images are recomputed, never used. Shards are read one at a
time (the index is the only thing held in memory), so memory stays flat whatever the cache
size.

Each writing process appends to its own index file (no two processes append to one file), and
files are read in name order (their names start with the creation time), so a later entry for
an image wins over an earlier one.
"""

from __future__ import annotations

import hashlib
import json
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

from lostreg.errors import LostregError
from lostreg.io import JsonlAppender, atomic_write_bytes, atomic_write_json, read_jsonl

FORMAT_VERSION = 1
MAGIC = b"LRFEATS\x01"
DEFAULT_CACHE_DIR = Path("results/cache")
CACHE_DTYPES = ("auto", "fp32", "bf16", "fp16")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAME_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_MAX_HEADER = 64 << 20


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


def cache_key(*, model: str, timm_name: str, model_kwargs: dict, weights: str,
              num_prefix_tokens: int, mean: Sequence[float], std: Sequence[float],
              patch_size: int, pos_embed: str, dataset: str, split: str, feature: str,
              precision: str, storage: str, lostreg_version: str) -> dict[str, Any]:
    """Everything that decides the cached features (see the module docstring)."""
    return {
        "format": FORMAT_VERSION,
        "model": model,
        "timm_name": timm_name,
        "model_kwargs": json.loads(json.dumps(model_kwargs, sort_keys=True, default=repr)),
        "weights": weights,
        "num_prefix_tokens": int(num_prefix_tokens),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "patch_size": int(patch_size),
        "pos_embed": pos_embed,
        "dataset": dataset,
        "split": split,
        "feature": feature,
        "precision": precision,
        "dtype": storage,
        "lostreg_version": lostreg_version,
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class CacheProblem(Exception):
    """A shard that must not be used (missing, truncated, corrupted or foreign)."""


class CacheEntry(NamedTuple):
    shard: str
    row: int
    file_size: int | None


@dataclass
class Shard:
    """One verified shard: features ``(B, rows*cols, D)`` in the stored dtype, on the CPU."""

    path: Path
    image_ids: list[str]
    sizes: list[tuple[int, int]]
    grid: tuple[int, int]
    feats: torch.Tensor


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class FeatureCache:
    """The features of one key: look up image ids, read verified shards, write new ones."""

    def __init__(self, root: str | os.PathLike, key: dict[str, Any], writer_tag: str = "") -> None:
        self.key = key
        self.hash = key_hash(key)
        arch = str(key["timm_name"]).split(".")[0]
        name = f"{key['dataset']}-{key['split']}-{arch}-{key['feature']}-{self.hash[:12]}"
        self.dir = Path(root) / _safe(name)
        self.shard_dir = self.dir / "shards"
        self.index_dir = self.dir / "index"
        self.writer_tag = _safe(writer_tag)
        self._appender: JsonlAppender | None = None
        self._lock = threading.Lock()
        self._index: dict[str, CacheEntry] = {}
        self._loaded = False

    # --- index --------------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        key_file = self.dir / "key.json"
        try:
            if key_file.is_file() and json.loads(key_file.read_text()) != self.key:
                warn(f"feature cache {key_file}: does not match its folder; rewriting it "
                     "(shards are checked against the key hash one by one)")
                atomic_write_json(key_file, self.key)
        except (OSError, ValueError):
            warn(f"feature cache {key_file}: unreadable; rewriting it")
            atomic_write_json(key_file, self.key)
        for path in sorted(self.index_dir.glob("*.jsonl")):
            try:
                for line in read_jsonl(path):
                    self._index[str(line["image_id"])] = CacheEntry(
                        str(line["shard"]), int(line["row"]), line.get("file_size"))
            except (ValueError, KeyError, TypeError):
                warn(f"feature cache index {path}: bad line; ignoring the rest of this file")

    def __len__(self) -> int:
        self._load()
        return len(self._index)

    def lookup(self, image_id: str, file_size: int | None = None) -> CacheEntry | None:
        """The entry of ``image_id``, or None (also when the image file changed size since)."""
        self._load()
        entry = self._index.get(image_id)
        if entry is None:
            return None
        if file_size is not None and entry.file_size is not None and entry.file_size != file_size:
            return None
        return entry

    def forget(self, shard: str) -> None:
        """Drop a bad shard and every entry pointing at it; its images are recomputed."""
        with self._lock:
            for image_id in [i for i, e in self._index.items() if e.shard == shard]:
                del self._index[image_id]
        (self.shard_dir / shard).unlink(missing_ok=True)

    # --- shards -------------------------------------------------------------------------

    def read(self, shard: str) -> Shard:
        """Read and verify one shard; raises ``CacheProblem`` saying what is wrong with it."""
        path = self.shard_dir / shard
        try:
            size = path.stat().st_size
            buffer = bytearray(size)
            with open(path, "rb") as handle:
                got = handle.readinto(buffer)
        except OSError as exc:
            raise CacheProblem(f"{path}: cannot read ({exc.strerror or exc})") from None
        if got != size or size < len(MAGIC) + 8 or bytes(buffer[: len(MAGIC)]) != MAGIC:
            raise CacheProblem(f"{path}: not a lostreg feature shard (bad magic or too short)")
        header_len = int.from_bytes(buffer[len(MAGIC): len(MAGIC) + 8], "little")
        start = len(MAGIC) + 8
        if header_len > min(size - start, _MAX_HEADER):
            raise CacheProblem(f"{path}: truncated header")
        try:
            header = json.loads(bytes(buffer[start: start + header_len]))
            dtype = _NAME_DTYPES[header["dtype"]]
            rows, cols = (int(v) for v in header["grid"])
            dim = int(header["dim"])
            ids = [str(e["image_id"]) for e in header["entries"]]
            sizes = [(int(e["size"][0]), int(e["size"][1])) for e in header["entries"]]
            expected_bytes, digest = int(header["payload_bytes"]), str(header["payload_sha256"])
            foreign = (header["key"] != self.hash or header["format"] != FORMAT_VERSION
                       or header.get("cache_key", self.key) != self.key)
        except (ValueError, KeyError, TypeError, IndexError):
            raise CacheProblem(f"{path}: unreadable header") from None
        if foreign:
            raise CacheProblem(f"{path}: written for another cache key")
        offset = start + header_len
        itemsize = torch.empty((), dtype=dtype).element_size()
        if expected_bytes != len(ids) * rows * cols * dim * itemsize:
            raise CacheProblem(f"{path}: header shapes disagree with its payload length")
        if size - offset != expected_bytes:
            raise CacheProblem(f"{path}: truncated ({size - offset} of {expected_bytes} "
                               "payload bytes)")
        if hashlib.sha256(memoryview(buffer)[offset:]).hexdigest() != digest:
            raise CacheProblem(f"{path}: payload checksum mismatch (corrupted)")
        feats = torch.frombuffer(buffer, dtype=dtype, offset=offset,
                                 count=len(ids) * rows * cols * dim)
        return Shard(path, ids, sizes, (rows, cols), feats.view(len(ids), rows * cols, dim))

    def write(self, image_ids: Sequence[str], sizes: Sequence[tuple[int, int]],
              file_sizes: Sequence[int | None], grid: tuple[int, int], feats: torch.Tensor) -> None:
        """Store features ``(B, rows*cols, D)`` (CPU) of one batch: the shard atomically, then
        its index lines durably, so an index line never points at a missing or partial shard."""
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
            "entries": [{"image_id": i, "size": list(s)} for i, s in zip(image_ids, sizes,
                                                                       strict=True)],
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }
        header_bytes = json.dumps(header, sort_keys=True).encode()
        # pad with spaces so the payload starts 64-byte aligned (tensors are views of it)
        header_bytes += b" " * (-(len(MAGIC) + 8 + len(header_bytes)) % 64)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.feats"
        self._load()
        if not (self.dir / "key.json").exists():
            atomic_write_json(self.dir / "key.json", self.key)
        atomic_write_bytes(self.shard_dir / name,
                           MAGIC + len(header_bytes).to_bytes(8, "little") + header_bytes + payload)
        lines = [{"image_id": i, "shard": name, "row": row, "file_size": fs}
                 for row, (i, fs) in enumerate(zip(image_ids, file_sizes, strict=True))]
        with self._lock:
            if self._appender is None:
                tag = f"-{self.writer_tag}" if self.writer_tag else ""
                stem = f"{time.time_ns():020d}-{os.getpid()}{tag}"
                self._appender = JsonlAppender(self.index_dir / f"{stem}.jsonl")
            self._appender.write_many(lines)
            for line in lines:
                self._index[line["image_id"]] = CacheEntry(name, line["row"], line["file_size"])

    def close(self) -> None:
        with self._lock:
            if self._appender is not None:
                self._appender.close()
                self._appender = None


def to_storage(feats: torch.Tensor, storage: str, lossless: bool) -> torch.Tensor:
    """Features as they go into the cache; a lossless setting that would round (it should not:
    see ``storage_dtype``) falls back to fp32 rather than change a result."""
    stored = feats.to(STORAGE_DTYPES[storage])
    if lossless and stored.dtype != feats.dtype and not torch.equal(stored.to(feats.dtype), feats):
        return feats
    return stored


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


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
    (bounded memory); a write that fails only costs a recompute later, so it warns."""

    def __init__(self, max_pending: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lostreg-cache-write")
        self._slots = threading.BoundedSemaphore(max_pending)
        self.failures = 0

    def submit(self, cache: FeatureCache, *args: Any) -> None:
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

"""Durable file writes: everything a run writes survives a kill -9 at any moment."""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lostreg.errors import LostregError

try:  # a faster parser of the same JSON (``loads_fast``); optional
    import orjson as _orjson
except ImportError:  # pragma: no cover - a dependency, but lostreg reads JSON without it
    _orjson = None

#: No file lostreg reads nests deeper than a few levels (COCO's polygons: 4); a limit far above
#: that and far below Python's recursion limit makes a deep file one line, never a traceback.
MAX_JSON_DEPTH = 100
#: Default size limit of one JSON document read whole into memory (COCO passes its own).
MAX_JSON_BYTES = 1 << 30
#: Default size limit of one line of a JSON-lines file (a prediction line is under 1 KB).
MAX_JSONL_LINE_BYTES = 16 << 20


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# read once, at import (os.umask can only be read by setting it, which is not thread safe)
_UMASK = _read_umask()


def _file_mode(path: Path) -> int:
    """The permissions a new file would get from ``open`` (``0o666`` less the umask), or the
    existing file's: ``mkstemp`` creates its file ``0o600``, unreadable by the group."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def named(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` naming ``path`` when it names no file (a full disk's ``write`` or ``fsync``
    error carries none, so the user would read "No space left on device" without the file)."""
    if exc.filename is None:
        exc.filename = str(path)
    return exc


class LinkInRunFolder(LostregError):
    """A file lostreg writes is a symbolic link: writing through it would change a file
    outside the folder (a ``run.lock`` link would truncate its target)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(f"{path}: is a symbolic link; lostreg never writes through a link (it "
                         "would change the file it points to): remove the link, or put a copy "
                         "of that file in its place")


class SharedFileInRunFolder(LostregError):
    """A file lostreg appends to (or truncates, or locks) has other hard links: the same bytes
    under another path (a ``cp -al`` backup of the runs), which every write would change too."""

    def __init__(self, path: str | os.PathLike, links: int) -> None:
        super().__init__(f"{path}: has {links} hard links (the same file under another path, "
                         "e.g. a `cp -al` backup); lostreg never writes into a shared file (it "
                         "would change the other path too): replace it with a copy of itself "
                         "(cp --remove-destination)")


def _refuse_shared(path: str | os.PathLike, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise SharedFileInRunFolder(path, st.st_nlink)


def open_in_run_folder(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` itself (``O_NOFOLLOW``): a
    link is ``LinkInRunFolder``, one line naming it; nor writes into a file with other hard
    links (``SharedFileInRunFolder``). Every file a run appends to or locks (predictions, their
    parts, ``quarantine.jsonl``, the cache index, ``run.lock``) is opened so; files written
    whole are replaced atomically (``atomic_write_bytes``), which replaces a link and never
    writes through it (nor into the file a hard link shares)."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and os.path.islink(path)):
            raise LinkInRunFolder(path) from None
        raise
    try:
        _refuse_shared(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def refuse_links(paths: Iterable[str | os.PathLike],
                 appended: Iterable[str | os.PathLike] = ()) -> None:
    """``LinkInRunFolder`` for the first of ``paths`` and ``appended`` that is a symbolic link,
    ``SharedFileInRunFolder`` for the first of ``appended`` (the files written in place) with
    other hard links: checked before a run reads its folder, so such a file is refused before
    anything is read or written (the writes themselves refuse both too, see
    ``open_in_run_folder``)."""
    checked = [(path, False) for path in paths] + [(path, True) for path in appended]
    found: list[tuple[str | os.PathLike, bool, os.stat_result | OSError]] = []
    for path, is_appended in checked:  # one lstat per file, both checks read it
        try:
            found.append((path, is_appended, os.lstat(path)))
        except OSError as exc:
            found.append((path, is_appended, exc))
    for path, _, st in found:  # every link first (as os.path.islink: no file, no link)
        if isinstance(st, os.stat_result) and stat.S_ISLNK(st.st_mode):
            raise LinkInRunFolder(path)
    for path, is_appended, st in found:
        if not is_appended or isinstance(st, FileNotFoundError):
            continue
        if isinstance(st, OSError):  # a file there that cannot be examined
            raise st
        _refuse_shared(path, st)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may take only part of them)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    Readers see either the old file or the new one, never a half-written file. The file gets
    the permissions ``open`` would give it (or keeps those it had). Any ``OSError`` names a
    path: the target (not the temp file) when the system named none.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise named(exc, path) from None
    try:
        try:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(fd, _file_mode(path))
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename == tmp:  # name the file the caller asked for, not our temp file
            exc.filename, exc.filename2 = None, None
        raise named(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def null_if_undefined(obj: Any) -> Any:
    """``obj`` with every float that is not finite (an undefined figure: a mean over no image,
    0/0) replaced by None, which JSON writes as ``null``; containers are copied, tuples become
    lists (as JSON would write them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: null_if_undefined(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_if_undefined(value) for value in obj]
    return obj


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """Where in ``obj`` the first non-finite float is (``corloc``, ``f_curve[3]``), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value"
    items = (obj.items() if isinstance(obj, dict)
             else enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key}]" if isinstance(key, int)
                                  else f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def dumps_strict(obj: Any, where: str | os.PathLike, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and Infinity (``allow_nan=False``): they are not JSON, and
    a file holding them is refused by strict readers. A ``ValueError`` names the file and the
    key; the caller writes ``null`` for an undefined figure (``null_if_undefined``)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        found = _first_non_finite(obj)
        if found is None:
            raise
        raise ValueError(f"{where}: {found} is not finite (NaN or Infinity is not JSON; write "
                         "null for an undefined figure)") from None


def atomic_write_json(path: str | os.PathLike, obj: Any, undefined_as_null: bool = False
                      ) -> None:
    """Write ``obj`` as JSON (indented, sorted keys), atomically. NaN and Infinity are refused
    (``dumps_strict``), unless the caller says its figures may be undefined
    (``undefined_as_null``: they are written as ``null``)."""
    if undefined_as_null:
        obj = null_if_undefined(obj)
    atomic_write_text(path, dumps_strict(obj, path, indent=2, sort_keys=True, default=str)
                      + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


class JsonInputError(LostregError, ValueError):
    """JSON that lostreg will not use: not JSON, too deep or too large. One line naming where it
    came from; a ``ValueError`` too, so readers that skip a bad line or a bad cache entry (and
    recompute) catch it where they caught ``json.JSONDecodeError``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: not readable JSON ({reason})")
        self.where, self.reason = where, reason

    def __reduce__(self) -> tuple:  # survives pickling (a worker process, torch.distributed)
        return self.__class__, (self.where, self.reason)


_STRUCTURE = b'[]{}"'
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in _STRUCTURE)


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, brackets inside strings not counted.

    Exact for valid JSON (what ``json.loads`` would accept), in C-speed passes: escaped
    backslashes and quotes are removed (left to right, as a JSON parser reads them), every
    byte but brackets and quotes is dropped, and the rest is a prefix sum with the string
    parity masked out: 0.9 s against ``json.loads``' 17 s on a generated 230 MB COCO file."""
    import numpy as np

    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = np.frombuffer(data.translate(None, _NOT_STRUCTURE), dtype=np.uint8)
    steps = np.zeros(256, dtype=np.int8)
    steps[[ord("["), ord("{")]] = 1
    steps[[ord("]"), ord("}")]] = -1
    step = steps[marks]
    step[np.bitwise_xor.accumulate((marks == ord('"')).view(np.uint8)) == 1] = 0
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


_DIGIT_MARKS = bytes(ord("1") if ord("0") <= b <= ord("9") else ord("0") for b in range(256))
_LONG_DIGITS = b"1" * 19  # an integer of <= 18 digits fits 64 bits, whatever its sign


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block that makes many acyclic containers (a
    parse, a decoded index), back to its previous state after.

    Each burst of allocations makes the collector walk the whole heap again (with torch and
    timm imported, a large one): a third of a 5011-image VOC index's load, and of
    ``json.loads``' time on a run's predictions, went to it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _refuse_constant(name: str) -> Any:
    """``parse_constant`` of every JSON lostreg reads: ``NaN``, ``Infinity`` and ``-Infinity``
    are Python's extensions, not JSON, and lostreg never writes them (``dumps_strict``), so a
    file holding one is damaged or edited, as invalid as any other text that is not JSON."""
    raise ValueError(f"{name} is not JSON; lostreg writes null for an undefined figure")


def _finite_float(text: str) -> float:
    """``parse_float`` of every JSON lostreg reads: a number too large for a float (``1e400``)
    is valid JSON that ``json.loads`` reads as infinity, a value lostreg never writes
    (``repr`` of a finite float never overflows) and ``orjson`` refuses."""
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 24 else f"{text[:20]}..."
        raise ValueError(f"the number {shown} overflows a float: it would read as "
                         f"{'-' if value < 0 else ''}Infinity, which is not JSON")
    return value


def loads_strict(data: str | bytes,
                 object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` of JSON only: ``NaN``, ``Infinity``, ``-Infinity`` and numbers that
    overflow a float are refused with a ``ValueError`` saying which, where ``json.loads``
    would read them as non-finite floats. Everything else reads as ``json.loads`` reads it."""
    return json.loads(data, object_pairs_hook=object_pairs_hook,
                      parse_constant=_refuse_constant, parse_float=_finite_float)


def loads_fast(data: bytes) -> Any:
    """``loads_strict(data)``, through ``orjson`` where it gives the same values.

    ``orjson`` refuses what ``json.loads`` reads with Python's extensions (NaN and Infinity,
    lone surrogates, numbers overflowing to inf); any refusal goes to ``loads_strict``, so the
    same text is accepted or refused with the same message (NaN, Infinity and overflowing
    numbers refused by both). What it reads differently is kept from it: integers beyond 64
    bits (it makes them floats), so any run of 19 or more digits goes to ``loads_strict`` too.
    The rest is the same (``tests/test_io_fast_json.py``): floats correctly rounded by both, a
    key given twice keeps its last value at its first place. ``orjson`` missing,
    ``loads_strict`` reads everything."""
    if _orjson is not None and data.translate(_DIGIT_MARKS).find(_LONG_DIGITS) < 0:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass
    return loads_strict(data)


def loads_bounded(data: str | bytes, where: str, *, max_depth: int = MAX_JSON_DEPTH,
                  max_bytes: int | None = MAX_JSON_BYTES,
                  object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` for anything read from disk: the one JSON reader of lostreg.

    A document larger than ``max_bytes`` or nested deeper than ``max_depth`` (checked before
    parsing, in C-speed passes; ``json.loads`` itself would die with a ``RecursionError`` at
    about 1000 levels) is refused, like text that is not JSON or not UTF-8, with a
    ``JsonInputError`` (a ``LostregError`` and a ``ValueError``) naming ``where``; so is a
    ``ValueError`` raised by ``object_pairs_hook`` (e.g. ``unique_keys``), and so are ``NaN``,
    ``Infinity``, ``-Infinity`` and numbers overflowing a float (``loads_strict``): lostreg
    never writes them, so a file holding one is treated as any other that is not JSON.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise JsonInputError(where, f"{len(raw):,} bytes, more than the {max_bytes:,} allowed")
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise JsonInputError(where, f"nested more than {max_depth} levels deep")
    try:
        if object_pairs_hook is None and isinstance(data, bytes):
            return loads_fast(data)
        return loads_strict(data, object_pairs_hook)
    except RecursionError:  # invalid JSON the depth count misread, or a max_depth near 1000
        raise JsonInputError(where, "nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise JsonInputError(where, str(exc)) from None


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice in one object, which ``json.loads``
    would resolve silently by keeping the last value."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} is given twice in one object")
        result[key] = value
    return result


def read_bounded(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """A file's bytes, refusing (one line naming it) a file larger than ``max_bytes`` before
    reading it, and reading at most ``max_bytes + 1`` bytes of one that grows meanwhile."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise LostregError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > max_bytes or len(data) > max_bytes:
        raise LostregError(f"{path}: {max(size, len(data)):,} bytes, more than the "
                           f"{max_bytes:,} a {what} may have")
    return data


def read_jsonl(path: str | os.PathLike,
               max_line_bytes: int = MAX_JSONL_LINE_BYTES) -> Iterator[Any]:
    """Yield the complete records of a JSON-lines file; a torn last line (kill -9) is skipped.

    Every line goes through ``loads_bounded`` (a bad line is a ``JsonInputError`` naming the
    file and line); a line longer than ``max_line_bytes`` is refused before it is read whole.
    """
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as handle:
        lines = iter(lambda: handle.readline(max_line_bytes + 1), b"")
        yield from _jsonl_lines(lines, path, max_line_bytes)


def jsonl_records(data: bytes, path: str | os.PathLike,
                  max_line_bytes: int = MAX_JSONL_LINE_BYTES) -> Iterator[Any]:
    """``read_jsonl`` of bytes already read from ``path`` (named in errors): the same records
    and the same errors, so a caller that hashed these bytes parses exactly what it hashed,
    and the file is read once."""
    def lines() -> Iterator[bytes]:
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            # as ``readline(max_line_bytes + 1)`` gives it: a longer line is cut there
            yield data[start:min(end, start + max_line_bytes + 1)]
            start = end

    yield from _jsonl_lines(lines(), Path(path), max_line_bytes)


def _jsonl_lines(lines: Iterable[bytes], path: Path, max_line_bytes: int) -> Iterator[Any]:
    """The records of a JSON-lines file's lines (each at most ``max_line_bytes + 1`` bytes, a
    longer one cut there): a line too long is refused, a torn last line skipped."""
    for number, raw in enumerate(lines, start=1):
        where = f"{path}: line {number}"
        if len(raw) > max_line_bytes:
            raise JsonInputError(where, f"longer than {max_line_bytes:,} bytes")
        if not raw.endswith(b"\n"):
            break  # torn write: the record was never durable
        yield loads_bounded(raw, where, max_bytes=None)


def repair_jsonl(path: str | os.PathLike) -> int:
    """Truncate a JSON-lines file after its last complete line; return the number of lines.
    A link at ``path`` is refused, not followed (``open_in_run_folder``)."""
    path = Path(path)
    try:
        fd = open_in_run_folder(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "r+b") as handle:
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    return data[:keep].count(b"\n")


class JsonlAppender:
    """Append records to a JSON-lines file; each ``write_many`` is durable when it returns
    (with ``sync=False`` it is written, so a killed process loses nothing, and durable against
    a machine crash at the next ``sync`` or ``close``).

    Writes go straight to the file descriptor (no Python buffer): a write that fails (a full
    disk) is cut back to the last complete line and raised naming the file, and nothing is
    left in a buffer for ``close`` to retry, so a later line never lands after a torn one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_jsonl(self.path)
            self._fd: int | None = open_in_run_folder(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise named(exc, self.path) from None

    _unsynced = False

    def write_many(self, records: Iterable[dict], sync: bool = True) -> None:
        payload = b"".join(
            dumps_strict(record, self.path, sort_keys=True).encode("utf-8") + b"\n"
            for record in records
        )
        if not payload:
            return
        if self._fd is None:
            raise ValueError(f"{self.path}: appender is closed")
        start = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, payload)
            self._unsynced = True
            if sync:
                self.sync()
        except OSError as exc:
            try:  # best effort: drop the partial line (a rerun's repair would do it too)
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise named(exc, self.path) from None

    def sync(self) -> None:
        """Make what was written durable (one ``fsync``, only when something is pending)."""
        if self._fd is not None and self._unsynced:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise named(exc, self.path) from None
            self._unsynced = False

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.sync()
            finally:
                fd, self._fd = self._fd, None
                os.close(fd)

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_text_lines(path: str | os.PathLike, missing: str = "not found") -> list[str]:
    """A UTF-8 text file's lines; a missing or unreadable file is a one-line ``LostregError``
    naming it (``missing`` says what the file is, e.g. ``"split file not found"``)."""
    path = Path(path)
    if not path.is_file():
        raise LostregError(f"{path}: {missing}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LostregError(f"{path}: cannot read ({exc})") from None


def read_json_object(path: str | os.PathLike, missing: str = "not found",
                     max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON file holding one object, or a one-line ``LostregError`` naming the file (also for
    a file larger than ``max_bytes`` or nested too deep: see ``loads_bounded``)."""
    path = Path(path)
    if not path.is_file():
        raise LostregError(f"{path}: {missing}")
    data = loads_bounded(read_bounded(path, max_bytes, "JSON file"), str(path), max_bytes=None)
    if not isinstance(data, dict):
        raise LostregError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data

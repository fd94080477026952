"""One writer per run folder: an advisory ``flock`` on ``<run folder>/run.lock``.

Two commands writing into one run folder would both compute every missing image and append
duplicate lines. So a run holds an exclusive ``fcntl.flock`` on ``run.lock`` from before it
reads the run's state (which images are done) until its predictions are merged and
``metrics.json`` is written. A second process on the same folder either stops with one line
naming the holder (pid, host, start time, command, which the holder writes into the lock
file), or, with ``wait``, says once that it waits and blocks until the lock is free.

The operating system releases a ``flock`` when its holder dies (SIGKILL, OOM killer, a lost
node's NFS client), so a killed run never leaves a folder locked: no stale-lock guessing from
pids. The holder removes ``run.lock`` when it is done, so a finished run folder looks as it
did before locks existed; a process that had been waiting on the removed file notices (the
path no longer names the file it locked) and tries again on the new one.

``flock`` is advisory: it binds lostreg processes, not someone editing files by hand. On NFS,
Linux maps ``flock`` to POSIX byte-range locks, which the NFS lock manager honours across
nodes (NFSv4, or v3 with ``lockd``); a filesystem mounted with ``nolock`` gives no protection.

torchrun: rank 0 alone takes the lock, for every run of its pass (``hold_runs``), before any
rank reads the run state, and tells the other ranks whether it got it (a broadcast); the
other ranks append only to their own ``predictions.rank{r}.jsonl`` inside rank 0's lock
(rank 0 releases it after the final gather, when every rank's appends are durable, and after
the merge). So ranks never lock against each other, and a second command (distributed or
not) on the same folder is refused as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lostreg.errors import LostregError, error_line
from lostreg.io import loads_bounded, open_in_run_folder

if TYPE_CHECKING:
    from lostreg.runs.distributed import DistContext

LOCK_NAME = "run.lock"


class RunLocked(LostregError):
    """Another process holds the run folder's lock (and the caller did not ask to wait)."""


def describe_holder(info: dict[str, Any] | None) -> str:
    """``pid 123 on host since 2025-01-01T10:00:00+00:00 (lostreg run ...)``, from what the
    holder wrote into the lock file; a holder still starting has written nothing yet."""
    if not info:
        return "a process that has not written its name yet"
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("started"):
        text += f" since {info['started']}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def holder_info(data: bytes) -> dict[str, Any] | None:
    """What a lock file's first bytes say of its holder (the object ``_holder_info`` wrote),
    or None: anything else in it (nested deep, NaN, not JSON) is read by the bounded reader,
    never a traceback in the line that names the holder."""
    try:
        info = loads_bounded(data or b"null", LOCK_NAME, max_bytes=None)
    except ValueError:  # JsonInputError
        return None
    return info if isinstance(info, dict) else None


#: How many of a lock file's first bytes are read for its holder (what it writes is ~300).
HOLDER_BYTES = 4096


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        return holder_info(os.pread(fd, HOLDER_BYTES, 0))
    except OSError:  # a FIFO or a folder cannot be pread: no holder named
        return None


def read_holder(lock: str | os.PathLike) -> dict[str, Any] | None:
    """What the holder wrote into the lock file at ``lock``, for a process that does not hold
    it open (a grid checking its runs before it starts): opened never through a link, never
    blocking on a FIFO, and no more than its first ``HOLDER_BYTES`` read; None when nothing
    readable names a holder."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(lock, flags)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


#: How long a refused process waits for the holder to write its name: the holder writes it
#: right after taking the lock (milliseconds, an fsync), so a command refused in that moment
#: still names it instead of saying "a process that has not written its name yet".
HOLDER_NAME_WAIT_S = 2.0


def holder_of(read: Callable[[], dict[str, Any] | None],
              wait_s: float = HOLDER_NAME_WAIT_S) -> dict[str, Any] | None:
    """What the holder wrote into its lock file (``read``), waiting up to ``wait_s`` for a
    holder that has the lock but has not written its name yet."""
    deadline = time.monotonic() + wait_s
    while True:
        info = read()
        if info or time.monotonic() >= deadline:
            return info
        time.sleep(0.01)


def _holder_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["lostreg", *sys.argv[1:]])[:300],
    }


class RunLock:
    """``with RunLock(run_dir, wait=False):`` hold the run folder's lock for the block.

    Raises ``RunLocked`` (a ``LostregError``: one line naming the holder) when another process
    holds it and ``wait`` is false; with ``wait`` it prints one line to stderr and blocks. Any
    ``OSError`` (a read-only folder) names the lock file.
    """

    def __init__(self, run_dir: str | os.PathLike, wait: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self._acquire()
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(self.path)
            raise
        return self

    def _acquire(self) -> None:
        announced = False
        while True:
            fd = self._open()
            try:
                announced = self._lock(fd, announce=not announced) or announced
                locked_here = _names_the_same_file(fd, self.path)
                if locked_here:
                    payload = json.dumps(_holder_info()).encode() + b"\n"
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, payload, 0)
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked_here:
                self._fd = fd
                return
            os.close(fd)  # the holder removed the file on release: lock the one there now

    def _open(self) -> int:
        """The lock file, created if needed, never through a link (``open_in_run_folder``).
        The folder is made first, and again if it vanished before the file could be created:
        a command refused at another folder removes the folders it made, and may remove this
        one between our ``mkdir`` and ``open`` (see ``lostreg.runs.folder.remove_empty``)."""
        for _ in range(100):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                return open_in_run_folder(self.path, os.O_RDWR | os.O_CREAT)
            except FileNotFoundError:
                continue
        raise LostregError(f"{self.run_dir}: the folder keeps disappearing while its lock is "
                           "taken (another program removing it?)")

    def _lock(self, fd: int, announce: bool) -> bool:
        """Lock ``fd``; returns whether it had to wait. Raises ``RunLocked`` when another
        process holds the lock and ``wait`` is false."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        holder = describe_holder(holder_of(lambda: _read_holder(fd)))
        if not self.wait:
            raise RunLocked(f"{self.run_dir}: another lostreg process is writing this run "
                            f"({holder}); let it finish, or rerun with --wait to queue")
        if announce:
            print(f"waiting for {self.run_dir}: held by {holder}", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file, then unlock (closing it): in that order, so a waiter never
        gets a lock on a file that is about to disappear without noticing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _names_the_same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a lock file left behind is harmless: the next holder reuses it
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _names_the_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


@contextlib.contextmanager
def hold_runs(run_dirs: Iterable[str | os.PathLike], wait: bool = False,
              ctx: DistContext | None = None) -> Iterator[list[RunLock]]:
    """Hold the lock of every run folder of a pass for the block.

    Folders are locked in sorted order, so two sweeps sharing folders cannot deadlock while
    waiting; if one is held (without ``wait``), those already taken are released. Under
    torchrun (``ctx.enabled``) only rank 0 locks; it broadcasts its failure (one line) or
    success and every other rank raises ``CollectiveError`` with rank 0's line or goes on.
    With ``wait`` the other ranks wait inside that broadcast, i.e. at most the process-group
    timeout (``LOSTREG_DIST_TIMEOUT_MIN``).
    """
    distributed = ctx is not None and ctx.enabled
    with contextlib.ExitStack() as stack:
        locks: list[RunLock] = []
        if ctx is None or ctx.is_main:
            try:
                for run_dir in sorted({Path(d) for d in run_dirs}):
                    locks.append(stack.enter_context(RunLock(run_dir, wait)))
            except (LostregError, OSError) as exc:
                if distributed:
                    ctx.broadcast(error_line(exc).removeprefix("error: "))
                raise
            if distributed:
                ctx.broadcast(None)
        else:
            failure = ctx.broadcast(None)
            if failure is not None:
                from lostreg.runs.distributed import CollectiveError

                raise CollectiveError(failure)
        yield locks

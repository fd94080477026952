"""One writer per run folder: real processes contend for ``run.lock``."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lostreg.errors import LostregError
from lostreg.runs.distributed import CollectiveError
from lostreg.runs.lock import LOCK_NAME, RunLock, RunLocked, describe_holder, hold_runs

REPO = Path(__file__).resolve().parents[1]
# a process that takes the lock (waiting if asked), says so, and holds it until killed or done
HOLDER = """
import sys, time
from lostreg.errors import LostregError, error_line
from lostreg.runs.lock import RunLock
try:
    with RunLock(sys.argv[1], wait=sys.argv[2] == "wait"):
        print("acquired", flush=True)
        time.sleep(float(sys.argv[3]))
except LostregError as exc:
    print(error_line(exc), file=sys.stderr)
    sys.exit(2)
"""


def start(run_dir: Path, mode: str, hold_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode, str(hold_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)


def wait_for_line(stream, timeout: float = 60.0) -> str:
    """The next line of a child's pipe, failing (not hanging) if none comes in ``timeout``."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line from the child within {timeout} s"
    return stream.readline().strip()


def test_a_second_process_is_refused_then_a_waiter_gets_the_lock_of_a_killed_holder(
        tmp_path) -> None:
    run_dir = tmp_path / "run"
    holder = start(run_dir, "nowait", 300)
    waiter = None
    try:
        assert wait_for_line(holder.stdout) == "acquired"
        refused = start(run_dir, "nowait", 0)
        out, err = refused.communicate(timeout=60)
        assert refused.returncode == 2 and out == ""
        (message,) = err.splitlines()  # one line, no traceback
        assert message.startswith(f"error: {run_dir}: another lostreg process is writing this")
        assert f"pid {holder.pid} on {socket.gethostname()} since " in message
        assert "--wait" in message

        waiter = start(run_dir, "wait", 0)
        assert wait_for_line(waiter.stderr).startswith(
            f"waiting for {run_dir}: held by pid {holder.pid}")
        assert waiter.poll() is None  # still waiting
        holder.send_signal(signal.SIGKILL)  # no cleanup: the OS releases the flock
        holder.wait(timeout=30)
        assert wait_for_line(waiter.stdout) == "acquired"
        assert waiter.wait(timeout=60) == 0
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not (run_dir / LOCK_NAME).exists()  # the last holder removed it


def test_the_lock_binds_two_holders_in_one_process_and_is_released(tmp_path) -> None:
    with RunLock(tmp_path, wait=False) as lock:
        assert lock.held and (tmp_path / LOCK_NAME).is_file()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on "):
            RunLock(tmp_path, wait=False).__enter__()
    assert not lock.held and not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_a_stale_lock_file_of_a_dead_holder_is_taken_over(tmp_path) -> None:
    (tmp_path / LOCK_NAME).write_text('{"pid": 999999, "host": "gone"}\n')
    with RunLock(tmp_path) as lock:
        assert lock.held and f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()


def test_holder_descriptions() -> None:
    assert describe_holder(None) == "a process that has not written its name yet"
    assert describe_holder({"pid": 7, "host": "h", "started": "t", "command": "lostreg run"}) \
        == "pid 7 on h since t (lostreg run)"


class FakeRanks:
    """Rank 0 and the others of a torchrun job, sharing one broadcast slot."""

    def __init__(self) -> None:
        self.slot: list[object] = []

    def rank(self, rank: int):
        ranks = self

        class Ctx:
            enabled = True
            is_main = rank == 0

            def broadcast(self, obj):
                if rank == 0:
                    ranks.slot.append(obj)
                    return obj
                return ranks.slot.pop(0)

        return Ctx()


def test_rank0_locks_every_run_and_tells_the_others(tmp_path) -> None:
    runs = [tmp_path / "b", tmp_path / "a"]
    ranks = FakeRanks()
    with hold_runs(runs, ctx=ranks.rank(0)) as locks:
        assert [lock.run_dir for lock in locks] == sorted(runs)  # sorted: no deadlock
        assert all((run / LOCK_NAME).is_file() for run in runs)
        with hold_runs(runs, ctx=ranks.rank(1)) as others:  # rank 1 takes no lock
            assert others == []
        # a second job's rank 0 is refused, and its rank 1 raises rank 0's line
        second = FakeRanks()
        with pytest.raises(RunLocked) as refused, hold_runs(runs, ctx=second.rank(0)):
            pass
        with pytest.raises(CollectiveError) as collective, hold_runs(runs, ctx=second.rank(1)):
            pass
        assert str(collective.value) == str(refused.value)
        assert str(refused.value).startswith(f"{tmp_path / 'a'}: another lostreg process")
    assert not any((run / LOCK_NAME).exists() for run in runs)


def test_a_refused_run_releases_the_runs_it_had_locked(tmp_path) -> None:
    with RunLock(tmp_path / "b"):
        with pytest.raises(LostregError), hold_runs([tmp_path / "a", tmp_path / "b"]):
            pass
        with RunLock(tmp_path / "a"):  # "a" was released when "b" was refused
            pass

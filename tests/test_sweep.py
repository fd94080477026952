"""The line writer: results reach the files in order, after their batch, and failures surface."""

from __future__ import annotations

import threading

import pytest
import torch

from lostreg.runs.sweep import LineWriter, ready_event, to_host


class FakeEvent:
    """Stands for a CUDA event: the job must wait for it before it writes."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def synchronize(self) -> None:
        self.log.append(f"wait {self.name}")


def test_jobs_run_in_order_each_after_its_event_and_close_drains() -> None:
    log: list[str] = []
    gate = threading.Event()
    with LineWriter(max_pending=2) as writer:
        writer.submit(lambda: gate.wait(5) and log.append("write 0"), FakeEvent(log, "0"))
        for i in range(1, 6):
            writer.submit(lambda i=i: log.append(f"write {i}"), FakeEvent(log, str(i)))
            gate.set()
    expected = [entry for i in range(6) for entry in (f"wait {i}", f"write {i}")]
    assert log == expected


def test_a_failed_write_is_raised_in_the_pass_and_nothing_after_it_is_written() -> None:
    written: list[int] = []
    writer = LineWriter()

    def fail() -> None:
        raise OSError(28, "No space left on device", "/runs/x/predictions.jsonl")

    writer.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        for i in range(100):  # the error surfaces at a later submit
            writer.submit(lambda i=i: written.append(i))
            writer._thread.join(0.01)
    writer.close()
    assert written == [] or written == sorted(written)
    assert len(written) < 100
    assert writer._failed


def test_close_raises_an_error_not_yet_seen() -> None:
    writer = LineWriter()
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.close()


def test_cpu_results_need_no_copy_and_no_event() -> None:
    box = torch.arange(8).view(2, 4)
    assert to_host(box) is box and ready_event(torch.device("cpu")) is None


def test_files_are_synced_when_the_writer_is_idle_and_at_close_not_per_job() -> None:
    gate = threading.Event()
    synced: list[int] = []
    done: list[int] = []
    with LineWriter(on_idle=lambda: synced.append(len(done)), sync_seconds=3600) as writer:
        writer.submit(lambda: gate.wait(5))
        for i in range(20):
            writer.submit(lambda i=i: done.append(i))
        gate.set()
    assert done == list(range(20))
    assert 1 <= len(synced) <= 3 and synced[-1] == 20  # the last sync follows the last write


def test_an_appender_syncs_once_for_many_unsynced_writes(tmp_path, monkeypatch) -> None:
    import os

    from lostreg.io import JsonlAppender

    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    out = JsonlAppender(tmp_path / "p.jsonl")
    for i in range(10):
        out.write_many([{"i": i}], sync=False)
    assert calls == [] and (tmp_path / "p.jsonl").read_text().count("\n") == 10
    out.sync()
    out.sync()  # nothing pending: no second fsync
    out.write_many([{"i": 10}])  # the default stays durable on return
    out.close()
    assert len(calls) == 2

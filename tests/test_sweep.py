"""The line writer: results reach the files in order, after their batch, and failures surface."""

from __future__ import annotations

import threading

import pytest
import torch

from lostreg.sweep import LineWriter, ready_event, to_host


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

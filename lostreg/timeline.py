"""When a run reached each step of its start-up, in seconds since the process started.

A GPU run's first seconds go to imports, CUDA start-up, indexing the dataset and building the
model before any batch reaches the device. ``mark(name)`` notes the first time a step is
reached; ``metrics.json`` records the marks (``startup``), and ``LOSTREG_TIMELINE=1`` also
prints each one to stderr as it happens, so start-up can be measured on any machine without a
profiler (``benchmarks/bench_startup.py`` does).
"""

from __future__ import annotations

import os
import sys
import time

_IMPORTED = time.perf_counter()
_MARKS: dict[str, float] = {}


def _process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc), None where unknown."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as handle:
            uptime = float(handle.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# the offset between perf_counter and the process start, read once at import
_AGE_AT_IMPORT = _process_age()


def since_start() -> float:
    """Seconds since the process started (since ``lostreg`` was imported where /proc is
    missing); /proc's clock ticks make it exact to about 10 ms."""
    return (time.perf_counter() - _IMPORTED) + (_AGE_AT_IMPORT or 0.0)


def mark(name: str) -> None:
    """Note that the run reached ``name`` (only the first time counts)."""
    if name in _MARKS:
        return
    _MARKS[name] = round(since_start(), 3)
    if os.environ.get("LOSTREG_TIMELINE"):
        # one write per line: marks come from two threads (the warm start imports timm in
        # the background), and print() writes the text and its newline separately
        sys.stderr.write(f"timeline: {_MARKS[name]:8.3f} s  {name}\n")
        sys.stderr.flush()


def marks() -> dict[str, float]:
    """Every step reached so far, in order, with its time since the process started."""
    return dict(_MARKS)

"""Count how often the code under test opens a file for reading, by any reader."""

from __future__ import annotations

import builtins
import io
from collections import Counter
from pathlib import Path


def count_reads(monkeypatch, name: str) -> Counter:
    """A ``Counter`` of the resolved paths of files called ``name`` opened for reading from now
    on: ``open`` and ``io.open`` are both wrapped, so ``read_jsonl``, ``Path.read_bytes`` and
    ``Path.read_text`` are all seen (pathlib opens through ``io.open``)."""
    reads: Counter = Counter()
    plain_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).name == name \
                and not any(flag in mode for flag in "wax+"):
            reads[Path(file).resolve()] += 1
        return plain_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return reads

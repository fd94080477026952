"""lostreg.io: atomic writes give files the permissions a plain ``open`` would; the JSON-lines
reader of bytes already read is the file reader."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lostreg.io import (
    JsonInputError,
    atomic_write_bytes,
    atomic_write_json,
    jsonl_records,
    read_jsonl,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_permissions_open_gives(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the umask gives a new file, e.g. 0o644
    written = tmp_path / "sub" / "metrics.json"
    atomic_write_json(written, {"a": 1})
    assert mode(written) == mode(plain)  # not mkstemp's 0o600
    assert not list(written.parent.glob(".*.tmp"))


def test_atomic_rewrite_keeps_the_file_mode(tmp_path: Path) -> None:
    target = tmp_path / "leaderboard.csv"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o640


def _outcome(records) -> tuple[list, str | None]:
    """The records an iterator gives before it stops, and the error it stops with."""
    out: list = []
    try:
        for record in records:
            out.append(record)
    except JsonInputError as exc:
        return out, str(exc)
    return out, None


JSONL_CASES = {
    "plain": b'{"a": 1}\n[2]\n"x"\n',
    "torn last line": b'{"a": 1}\n{"b": ',
    "empty": b"",
    "no newline at all": b'{"a": 1}',
    "a line at the limit": b'{"a": "' + b"x" * 6 + b'"}\n',  # 16 bytes with its newline
    "a line one byte over": b'{"a": "' + b"x" * 7 + b'"}\n{"b": 2}\n',
    "a long torn line": b'{"a": 1}\n' + b"y" * 40,
    "a bad line": b'{"a": 1}\n{"a": NaN}\n',
    "a blank line": b'{"a": 1}\n\n',
    "carriage returns": b'{"a": 1}\r\n{"b": 2}\r\n',
}


@pytest.mark.parametrize("case", list(JSONL_CASES))
def test_jsonl_records_of_bytes_are_read_jsonl_of_the_file(tmp_path: Path, case: str) -> None:
    """The bytes reader (a file read once, hashed, then parsed) gives the file reader's
    records and errors, word for word, whatever the lines."""
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(JSONL_CASES[case])
    from_file = _outcome(read_jsonl(path, max_line_bytes=16))
    assert _outcome(jsonl_records(path.read_bytes(), path, max_line_bytes=16)) == from_file
    if case == "a line one byte over":  # refused, not cut into a record
        assert from_file[0] == [] and f"{path}: line 1" in from_file[1]
        assert "longer than 16 bytes" in from_file[1]
    elif case == "a line at the limit":
        assert from_file == ([{"a": "x" * 6}], None)

"""lostreg.io: atomic writes give files the permissions a plain ``open`` would."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lostreg.io import atomic_write_bytes, atomic_write_json


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

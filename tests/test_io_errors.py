"""Every OSError of lostreg.io's writers names its file, a full disk included, and a failed
append leaves no torn line behind."""

from __future__ import annotations

import errno
import json
import os

import pytest

import lostreg.io as io_module
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets import load_dataset
from lostreg.errors import error_line
from lostreg.io import JsonlAppender, atomic_write_bytes
from lostreg.run import main


def full() -> OSError:
    """What write/fsync raise on a full disk: no file name."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk:
    """``os`` for lostreg.io, except that writes (or fsyncs) of files ``fails(path)`` picks
    raise ENOSPC without a file name; a write first lands half its bytes, as a disk filling
    up mid-write does."""

    def __init__(self, fails=lambda path: True, on: str = "write") -> None:
        self.fails, self.on = fails, on

    def __getattr__(self, name: str):
        return getattr(os, name)

    def _path(self, fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def write(self, fd: int, data) -> int:
        if self.on == "write" and self.fails(self._path(fd)):
            os.write(fd, bytes(data[: len(data) // 2]))
            raise full()
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.on == "fsync" and self.fails(self._path(fd)):
            raise full()
        os.fsync(fd)


def test_a_full_disk_during_an_append_names_the_file_and_tears_nothing(tmp_path,
                                                                       monkeypatch) -> None:
    path = tmp_path / "predictions.jsonl"
    out = JsonlAppender(path)
    out.write_many([{"a": 1}])
    monkeypatch.setattr(io_module, "os", FullDisk())
    with pytest.raises(OSError) as caught:
        out.write_many([{"b": 2}, {"c": 3}])
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert error_line(caught.value) == f"error: {path}: No space left on device"
    monkeypatch.undo()
    out.close()  # nothing buffered that could fail again
    assert path.read_text() == '{"a": 1}\n'  # the half-written record was cut back
    with JsonlAppender(path) as again:  # and appending goes on after the last full line
        again.write_many([{"d": 4}])
    assert path.read_text() == '{"a": 1}\n{"d": 4}\n'


@pytest.mark.parametrize("on", ["write", "fsync"])
def test_a_full_disk_during_an_atomic_write_names_the_target(tmp_path, monkeypatch, on) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    monkeypatch.setattr(io_module, "os", FullDisk(on=on))
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"x" * 100_000)  # larger than a buffer: reaches os.write
    assert error_line(caught.value) == f"error: {target}: No space left on device"
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json"]  # no temp file left


def test_a_folder_that_cannot_take_a_temp_file_is_named(tmp_path, monkeypatch) -> None:
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(io_module.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "config.json", b"{}")
    assert error_line(caught.value) == f"error: {tmp_path / 'config.json'}: Read-only file system"


TINY = BackboneSpec("tiny_io", "vit_small_patch16_224.dino", "dino", 16, 0, pos_embed="dino",
                    model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))


@pytest.mark.usefixtures("one_thread")
def test_a_run_on_a_full_disk_says_which_file(tmp_path, monkeypatch, capsys) -> None:
    load_dataset("demo", tmp_path / "data")
    monkeypatch.setitem(BACKBONES, TINY.name, TINY)
    monkeypatch.setattr(io_module, "os", FullDisk(lambda p: p.endswith("predictions.jsonl"),
                                                  on="fsync"))
    code = main(["--model", TINY.name, "--weights", "random", "--dataset", "demo",
                 "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
                 "--num-workers", "0", "--no-progress", "--limit", "3"])
    assert code == 2
    (run_dir,) = (tmp_path / "runs").iterdir()
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert errors == [f"error: {run_dir / 'predictions.jsonl'}: No space left on device"]
    assert json.loads((run_dir / "config.json").read_text())["run_id"] == run_dir.name

"""Issue 20, row 8: no write in a run folder follows a symbolic link. A ``run.lock`` link used to
truncate its target, and linked ``predictions.jsonl`` and ``quarantine.jsonl`` got lines
appended outside the folder. Now each is refused with one line naming it, and the file the link
points to keeps every byte (or, for a dangling link, is never created)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_runs import only_folder, tiny_command

from lostreg.datasets.demo import generate_demo
from lostreg.errors import error_line
from lostreg.io import (
    JsonlAppender,
    LinkInRunFolder,
    SharedFileInRunFolder,
    atomic_write_json,
    refuse_links,
    repair_jsonl,
)
from lostreg.run import main
from lostreg.runs.lock import RunLock

OUTSIDE = b'{"not": "a run file"}\nno newline at the end'  # what the links point to

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture
def interrupted_run(tmp_path, tiny_model, capsys) -> Path:
    """A run folder as a kill leaves it: two predictions of four, no metrics.json."""
    generate_demo(tmp_path / "data")
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs")) == 0
    folder = only_folder(tmp_path / "runs")
    lines = (folder / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "predictions.jsonl").write_bytes(b"".join(lines[:2]))
    (folder / "metrics.json").unlink()
    capsys.readouterr()
    return folder


def link(path: Path, target: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


@pytest.mark.parametrize("name", ["run.lock", "predictions.jsonl", "quarantine.jsonl",
                                  "predictions.rank1.jsonl", "config.json", "metrics.json"])
@pytest.mark.parametrize("dangling", [False, True])
def test_a_linked_run_file_is_refused_and_its_target_untouched(interrupted_run, tmp_path, capsys,
                                                              name, dangling) -> None:
    target = tmp_path / "outside" / "target.txt"
    target.parent.mkdir()
    if not dangling:
        target.write_bytes(OUTSIDE)
    original = (interrupted_run / name).read_bytes() if (interrupted_run / name).exists() else None
    link(interrupted_run / name, target)
    before = sorted(os.listdir(interrupted_run))
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {interrupted_run / name}: is a symbolic link; lostreg never "
                       "writes through a link (it would change the file it points to): remove "
                       "the link, or put a copy of that file in its place"), err
    assert "Traceback" not in "\n".join(err)
    if dangling:
        assert not target.exists()  # O_CREAT through the link would have made it
    else:
        assert target.read_bytes() == OUTSIDE
    assert sorted(os.listdir(interrupted_run)) == before  # nothing added, nothing removed
    assert (interrupted_run / name).is_symlink()
    (interrupted_run / name).unlink()  # the link replaced by the file: the run finishes
    if original is not None:
        (interrupted_run / name).write_bytes(original)
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs")) == 0
    assert (interrupted_run / "metrics.json").is_file()


def test_every_appending_writer_refuses_a_link(tmp_path) -> None:
    """The writers themselves, below the run's check (a link made after the check):
    appends, the torn-line repair and the lock open with O_NOFOLLOW."""
    target = tmp_path / "target.txt"
    target.write_bytes(OUTSIDE)
    link(tmp_path / "lines.jsonl", target)
    with pytest.raises(LinkInRunFolder):
        JsonlAppender(tmp_path / "lines.jsonl")
    with pytest.raises(LinkInRunFolder):
        repair_jsonl(tmp_path / "lines.jsonl")  # would cut the target after its last newline
    link(tmp_path / "run.lock", target)
    with pytest.raises(LinkInRunFolder) as refused, RunLock(tmp_path):
        pass
    assert error_line(refused.value).startswith(f"error: {tmp_path / 'run.lock'}: is a symbolic")
    assert target.read_bytes() == OUTSIDE
    # a file written whole replaces the link with a file of its own
    link(tmp_path / "metrics.json", target)
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    assert not (tmp_path / "metrics.json").is_symlink() and target.read_bytes() == OUTSIDE


# --- hard links: the same file under another path (a `cp -al` backup of the runs) --------------

SHARED = ("has 2 hard links (the same file under another path, e.g. a `cp -al` backup); lostreg "
          "never writes into a shared file (it would change the other path too): replace it "
          "with a copy of itself (cp --remove-destination)")


@pytest.mark.parametrize("name", ["predictions.jsonl", "quarantine.jsonl",
                                  "predictions.rank1.jsonl"])
def test_a_hard_linked_appended_file_is_refused_and_its_other_name_untouched(
        interrupted_run, tmp_path, capsys, name) -> None:
    """A resume appended its lines to a predictions file that a backup shared (and cut a torn
    line from it): the backup changed with the run. Refused before anything is written."""
    path = interrupted_run / name
    if not path.exists():
        path.write_bytes(b"")
    backup = tmp_path / "backup" / name
    backup.parent.mkdir()
    os.link(path, backup)
    kept = backup.read_bytes()
    before = {p.name: p.read_bytes() for p in interrupted_run.iterdir()}
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {path}: {SHARED}", err
    assert backup.read_bytes() == kept
    assert {p.name: p.read_bytes() for p in interrupted_run.iterdir()} == before
    path.unlink()  # the shared file replaced by a copy: the run finishes, the backup stays
    path.write_bytes(kept)
    assert main(tiny_command(tmp_path / "data", tmp_path / "runs")) == 0
    assert backup.read_bytes() == kept and (interrupted_run / "metrics.json").is_file()


def test_every_appending_writer_refuses_a_shared_file(tmp_path) -> None:
    """Below the run's check (a link made after it): appends, the torn-line repair and the
    lock's holder line would all write into the other path's file."""
    shared = tmp_path / "backup.txt"
    shared.write_bytes(OUTSIDE)
    os.link(shared, tmp_path / "lines.jsonl")
    with pytest.raises(SharedFileInRunFolder):
        JsonlAppender(tmp_path / "lines.jsonl")
    with pytest.raises(SharedFileInRunFolder):
        repair_jsonl(tmp_path / "lines.jsonl")
    os.link(shared, tmp_path / "run.lock")
    with pytest.raises(SharedFileInRunFolder) as refused, RunLock(tmp_path):
        pass
    assert error_line(refused.value) == (f"error: {tmp_path / 'run.lock'}: "
                                         + SHARED.replace("has 2", "has 3"))
    assert shared.read_bytes() == OUTSIDE
    # a file written whole replaces its name with a file of its own: the other keeps its bytes
    os.link(shared, tmp_path / "metrics.json")
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    assert shared.read_bytes() == OUTSIDE


def test_refuse_links_reads_each_file_once_and_names_a_link_before_a_shared_file(
        tmp_path, monkeypatch) -> None:
    """One ``lstat`` per file serves both checks; a link anywhere is named before a shared
    appended file, whatever their order; a missing file is neither."""
    shared, linked = tmp_path / "shared.jsonl", tmp_path / "linked.json"
    shared.write_text("x")
    os.link(shared, tmp_path / "backup.jsonl")
    linked.symlink_to(shared)
    calls: list[str] = []
    real_lstat = os.lstat

    def counting_lstat(path, *args, **kwargs):
        calls.append(os.fspath(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", counting_lstat)
    with pytest.raises(LinkInRunFolder):
        refuse_links([tmp_path / "none.json"], [shared, linked])
    calls.clear()
    with pytest.raises(SharedFileInRunFolder):
        refuse_links([tmp_path / "none.json"], [tmp_path / "none.jsonl", shared])
    assert sorted(calls) == sorted(map(str, [tmp_path / "none.json", tmp_path / "none.jsonl",
                                             shared]))  # was five: islink, then lstat again
    refuse_links([shared], [tmp_path / "none.jsonl"])  # only appended files must be unshared

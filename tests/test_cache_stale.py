"""Feature-cache folders an upgrade leaves behind (issue 20 follow-up): listed, removed safely,
and announced by a run in one line.

Every key holds the code versions that wrote it (cache format, lostreg version, result
version), so each version bump leaves the old folders behind, never read again. Here caches
are written with the cache's own writer under result version N (this code's) and N+1, then:

* ``python -m lostreg.cache DIR`` lists each folder as current, stale or unreadable with its
  size on disk and index lines, and sums the sizes per status;
* ``--delete-stale`` removes exactly the stale folders (never a current or unreadable one,
  never through a link: a linked folder's target and a link's target inside a folder stay);
* an interrupted removal is finished by the next ``--delete-stale``;
* a run with ``--cache-features`` prints one note line when (and only when) stale folders
  lie under its cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lostreg
import lostreg.features.cache_admin as admin
import lostreg.features.pipeline as pipeline_module
from lostreg import cli, version
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.cache import main as cache_main
from lostreg.features import cache_key as cache_key_module
from lostreg.features.cache import FeatureCache, cache_key, key_hash
from lostreg.run import main as run_main
from lostreg.runs import state

N = version.RESULT_VERSION
REPO = Path(__file__).resolve().parents[1]
LIMIT = 3


def key(result_version: int = N, feature: str = "k", **changes: object) -> dict:
    fields = dict(model="tiny", timm_name="vit_small_patch16_224.dino", model_kwargs={"depth": 2},
                  weights="random", num_prefix_tokens=1, mean=(0.5,) * 3, std=(0.5,) * 3,
                  patch_size=16, pos_embed="dino", dataset="demo", split="all", feature=feature,
                  precision="fp32", storage="fp32", lostreg_version=lostreg.__version__,
                  result_version=result_version)
    fields.update(changes)
    return cache_key(**fields)


def write_cache(root: Path, cache_key_: dict, images: int = 2, batches: int = 1) -> Path:
    """A cache folder written by ``FeatureCache`` itself: ``batches`` shards of ``images``."""
    cache = FeatureCache(root, cache_key_)
    for batch in range(batches):
        ids = [f"img{batch}_{i}" for i in range(images)]
        cache.write(ids, [(32, 32)] * images, [f"sha256:{i}" for i in ids], (2, 2),
                    torch.arange(images * 4 * 8, dtype=torch.float32).view(images, 4, 8))
    cache.close()
    assert cache.writable
    return cache.dir


def du(path: Path) -> int:
    """Bytes on disk as ``du`` counts them (blocks of the folder and all in it, no link
    followed), computed here independently of ``cache_admin.disk_usage``."""
    total = os.lstat(path).st_blocks * 512
    for folder, dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(folder, name)).st_blocks * 512 for name in dirs + files)
    return total


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def listing(root: Path, capsys) -> tuple[int, str]:
    status = cache_main([str(root)])
    out = capsys.readouterr()
    assert out.err == ""
    return status, out.out


def rows(text: str) -> dict[str, list[str]]:
    """The listing's rows by folder name (its last column), cut where the header's columns
    start (a size holds a space: ``24.0 KiB``)."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("status "))
    starts = [match.start() for match in re.finditer(r"\S+", lines[at])]
    found = {}
    for line in lines[at + 1:]:
        if line.startswith("    "):  # a stale or unreadable folder's reason
            continue
        if line.split(" ", 1)[0] not in admin.STATUSES:
            break  # the table ends
        cells = [line[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)]
        found[cells[-1]] = cells
    return found


# --- listing ---------------------------------------------------------------------------------


def test_listing_gives_each_folder_its_status_size_and_images(tmp_path, capsys) -> None:
    root = tmp_path / "cache"
    current = write_cache(root, key(N), images=2)
    stale = write_cache(root, key(N + 1), images=3, batches=2)
    broken = root / f"demo-all-vit_small_patch16_224-v-{'0' * 12}"
    broken.mkdir()
    (broken / "key.json").write_text("{")
    status, text = listing(root, capsys)
    assert status == 0
    table = rows(text)
    assert set(table) == {current.name, stale.name, broken.name}
    assert table[current.name][:3] == ["current", admin.human_size(du(current)), "2"]
    assert table[stale.name][:3] == ["stale", admin.human_size(du(stale)), "6"]
    assert table[broken.name][:3] == ["unreadable", admin.human_size(du(broken)), "-"]
    # dataset split model feature precision dtype format lostreg result
    assert table[stale.name][3:12] == ["demo", "all", "tiny", "k", "fp32", "fp32", "2",
                                       lostreg.__version__, str(N + 1)]
    assert f"written by result version {N + 1} (this code: {N})" in text
    assert f"{broken / 'key.json'}: not readable JSON" in text
    assert f"current: 1 folder, {admin.human_size(du(current))}" in text
    assert f"stale: 1 folder, {admin.human_size(du(stale))}" in text
    assert f"unreadable: 1 folder, {admin.human_size(du(broken))}" in text
    assert f"python -m lostreg.cache {root} --delete-stale" in text


def test_disk_usage_and_index_lines_match_an_independent_count(tmp_path) -> None:
    folder = write_cache(tmp_path, key(), images=5, batches=3)
    assert admin.disk_usage(folder) == (du(folder), True)
    assert admin.index_lines(folder) == 15
    assert du(folder) > 3 * 5 * 4 * 8 * 4  # the payloads at least


@pytest.mark.parametrize("other, why", [
    ({"result_version": N + 1}, f"result version {N + 1} (this code: {N})"),
    ({"lostreg_version": "0.0.1"}, f"lostreg 0.0.1 (this code: {lostreg.__version__})"),
])
def test_a_key_of_other_code_is_stale(tmp_path, other, why) -> None:
    changes = dict(other)
    write_cache(tmp_path, key(changes.pop("result_version", N), **changes))
    (folder,) = admin.scan(tmp_path).folders
    assert (folder.status, folder.why) == ("stale", why)


def test_a_key_of_another_format_is_stale(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cache_key_module, "FORMAT_VERSION", 1)
    write_cache(tmp_path, key())  # the key says format 1
    monkeypatch.undo()
    (folder,) = admin.scan(tmp_path).folders
    assert (folder.status, folder.why) == ("stale", f"format 1 (this code: "
                                                    f"{cache_key_module.FORMAT_VERSION})")


def test_a_key_written_before_result_versions_is_stale(tmp_path, capsys) -> None:
    old = key()
    del old["result_version"]  # keys before result versions existed (result version 1)
    write_cache(tmp_path, old)
    found = admin.scan(tmp_path)
    (folder,) = found.folders
    assert (folder.status, folder.why) == ("stale", f"result version 1 (this code: {N})")
    assert admin.key_versions(old)["result_version"] == 1
    assert rows(listing(tmp_path, capsys)[1])[folder.path.name][-2] == "1"  # result column


def test_this_codes_result_version_decides(tmp_path, monkeypatch) -> None:
    """The same folder is current for code of its version, stale for code of the next."""
    write_cache(tmp_path, key(N))
    assert [f.status for f in admin.scan(tmp_path).folders] == ["current"]
    monkeypatch.setattr(version, "RESULT_VERSION", N + 1)
    assert [f.status for f in admin.scan(tmp_path).folders] == ["stale"]


NAME = f"demo-all-vit_small_patch16_224-k-{'a' * 12}"


@pytest.mark.parametrize("content, says", [
    (None, "missing"),
    (b"", "not readable JSON"),
    (b"[" * 200_000, "not readable JSON (nested more than"),
    (b'{"format": NaN}', "not readable JSON"),
    (b" " * ((1 << 20) + 1), "more than the 1,048,576 a cache key file may have"),
    (b"[]", "not a JSON object"),
    (b'{"format": 2}', "no str 'lostreg_version': not a cache key"),
    (json.dumps(key()).encode(), "the key of folder demo-all-vit_small_patch16_224-k-"),
])
def test_a_bad_key_file_is_unreadable_in_one_line(tmp_path, capsys, content, says) -> None:
    folder = tmp_path / NAME
    folder.mkdir()
    if content is not None:
        (folder / "key.json").write_bytes(content)
    (found,) = admin.scan(tmp_path).folders
    assert found.status == "unreadable"
    assert found.why.startswith(f"{folder / 'key.json'}: ") and says in found.why
    assert "\n" not in found.why
    assert cache_main([str(tmp_path), "--delete-stale"]) == 0
    assert folder.is_dir() and "removed 0 stale folders" in capsys.readouterr().out


def test_a_linked_key_file_is_not_followed(tmp_path) -> None:
    stale = write_cache(tmp_path / "elsewhere", key(N + 1))
    folder = tmp_path / "cache" / stale.name
    folder.mkdir(parents=True)
    (folder / "key.json").symlink_to(stale / "key.json")
    (found,) = admin.scan(tmp_path / "cache").folders
    assert (found.status, found.why) == ("unreadable", f"{folder / 'key.json'}: a symbolic link "
                                                       "(never followed)")


def test_a_linked_key_file_is_rewritten_by_the_cache_too(tmp_path, capsys) -> None:
    """The cache reading its own folder refuses the link as the listing does (one reader,
    ``read_key_file``): even a link to the very same key is damaged, and is replaced by a
    regular file while the file it named stays as it was."""
    elsewhere = write_cache(tmp_path / "elsewhere", key())
    target_bytes = (elsewhere / "key.json").read_bytes()
    folder = write_cache(tmp_path / "cache", key())
    (folder / "key.json").unlink()
    (folder / "key.json").symlink_to(elsewhere / "key.json")
    capsys.readouterr()
    again = FeatureCache(tmp_path / "cache", key())
    assert len(again) == 2  # the index is still read; shards are checked against the hash
    assert "does not match its folder; rewriting" in capsys.readouterr().err
    assert not (folder / "key.json").is_symlink()
    assert json.loads((folder / "key.json").read_text()) == key()
    assert (elsewhere / "key.json").read_bytes() == target_bytes


def test_a_missing_root_or_a_file_is_one_error_line(tmp_path, capsys) -> None:
    assert cache_main([str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'none'}: no such folder")
    (tmp_path / "file").write_text("x")
    assert cache_main([str(tmp_path / "file"), "--delete-stale"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'file'}: not a folder (a feature " \
                                      "cache is a folder)\n"
    assert (tmp_path / "file").read_text() == "x"


# --- --delete-stale ----------------------------------------------------------------------------


def test_delete_stale_removes_exactly_the_stale_folders(tmp_path, capsys) -> None:
    root = tmp_path / "cache"
    current = write_cache(root, key(N))
    stale = write_cache(root, key(N + 1), images=3)
    other_stale = write_cache(root, key(N + 1, feature="v"))
    unreadable = root / NAME
    unreadable.mkdir()
    (unreadable / "key.json").write_text("[]")
    not_ours = root / "notes"
    not_ours.mkdir()
    (root / "README").write_text("mine")
    outside = write_cache(tmp_path / "elsewhere", key(N + 1, feature="q"))
    (root / outside.name).symlink_to(outside, target_is_directory=True)
    kept = {path: snapshot(path) for path in (current, unreadable, not_ours, outside)}
    sizes = {stale: du(stale), other_stale: du(other_stale)}

    assert cache_main([str(root), "--delete-stale"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:2]) == sorted(f"removed {path} ({admin.human_size(size)})"
                                     for path, size in sizes.items())
    assert out[2] == f"skipped: {root / outside.name} is a symbolic link (never followed)"
    assert out[3] == (f"removed 2 stale folders, freed {admin.human_size(sum(sizes.values()))}; "
                      "2 current or unreadable folders kept")
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [current.name, unreadable.name, "notes", "README", outside.name])
    assert {path: snapshot(path) for path in kept} == kept
    assert (root / "README").read_text() == "mine"
    assert (root / outside.name).is_symlink()


def test_a_link_inside_a_stale_folder_is_removed_as_a_link(tmp_path, capsys) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.bin").write_bytes(b"keep me")
    stale = write_cache(tmp_path / "cache", key(N + 1))
    (stale / "shards" / "linked").symlink_to(precious, target_is_directory=True)
    (stale / "index" / "linked.jsonl").symlink_to(precious / "data.bin")
    assert admin.index_lines(stale) == 2  # the linked index file is not read
    assert cache_main([str(tmp_path / "cache"), "--delete-stale"]) == 0
    assert not stale.exists() and list((tmp_path / "cache").iterdir()) == []
    assert (precious / "data.bin").read_bytes() == b"keep me"


def test_an_interrupted_removal_is_finished_by_the_next(tmp_path, capsys, monkeypatch) -> None:
    root = tmp_path / "cache"
    stale = write_cache(root, key(N + 1))
    current = write_cache(root, key(N))
    real_unlink = os.unlink

    def interrupted(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        raise KeyboardInterrupt  # after the first file of the renamed folder

    monkeypatch.setattr(admin.os, "unlink", interrupted)
    assert cache_main([str(root), "--delete-stale"]) == 130
    assert "--delete-stale finishes it" in capsys.readouterr().err
    monkeypatch.undo()
    (aside,) = [p for p in root.iterdir() if p.name.startswith(".deleting-")]
    assert admin.TRASH_PATTERN.match(aside.name).group("name") == stale.name
    assert (aside / "key.json").is_file()  # removed last: the folder still says what it is

    status, text = listing(root, capsys)
    assert rows(text)[aside.name][0] == "stale" and "partly removed" in text
    assert cache_main([str(root), "--delete-stale"]) == 0
    assert f"removed {aside} " in capsys.readouterr().out
    assert [p.name for p in root.iterdir()] == [current.name]


def test_only_stale_folders_can_be_removed(tmp_path) -> None:
    write_cache(tmp_path, key(N))
    (folder,) = admin.scan(tmp_path).folders
    with pytest.raises(lostreg.errors.LostregError, match="current, not stale; left alone"):
        admin.remove_folder(folder)
    assert folder.path.is_dir()


# --- the run's note ----------------------------------------------------------------------------


SPEC = BackboneSpec("tiny_cache_stale", "vit_small_patch16_224.dino", "dino", 16, 0,
                    pos_embed="dino", model_kwargs=dict(depth=1, embed_dim=24, num_heads=2))


@pytest.fixture
def tiny() -> str:
    BACKBONES[SPEC.name] = SPEC
    yield SPEC.name
    BACKBONES.pop(SPEC.name, None)


def as_result_version(monkeypatch, value: int) -> None:
    """This process as code of result ``value``: its keys, its run folders, its listing."""
    for module in (pipeline_module, state, version):
        monkeypatch.setattr(module, "RESULT_VERSION", value)


def cached_run(root: Path, out: str, features: str, capsys) -> list[str]:
    """One run with the cache at ``root/cache``; its stderr lines."""
    argv = ["--model", SPEC.name, "--weights", "random", "--dataset", "demo", "--data-root",
            str(root / "data"), "--runs", str(root / out), "--cache-features",
            str(root / "cache"), "--features", features, "--num-workers", "0", "--no-progress",
            "--device", "cpu", "--limit", str(LIMIT)]
    capsys.readouterr()
    assert run_main(argv) == 0
    return capsys.readouterr().err.splitlines()


NOTE = re.compile(r"^note: (\d+) feature-cache folders? under (.+) (?:was|were) written by other "
                  r"lostreg versions \((.+)\) and (?:is|are) never read again: "
                  r"python -m lostreg\.cache (.+) --delete-stale$")


@pytest.mark.usefixtures("one_thread")
def test_a_run_notes_stale_folders_once_and_only_when_there_are(tmp_path, tiny, monkeypatch,
                                                                capsys) -> None:
    as_result_version(monkeypatch, N + 1)
    first = cached_run(tmp_path, "newer", "k,v", capsys)  # two folders of result version N+1
    assert not any(NOTE.match(line) for line in first)  # nothing stale yet
    stale = sorted((tmp_path / "cache").iterdir())
    assert len(stale) == 2

    as_result_version(monkeypatch, N)
    second = cached_run(tmp_path, "this", "k", capsys)
    notes = [line for line in second if line.startswith("note: ") and "lostreg.cache" in line]
    assert len(notes) == 1  # one line for both folders
    count, where, size, command_dir = NOTE.match(notes[0]).groups()
    assert (int(count), where, command_dir) == (2, str(tmp_path / "cache"), str(tmp_path / "cache"))
    assert size == admin.human_size(sum(du(path) for path in stale))

    assert cache_main([str(tmp_path / "cache"), "--delete-stale"]) == 0
    third = cached_run(tmp_path, "again", "k", capsys)
    assert not any("lostreg.cache" in line for line in third)
    assert [f.status for f in admin.scan(tmp_path / "cache").folders] == ["current"]


def test_the_note_never_fails(tmp_path, monkeypatch) -> None:
    assert admin.stale_note(tmp_path / "none") is None  # the first run: no cache yet
    (tmp_path / "file").write_text("x")
    assert admin.stale_note(tmp_path / "file") is None
    write_cache(tmp_path / "cache", key(N + 1))
    assert admin.stale_note(tmp_path / "cache").startswith("note: 1 feature-cache folder under ")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(admin.os, "scandir", denied)
    assert admin.stale_note(tmp_path / "cache") is None


def test_the_note_reads_no_shard(tmp_path, monkeypatch) -> None:
    """The note opens the key files only (shards and index files are sized, never opened)."""
    stale = write_cache(tmp_path, key(N + 1), batches=2)
    opened: list[str] = []
    real_open, real_builtin_open = os.open, open

    def spying_os_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    def spying_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_builtin_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spying_os_open)
    monkeypatch.setattr("builtins.open", spying_open)
    assert admin.stale_note(tmp_path) is not None
    monkeypatch.undo()
    assert opened == [str(stale / "key.json")]


# --- the command ---------------------------------------------------------------------------------


def test_the_command_is_listed_and_documents_itself(capsys) -> None:
    assert cli.COMMANDS["cache"][0] == "lostreg.cache"
    with pytest.raises(SystemExit) as exit_:
        cache_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m lostreg.cache")
    for word in ("current", "stale", "unreadable", "--delete-stale", "results/cache"):
        assert word in text
    assert key_hash(key())[:12] in admin.folder_name(key())  # the name the pattern expects
    assert admin.FOLDER_PATTERN.match(admin.folder_name(key()))


def test_the_listing_imports_no_torch(tmp_path) -> None:
    """``python -m lostreg.cache`` reads key files only: it does not wait seconds for torch
    (the key and its folder name live in the torch-free ``cache_key``)."""
    write_cache(tmp_path, key(N + 1))
    code = ("import runpy, sys; sys.argv = ['lostreg.cache', sys.argv[1]]\n"
            "try:\n    runpy.run_module('lostreg.cache', run_name='__main__')\n"
            "except SystemExit as end:\n    assert end.code == 0, end.code\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
    assert "stale: 1 folder" in done.stdout

"""The feature cache trusts nothing it reads back, and never blocks a run it cannot write to."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import lostreg.features.cache as cache_module
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets import load_dataset
from lostreg.features.cache import CacheProblem, FeatureCache, image_fingerprint
from lostreg.io import JsonlAppender
from lostreg.run import main

REPO = Path(__file__).resolve().parents[1]
KEY = {"format": cache_module.FORMAT_VERSION, "timm_name": "arch.tag", "dataset": "d",
       "split": "s", "feature": "k"}
# the same tiny model in this process and in the read-only child process
TINY_ARGS = ("tiny_cache_hard", "vit_small_patch16_224.dino", "dino", 16, 0)
TINY_KWARGS = dict(pos_embed="dino", model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))
LIMIT = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny() -> str:
    spec = BackboneSpec(*TINY_ARGS, **TINY_KWARGS)
    BACKBONES[spec.name] = spec
    yield spec.name
    BACKBONES.pop(spec.name, None)


def cli(root: Path, out: str, model: str, *extra: str) -> list[str]:
    return ["--model", model, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / out),
            "--cache-features", str(root / "cache"), "--num-workers", "0", "--no-progress",
            "--limit", str(LIMIT), *extra]


def only_run(folder: Path) -> Path:
    (run_dir,) = folder.iterdir()
    return run_dir


def seconds(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["seconds"]


def one_shard(tmp_path: Path, size=(168, 224), grid=(12, 16)) -> tuple[FeatureCache, str]:
    cache = FeatureCache(tmp_path, KEY)
    assert cache.write(["img"], [size], ["sha256:00"], grid, torch.ones(1, grid[0] * grid[1], 2))
    cache.close()
    (name,) = [p.name for p in cache.shard_dir.iterdir()]
    return FeatureCache(tmp_path, KEY), name


# --- shards: the checksum covers the header --------------------------------------------------


@pytest.mark.parametrize("old, new", [(b'"size": [168, 224]', b'"size": [128, 224]'),
                                      (b'"grid": [12, 16]', b'"grid": [16, 12]')])
def test_a_flipped_header_is_caught_by_the_checksum(tmp_path, old, new) -> None:
    cache, name = one_shard(tmp_path)
    assert cache.read(name).sizes == [(168, 224)]  # intact: reads back
    path = cache.shard_dir / name
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))  # same length: only the checksum can tell
    with pytest.raises(CacheProblem, match="checksum mismatch"):
        cache.read(name)


def test_a_shard_of_the_old_format_is_refused(tmp_path) -> None:
    cache, name = one_shard(tmp_path)
    path = cache.shard_dir / name
    path.write_bytes(b"LRFEATS\x01" + path.read_bytes()[8:])
    with pytest.raises(CacheProblem, match="cache format 1"):
        cache.read(name)


def test_a_flipped_header_length_is_refused(tmp_path) -> None:
    cache, name = one_shard(tmp_path)
    path = cache.shard_dir / name
    data = bytearray(path.read_bytes())
    data[8] ^= 0x40  # header length 64 bytes off: lands inside the file
    path.write_bytes(bytes(data))
    with pytest.raises(CacheProblem, match="checksum mismatch|corrupted header"):
        cache.read(name)


# --- images are keyed by their content --------------------------------------------------------


def test_fingerprints_follow_content_not_size(tmp_path) -> None:
    a, b, c = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"x" * 999 + b"y")  # same size, one byte differs
    c.write_bytes(b"x" * 1000)
    assert image_fingerprint(a) == image_fingerprint(c) != image_fingerprint(b)
    assert image_fingerprint(a).startswith("sha256:") and len(image_fingerprint(a)) == 7 + 64
    assert image_fingerprint(tmp_path / "missing.jpg") is None


def test_the_index_fingerprint_must_match_the_shard_header(tmp_path) -> None:
    """An index line edited to a new image's fingerprint cannot pass off stale features: the
    checksummed header says which image the row was computed from."""
    cache, name = one_shard(tmp_path)
    (index,) = cache.index_dir.glob("*.jsonl")
    index.write_text(index.read_text().replace("sha256:00", "sha256:11"))
    again = FeatureCache(tmp_path, KEY)
    assert again.lookup("img", "sha256:11") is not None
    with pytest.raises(CacheProblem, match="rows do not match the cache index"):
        again.read(name)


def test_index_lines_cannot_name_files_outside_the_shard_folder(tmp_path, capsys) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    cache, name = one_shard(tmp_path / "cache")
    (index,) = cache.index_dir.glob("*.jsonl")
    bad = {"image_id": "evil", "shard": "../../../victim.txt", "row": 0, "fingerprint": "f"}
    with open(index, "a") as handle:
        handle.write(json.dumps(bad) + "\n" + "{not json\n")
    again = FeatureCache(tmp_path / "cache", KEY)
    assert again.lookup("evil", "f") is None and again.lookup("img", "sha256:00") is not None
    assert "2 bad line(s) ignored" in capsys.readouterr().err
    again.forget("../../../victim.txt")
    assert victim.read_text() == "keep me"


def test_an_image_replaced_by_one_of_the_same_size_is_recomputed(tmp_path, tiny) -> None:
    index = load_dataset("demo", tmp_path / "data")
    assert main(cli(tmp_path, "first", tiny)) == 0
    target = next(r.path for r in index.records[:LIMIT] if r.path.suffix == ".jpg")
    original = target.read_bytes()
    with Image.open(target) as image:
        flipped = image.transpose(Image.Transpose.ROTATE_180)  # same size, other content
    replacement = b""
    for quality in range(90, 10, -10):
        buffer = io.BytesIO()
        flipped.save(buffer, "JPEG", quality=quality)
        if len(buffer.getvalue()) <= len(original):
            replacement = buffer.getvalue()
            break
    assert replacement and replacement != original
    # padded after the JPEG end marker (decoders stop there) to the original byte size
    target.write_bytes(replacement + b"\0" * (len(original) - len(replacement)))
    assert target.stat().st_size == len(original)

    assert main(cli(tmp_path, "second", tiny)) == 0
    spent = seconds(only_run(tmp_path / "second"))
    assert spent["backbone_images"] == 1 and spent["cached_images"] == LIMIT - 1


# --- a cache that cannot be written -------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_warns_once_and_turns_writing_off(tmp_path, capsys, monkeypatch) -> None:
    cache, _ = one_shard(tmp_path)
    calls: list[int] = []

    def full(*args, **kwargs):
        calls.append(1)
        enospc()

    monkeypatch.setattr(cache_module, "atomic_write_bytes", full)
    feats = torch.zeros(1, 4, 2)
    assert cache.write(["x"], [(28, 28)], ["sha256:x"], (2, 2), feats) is False
    assert cache.write(["y"], [(28, 28)], ["sha256:y"], (2, 2), feats) is False
    cache.close()
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "No space left on device" in err
    assert calls == [1] and not cache.writable
    assert cache.lookup("img", "sha256:00") is not None  # what was there is still read


def test_a_failed_index_append_removes_its_shard(tmp_path, capsys, monkeypatch) -> None:
    cache, name = one_shard(tmp_path)
    monkeypatch.setattr(JsonlAppender, "write_many", enospc)
    assert cache.write(["x"], [(28, 28)], ["sha256:x"], (2, 2), torch.zeros(1, 4, 2)) is False
    assert [p.name for p in cache.shard_dir.iterdir()] == [name]  # no orphan shard
    assert cache.lookup("x", "sha256:x") is None
    assert capsys.readouterr().err.count("cannot write") == 1


def test_forget_on_a_cache_that_cannot_remove_does_not_raise(tmp_path, capsys,
                                                              monkeypatch) -> None:
    cache, name = one_shard(tmp_path)

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    cache.forget(name)
    assert cache.lookup("img", "sha256:00") is None and not cache.writable
    assert "Read-only file system" in capsys.readouterr().err


CHILD = f"""
import sys
from lostreg.backbones import BACKBONES, BackboneSpec
spec = BackboneSpec(*{TINY_ARGS!r}, **{TINY_KWARGS!r})
BACKBONES[spec.name] = spec
from lostreg.run import main
argv, out = sys.argv[1:-1], sys.argv[-1]
codes = [main([*argv, "--output", f"{{out}}/{{n}}"]) for n in ("once", "again")]
sys.exit(max(codes))
"""


def read_only_wrapper(folder: Path) -> tuple[list[str], str] | None:
    """A command prefix under which ``folder`` is really read-only, and how: ``chmod`` for a
    user root does not bypass, else a read-only bind mount in a private mount namespace (so
    nothing leaks out of the child), else None."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return [], "chmod a-w"
    if shutil.which("unshare") is None:
        return None
    mount = (f'mount --bind "{folder}" "{folder}" && '
             f'mount -o remount,bind,ro "{folder}" "{folder}" && ')
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount + f'! touch "{folder}/.probe"'],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "sh", "-c", mount + 'exec "$0" "$@"'], "read-only bind mount"


def test_a_read_only_cache_with_a_corrupt_shard_does_not_block_runs(tmp_path, tiny) -> None:
    assert main(cli(tmp_path, "reference", tiny, "--batch-size", "2")) == 0
    reference = (only_run(tmp_path / "reference") / "predictions.jsonl").read_bytes()
    shards = sorted((tmp_path / "cache").glob("*/shards/*.feats"))
    data = bytearray(shards[0].read_bytes())
    data[-3] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    wrapper = read_only_wrapper(tmp_path / "cache")
    if wrapper is None:
        pytest.skip("no way to make a folder read-only here (root without mount namespaces); "
                    "the monkeypatched EROFS/ENOSPC tests above cover the code path")
    prefix, how = wrapper
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = cli(tmp_path, "unused", tiny.replace(tiny, TINY_ARGS[0]))
    args = args[:args.index("--output")] + args[args.index("--output") + 2:]
    proc = subprocess.run([*prefix, sys.executable, "-c", CHILD, *args, str(tmp_path / "ro")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, f"{how}: {proc.stderr[-2000:]}"
    for name in ("once", "again"):  # the rerun is not blocked either
        assert (only_run(tmp_path / "ro" / name) / "predictions.jsonl").read_bytes() == reference
    assert proc.stderr.count("checksum mismatch") == 2  # reported by each run
    assert proc.stderr.count("cannot write") == 2, proc.stderr  # one warning per run
    assert "Traceback" not in proc.stderr
    assert shards[0].exists()  # could not be removed: read-only for real

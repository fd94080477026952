"""Several processes (torchrun, gloo on the CPU) give the bytes one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets import load_dataset
from lostreg.errors import LostregError
from lostreg.io import read_jsonl
from lostreg.run import main
from lostreg.runs import distributed

REPO = Path(__file__).resolve().parents[1]
MODEL = "dinov2_vits14_reg4"
TINY = BackboneSpec("tiny_dist", "vit_small_patch16_224.dino", "dino", 16, 0, pos_embed="dino",
                    model_kwargs=dict(depth=2, embed_dim=64, num_heads=2))


pytestmark = pytest.mark.usefixtures("one_thread")


def args(root: Path, out: str, model: str = MODEL, *extra: str) -> list[str]:
    return ["--model", model, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / out),
            "--num-workers", "0", "--no-progress", *extra]


def test_torchrun_two_ranks_equal_one_process(tmp_path) -> None:
    load_dataset("demo", tmp_path / "data")  # generated once, before the ranks start
    sweep = ("--limit", "9", "--batch-size", "2", "--gram-bias=0,0.1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lostreg.run", *args(tmp_path, "dist", MODEL, *sweep),
         "--cache-features", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("CorLoc")]
    assert len(printed) == 2, proc.stdout  # one line per run, from rank 0 only

    assert main(args(tmp_path, "single", MODEL, *sweep)) == 0
    single = {p.name: p for p in (tmp_path / "single").iterdir()}
    dist = {p.name: p for p in (tmp_path / "dist").iterdir()}
    assert dist.keys() == single.keys() and len(dist) == 2, (sorted(dist), sorted(single))
    for name, run_dir in dist.items():
        assert sorted(f.name for f in run_dir.iterdir()) == [
            "config.json", "metrics.json", "predictions.jsonl"]  # parts merged and removed
        assert (run_dir / "predictions.jsonl").read_bytes() == \
            (single[name] / "predictions.jsonl").read_bytes()
        got = json.loads((run_dir / "metrics.json").read_text())
        want = json.loads((single[name] / "metrics.json").read_text())
        for key in ("corloc", "n_hits", "n_images", "run_id"):
            assert got[key] == want[key]
        assert got["seconds"]["world_size"] == 2 and got["seconds"]["images_computed"] == 9
        assert got["seconds"]["backbone_images"] == 9  # each image went through one rank once
        assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    # both ranks wrote into one cache: a second index file, every image present once
    indexes = sorted((tmp_path / "cache").glob("*/index/*.jsonl"))
    assert len(indexes) == 2
    ids = [line["image_id"] for path in indexes for line in read_jsonl(path)]
    assert len(ids) == len(set(ids)) == 9


@pytest.fixture
def tiny():
    BACKBONES[TINY.name] = TINY
    yield TINY.name
    BACKBONES.pop(TINY.name, None)


def test_parts_left_by_a_killed_distributed_run_are_merged(tmp_path, tiny) -> None:
    assert main(args(tmp_path, "runs", tiny, "--limit", "10")) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    full = (run_dir / "predictions.jsonl").read_bytes()
    lines = full.splitlines(keepends=True)
    # what a 3-rank run killed mid-way leaves: parts with some lines, one torn, no merge
    (run_dir / "predictions.jsonl").unlink()
    (run_dir / "metrics.json").unlink()
    distributed.part_path(run_dir, 0).write_bytes(b"".join(lines[0:6:3]))
    distributed.part_path(run_dir, 1).write_bytes(b"".join(lines[1:9:3]) + lines[4][:15])
    distributed.part_path(run_dir, 2).write_bytes(b"")
    assert main(args(tmp_path, "runs", tiny, "--limit", "10")) == 0
    assert (run_dir / "predictions.jsonl").read_bytes() == full
    assert distributed.part_files(run_dir) == []
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["seconds"]["images_computed"] == 10 - 5 and metrics["resumed_with"] == 5


def test_shards_cover_every_item_once_in_order() -> None:
    items = list(range(11))
    parts = [distributed.shard(items, distributed.DistContext(rank=r, world_size=3))
             for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert distributed.shard(items, distributed.SINGLE) == items


def test_each_rank_finds_its_gpu_however_the_launcher_shows_them(monkeypatch) -> None:
    """torchrun shows every GPU (rank r -> cuda:r); per-task binding shows one (-> cuda:0)."""
    ctx = distributed.DistContext(rank=3, world_size=4, local_rank=3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.local_device(torch.device("cuda"), ctx) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.local_device(torch.device("cuda"), ctx) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LostregError, match="LOCAL_RANK=3 but this process sees 2 CUDA"):
        distributed.local_device(torch.device("cuda"), ctx)
    assert distributed.local_device(torch.device("cpu"), ctx) == torch.device("cpu")


def test_a_torchrun_worker_leaves_without_interpreter_teardown(monkeypatch, capsys) -> None:
    """Under torchrun the worker ends with os._exit after flushing (a live gloo thread once
    aborted the teardown); a plain process just returns its exit status."""
    exits: list[int] = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.leave(3) == 3 and exits == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    print("last line", end="")
    distributed.leave(2)
    assert exits == [2] and capsys.readouterr().out == "last line"

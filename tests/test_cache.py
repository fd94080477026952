"""Feature cache: cached runs equal uncached ones, skip the backbone, and never use a bad shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lostreg.features.pipeline as pipeline_module
import lostreg.methods.lost as lost_module
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.features.cache import FeatureCache, is_lossless, storage_dtype
from lostreg.run import main

SPEC = BackboneSpec("tiny_cache_reg", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=2, embed_dim=64, num_heads=2))
LIMIT = 10


@pytest.fixture(autouse=True)
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


@pytest.fixture
def count_backbones(monkeypatch):
    """Count backbone constructions (the cache's point is to avoid them)."""
    calls: list[str] = []
    real = pipeline_module.create_backbone

    def counting(spec, *args, **kwargs):
        calls.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "create_backbone", counting)
    return calls


def cli(root: Path, out: str, *extra: str) -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / out),
            "--num-workers", "0", "--no-progress", "--limit", str(LIMIT), *extra]


def runs_of(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir())}


def predictions(run_dir: Path) -> bytes:
    return (run_dir / "predictions.jsonl").read_bytes()


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def shard_files(cache_root: Path) -> list[Path]:
    return sorted(cache_root.glob("*/shards/*.feats"))


def shard_header(path: Path) -> dict:
    """magic (8) | header length (8) | sha256 (32) | header | payload"""
    data = path.read_bytes()
    length = int.from_bytes(data[8:16], "little")
    return json.loads(data[48:48 + length])


def test_cached_sweep_equals_uncached_runs_without_building_the_model(tmp_path,
                                                                     count_backbones) -> None:
    sweep = ("--gram-bias=0,0.2", "--k-patches", "100,4")
    assert main(cli(tmp_path, "plain", *sweep)) == 0
    plain = runs_of(tmp_path / "plain")
    assert len(plain) == 4 and count_backbones == [SPEC.name]

    # first cached run computes and stores the features; exact, so the run id is the plain one
    cache = tmp_path / "cache"
    assert main(cli(tmp_path, "cached", "--cache-features", str(cache), "--batch-size", "3")) == 0
    (first,) = runs_of(tmp_path / "cached").values()
    assert first.name in plain and predictions(first) == predictions(plain[first.name])
    assert metrics(first)["seconds"]["backbone_images"] == LIMIT
    assert json.loads((first / "config.json").read_text())["feature_cache"]["dtype"] == "fp32"
    assert len(shard_files(cache)) >= 2 and len(count_backbones) == 2

    # the sweep over the cache: no model at all, four runs identical to the uncached ones
    first_metrics = (first / "metrics.json").read_bytes()
    assert main(cli(tmp_path, "cached", "--cache-features", str(cache), *sweep)) == 0
    assert len(count_backbones) == 2
    cached = runs_of(tmp_path / "cached")
    assert cached.keys() == plain.keys()
    for name, run_dir in cached.items():
        assert predictions(run_dir) == predictions(plain[name]), name
    assert (first / "metrics.json").read_bytes() == first_metrics  # finished before: untouched
    new = [d for n, d in cached.items() if n != first.name]
    assert all(metrics(d)["seconds"]["backbone_images"] == 0 for d in new)
    assert all(metrics(d)["seconds"]["cached_images"] == LIMIT for d in new)


def test_bad_shards_are_reported_and_recomputed(tmp_path, capsys, count_backbones) -> None:
    cache = tmp_path / "cache"
    assert main(cli(tmp_path, "a", "--cache-features", str(cache), "--batch-size", "2")) == 0
    (reference,) = runs_of(tmp_path / "a").values()
    shards = shard_files(cache)
    assert len(shards) >= 4
    truncated, flipped, foreign = shards[0], shards[1], shards[2]
    truncated.write_bytes(truncated.read_bytes()[:-7])
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    # a valid shard of another key (feature q) put where a k shard should be
    key = json.loads((shards[0].parent.parent / "key.json").read_text())
    other = FeatureCache(tmp_path / "other", {**key, "feature": "q"})
    other.write(["x"], [(14, 14)], [None], (1, 1), torch.zeros(1, 1, 192))
    other.close()
    foreign.write_bytes(shard_files(tmp_path / "other")[0].read_bytes())
    capsys.readouterr()

    assert main(cli(tmp_path, "b", "--cache-features", str(cache))) == 0
    err = capsys.readouterr().err
    assert "truncated" in err and "checksum" in err and "another cache key" in err
    (rerun,) = runs_of(tmp_path / "b").values()
    assert predictions(rerun) == predictions(reference)
    recomputed = metrics(rerun)["seconds"]["backbone_images"]
    assert 3 <= recomputed <= 6 and metrics(rerun)["seconds"]["cached_images"] == LIMIT - recomputed
    assert not truncated.exists() and not flipped.exists() and not foreign.exists()

    # the recomputed features were cached again: a third pass needs no model and warns nothing
    builds = len(count_backbones)
    assert main(cli(tmp_path, "c", "--cache-features", str(cache))) == 0
    assert len(count_backbones) == builds
    assert "warning: feature cache" not in capsys.readouterr().err
    (third,) = runs_of(tmp_path / "c").values()
    assert predictions(third) == predictions(reference)


def test_fp16_storage_of_fp32_features_gets_its_own_run_id(tmp_path, count_backbones,
                                                           monkeypatch) -> None:
    assert main(cli(tmp_path, "plain")) == 0
    cache = tmp_path / "cache"
    args = ("--cache-features", str(cache), "--cache-dtype", "fp16")
    # LOST sees the rounded features also in the pass that computes them (as later passes will)
    representable: list[bool] = []
    real_lost = lost_module._lost_many_expanded  # what the run calls, for one or many settings

    def spying_lost(feats, *rest, **kwargs):
        representable.append(torch.equal(feats, feats.half().float()))
        return real_lost(feats, *rest, **kwargs)

    monkeypatch.setattr(lost_module, "_lost_many_expanded", spying_lost)
    assert main(cli(tmp_path, "lossy", *args)) == 0
    assert representable and all(representable)
    (plain,) = runs_of(tmp_path / "plain").values()
    (lossy,) = runs_of(tmp_path / "lossy").values()
    assert lossy.name != plain.name
    assert json.loads((lossy / "config.json").read_text())["identity"]["feature_cache"] == "fp16"
    assert {shard_header(p)["dtype"] for p in shard_files(cache)} == {"float16"}
    # read back from the cache, the rounded features give the same boxes as when computed
    first = predictions(lossy)
    (lossy / "predictions.jsonl").unlink()
    builds = len(count_backbones)
    assert main(cli(tmp_path, "lossy", *args)) == 0
    assert len(count_backbones) == builds and predictions(lossy) == first


def test_bf16_runs_cache_their_own_dtype_exactly(tmp_path) -> None:
    assert storage_dtype("auto", "bf16") == "bf16" and is_lossless("bf16", "bf16")
    assert not is_lossless("fp16", "fp32") and not is_lossless("fp16", "bf16")
    assert main(cli(tmp_path, "plain", "--precision", "bf16", "--limit", "4")) == 0
    cache = tmp_path / "cache"
    assert main(cli(tmp_path, "cached", "--precision", "bf16", "--limit", "4",
                    "--cache-features", str(cache))) == 0
    (plain,) = runs_of(tmp_path / "plain").values()
    (cached,) = runs_of(tmp_path / "cached").values()
    assert plain.name == cached.name and predictions(plain) == predictions(cached)
    assert {shard_header(p)["dtype"] for p in shard_files(cache)} == {"bfloat16"}


def test_index_entries_later_win_and_changed_images_miss(tmp_path) -> None:
    key = {"format": 2, "timm_name": "arch.tag", "dataset": "d", "split": "s", "feature": "k"}
    cache = FeatureCache(tmp_path, key, writer_tag="r0")
    first = torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 6, 4)
    cache.write(["a", "b"], [(20, 30), (21, 30)], ["sha256:aa", "sha256:bb"], (2, 3), first)
    cache.write(["b"], [(21, 30)], ["sha256:bb"], (2, 3), first[1:] + 0.5)
    cache.close()
    again = FeatureCache(tmp_path, key)
    assert len(again) == 2
    entry_b = again.lookup("b", "sha256:bb")
    assert entry_b is not None and entry_b.row == 0
    shard = again.read(entry_b.shard)
    assert shard.image_ids == ["b"] and shard.grid == (2, 3) and shard.sizes == [(21, 30)]
    assert shard.fingerprints == ["sha256:bb"]
    assert torch.equal(shard.feats[0], first[1] + 0.5)
    assert again.lookup("a", "sha256:ab") is None and again.lookup("a", "sha256:aa") is not None
    assert again.lookup("a", None) is None  # an unreadable image never matches
    assert again.lookup("missing", "sha256:aa") is None


def test_cached_resume_with_gaps_reads_the_right_rows(tmp_path, count_backbones) -> None:
    """A resumed cached run needs every other row of a shard (a copy, not a slice): each
    image must still get its own features."""
    cache = tmp_path / "cache"
    assert main(cli(tmp_path, "plain", "--k-patches", "7")) == 0
    (plain,) = runs_of(tmp_path / "plain").values()
    assert main(cli(tmp_path, "cached", "--cache-features", str(cache), "--batch-size", "8")) == 0
    assert main(cli(tmp_path, "cached", "--cache-features", str(cache), "--k-patches", "7",
                    "--batch-size", "8")) == 0
    run_dir = runs_of(tmp_path / "cached")[plain.name]
    full = predictions(run_dir)
    assert full == predictions(plain)
    lines = full.splitlines(keepends=True)
    (run_dir / "predictions.jsonl").write_bytes(b"".join(lines[::2]))  # odd rows lost
    (run_dir / "metrics.json").unlink()
    count_backbones.clear()
    assert main(cli(tmp_path, "cached", "--cache-features", str(cache), "--k-patches", "7",
                    "--batch-size", "8")) == 0
    assert count_backbones == [] and metrics(run_dir)["seconds"]["cached_images"] == LIMIT // 2
    assert predictions(run_dir) == full

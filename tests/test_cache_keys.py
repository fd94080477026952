"""What the feature cache key holds and how it is written (issue 20, rows 2 and 4 follow-ups).

* Features cached by code of another result version (``lostreg.version.RESULT_VERSION``) are
  never read: the version is part of the key.
* A model kwarg JSON cannot hold (NaN, infinity) enters the key as its ``repr``: the strict
  ``key.json`` write once raised a traceback on it.
* A shard header is written strictly: a non-finite value in it is refused at write time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lostreg.features.pipeline as pipeline_module
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.features.cache import (
    FORMAT_VERSION,
    BackgroundWriter,
    FeatureCache,
    cache_key,
    key_hash,
)
from lostreg.run import main
from lostreg.runs import state
from lostreg.version import RESULT_VERSION

LIMIT = 4
KEY = {"format": FORMAT_VERSION, "timm_name": "arch.tag", "dataset": "d", "split": "s",
       "feature": "k"}

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_spec(name: str, **kwargs: object) -> BackboneSpec:
    return BackboneSpec(name, "vit_small_patch16_224.dino", "dino", 16, 0, pos_embed="dino",
                        model_kwargs=dict(depth=2, embed_dim=48, num_heads=3, **kwargs))


@pytest.fixture
def tiny() -> str:
    spec = tiny_spec("tiny_cache_keys")
    BACKBONES[spec.name] = spec
    yield spec.name
    BACKBONES.pop(spec.name, None)


def run(root: Path, out: str, model: str) -> dict:
    """One run over the first ``LIMIT`` demo scenes with the cache at ``root/cache``: its
    ``metrics.json`` seconds (``backbone_images``, ``cached_images``)."""
    argv = ["--model", model, "--weights", "random", "--dataset", "demo", "--data-root",
            str(root / "data"), "--runs", str(root / out), "--cache-features",
            str(root / "cache"), "--num-workers", "0", "--no-progress", "--device", "cpu",
            "--limit", str(LIMIT)]
    assert main(argv) == 0
    (folder,) = [path for path in (root / out).iterdir() if path.is_dir()]
    return json.loads((folder / "metrics.json").read_text())["seconds"]


def cache_key_versions(root: Path) -> list[int]:
    return sorted(json.loads(path.read_text())["result_version"]
                  for path in (root / "cache").glob("*/key.json"))


def as_result_version(monkeypatch, version: int) -> None:
    """This process as code of result ``version`` (the cache key's and the run folder's)."""
    monkeypatch.setattr(pipeline_module, "RESULT_VERSION", version)
    monkeypatch.setattr(state, "RESULT_VERSION", version)


# --- the result version is part of the key ------------------------------------------------


def test_features_of_another_result_version_are_never_read(tmp_path, tiny, monkeypatch,
                                                           model_builds) -> None:
    first = run(tmp_path, "first", tiny)
    assert (first["backbone_images"], first["cached_images"]) == (LIMIT, 0)
    assert cache_key_versions(tmp_path) == [RESULT_VERSION]

    as_result_version(monkeypatch, RESULT_VERSION + 1)
    newer = run(tmp_path, "newer", tiny)
    assert (newer["backbone_images"], newer["cached_images"]) == (LIMIT, 0)  # recomputed
    assert cache_key_versions(tmp_path) == [RESULT_VERSION, RESULT_VERSION + 1]  # own folder

    as_result_version(monkeypatch, RESULT_VERSION)
    del model_builds[:]
    again = run(tmp_path, "again", tiny)
    assert (again["backbone_images"], again["cached_images"]) == (0, LIMIT)  # read again
    assert model_builds == []  # served by the first folder: no model was even built


def test_the_key_names_the_result_version_it_was_given() -> None:
    fields = dict(model="m", timm_name="t", model_kwargs={}, weights="random",
                  num_prefix_tokens=1, mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=16,
                  pos_embed="timm", dataset="d", split="s", feature="k", precision="fp32",
                  storage="fp32", lostreg_version="0")
    now, later = (cache_key(**fields, result_version=v) for v in (2, 3))
    assert (now["result_version"], later["result_version"]) == (2, 3)
    assert key_hash(now) != key_hash(later)


# --- a model kwarg JSON cannot hold -----------------------------------------------------------


def test_non_finite_model_kwargs_enter_the_key_as_their_repr(tmp_path) -> None:
    kwargs = {"a": float("nan"), "b": float("inf"), "c": [-math.inf, 1.5], "d": torch.float16}
    key = cache_key(model="m", timm_name="t", model_kwargs=kwargs, weights="random",
                    num_prefix_tokens=1, mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=16,
                    pos_embed="timm", dataset="d", split="s", feature="k", precision="fp32",
                    storage="fp32", lostreg_version="0", result_version=RESULT_VERSION)
    assert key["model_kwargs"] == {"a": "nan", "b": "inf", "c": ["-inf", 1.5],
                                   "d": "torch.float16"}
    cache = FeatureCache(tmp_path, key)
    assert cache.write(["img"], [(32, 32)], ["sha256:00"], (2, 2), torch.ones(1, 4, 2))
    cache.close()
    again = FeatureCache(tmp_path, dict(key))  # key.json reads back equal: not stale
    assert again.hash == cache.hash and again.read(again.lookup("img", "sha256:00").shard)


def test_a_nan_model_kwarg_is_cached_and_read_back(tmp_path, monkeypatch, capsys) -> None:
    """It used to fail the strict key.json write: a warning on the first run (nothing cached)
    and a traceback on a run that found a damaged key.json to rewrite."""
    spec = tiny_spec("tiny_cache_nan", drop_path_rate=float("nan"))
    monkeypatch.setitem(BACKBONES, spec.name, spec)
    run(tmp_path, "first", spec.name)
    (key_file,) = (tmp_path / "cache").glob("*/key.json")
    assert json.loads(key_file.read_text())["model_kwargs"]["drop_path_rate"] == "nan"
    key_file.write_text("{damaged")  # rewritten, strictly, by the next run
    again = run(tmp_path, "again", spec.name)
    assert (again["backbone_images"], again["cached_images"]) == (0, LIMIT)
    err = capsys.readouterr().err
    assert "cannot write" not in err and "Traceback" not in err
    assert "does not match its folder; rewriting it" in err


def test_a_key_holding_nan_is_refused_with_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^feature cache key: mean\[1\] is not finite") as bad:
        FeatureCache(tmp_path, {**KEY, "mean": [0.5, float("nan"), 0.5]})
    assert "\n" not in str(bad.value)
    assert not any(tmp_path.iterdir())


# --- the shard header is written strictly -----------------------------------------------------


def test_a_non_finite_header_value_is_refused_at_write_time(tmp_path) -> None:
    cache = FeatureCache(tmp_path, KEY)
    with pytest.raises(ValueError, match=r"shards/[0-9]{20}-[0-9a-f]{12}\.feats: "
                                         r"entries\[0\]\.size\[0\] is not finite") as bad:
        cache.write(["img"], [(float("nan"), 32)], ["sha256:00"], (2, 2), torch.ones(1, 4, 2))
    cache.close()
    assert "\n" not in str(bad.value)
    assert not list(cache.shard_dir.glob("*")) and not list(cache.index_dir.glob("*"))
    assert cache.lookup("img", "sha256:00") is None and len(FeatureCache(tmp_path, KEY)) == 0


def test_a_run_writing_a_non_finite_header_warns_one_line(tmp_path, capsys) -> None:
    """In a run, shards are written in the background: the refusal is one warning, the run
    goes on (a cache never fails a run), and the cache holds nothing it would refuse later."""
    cache = FeatureCache(tmp_path, KEY)
    with BackgroundWriter() as writer:
        writer.submit(cache, ["img"], [(32, math.inf)], ["sha256:00"], (2, 2),
                      torch.ones(1, 4, 2))
    cache.close()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: feature cache ") and "cannot write (ValueError: " in line
    assert "entries[0].size[1] is not finite" in line
    assert writer.failures == 1 and len(FeatureCache(tmp_path, KEY)) == 0


@pytest.mark.parametrize("kwargs", [{"grid": {(1, 2): 3}}, {"mixed": {1: "a", "b": 2}}])
def test_kwargs_json_cannot_hold_are_one_line(kwargs: dict) -> None:
    from lostreg.errors import LostregError

    with pytest.raises(LostregError, match="cannot enter the feature cache key"):
        cache_key(model="m", timm_name="t", model_kwargs=kwargs, weights="random",
                  num_prefix_tokens=1, mean=(0.5,), std=(0.5,), patch_size=14,
                  pos_embed="timm", dataset="voc07", split="trainval", feature="k",
                  precision="fp32", storage="fp32", lostreg_version="0", result_version=2)

"""Run ids, readable folder names and the axes every run can take (method, layer, normalize)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import lostreg
from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone
from lostreg.datasets import load_dataset
from lostreg.datasets.base import load_rgb
from lostreg.features.extract import FeatureRequest, extract, preprocess
from lostreg.features.pipeline import describe_backbone
from lostreg.io import read_jsonl
from lostreg.methods.lost import lost_reference
from lostreg.run import expand_sweep, main
from lostreg.runs.config import RunConfig
from lostreg.runs.folder import describe_run, make_run_id
from lostreg.runs.legacy import legacy_run_id

SPEC = BackboneSpec("tiny_axes", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=3, embed_dim=48, num_heads=3))
LIMIT = 6


@pytest.fixture(autouse=True)
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


def cli(root: Path, *extra: str) -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / "runs"),
            "--num-workers", "0", "--no-progress", "--limit", str(LIMIT), *extra]


def runs(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((root / "runs").iterdir())}


def test_lost_run_identity_is_the_one_earlier_releases_hashed(tmp_path) -> None:
    """The identity of a default LOST run holds exactly the keys it had before the method
    registry, so old run folders keep their hash (and stay resumable and on the board)."""
    index = load_dataset("demo", tmp_path / "data")
    info = describe_backbone(SPEC, "random")
    config = RunConfig(model=SPEC.name, dataset="demo", weights="random", limit=3,
                       output=tmp_path / "runs", k_patches=7, gram_bias=-0.5)
    run = describe_run(config, info, index)
    before = {"lostreg_version": lostreg.__version__, "model": SPEC.name,
              "timm_name": SPEC.timm_name, "pos_embed": "dinov2_reg", "weights": "random",
              "dataset": "demo", "split": index.split, "no_hard": False, "limit": 3,
              "feature": "k", "k_patches": 7, "gram_bias": -0.5, "precision": "fp32"}
    assert run.identity == before
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:10]
    assert legacy_run_id(before, True) == f"smoke-demo-tiny_axes-k-{digest}"
    assert run.run_id == f"smoke-demo-tiny_axes-lost-keys-k7-bias-0.5-{digest}"


def test_a_legacy_folder_is_found_and_reused_under_its_old_name(tmp_path, capsys) -> None:
    assert main(cli(tmp_path)) == 0
    (new_dir,) = runs(tmp_path).values()
    config = json.loads((new_dir / "config.json").read_text())
    old_name = legacy_run_id(config["identity"], smoke=True)
    new_dir.rename(tmp_path / "runs" / old_name)
    capsys.readouterr()
    assert main(cli(tmp_path)) == 0
    assert list(runs(tmp_path)) == [old_name]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"| already finished: {tmp_path / 'runs' / old_name}" in last


def test_resumed_run_says_how_much_was_done(tmp_path, capsys) -> None:
    assert main(cli(tmp_path)) == 0
    (run_dir,) = runs(tmp_path).values()
    lines = (run_dir / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "predictions.jsonl").write_text("".join(lines[:2]))
    (run_dir / "metrics.json").unlink()
    capsys.readouterr()
    assert main(cli(tmp_path)) == 0
    assert f"| resumed (2 of {LIMIT} were done): {run_dir}" in capsys.readouterr().out


def test_layers_and_normalisations_share_one_pass_and_match_a_plain_computation(
        tmp_path, model_builds) -> None:
    """--layer -1,0 --normalize none,l2: four runs, one model build, each box equal to LOST on
    features computed directly (layer 0 from a hook on block 0, l2 by hand)."""
    built = model_builds
    assert main(cli(tmp_path, "--layer=-1,0", "--normalize", "none,l2",
                    "--gram-bias=0,-0.2")) == 0
    assert built == [SPEC.name]
    found = runs(tmp_path)
    assert len(found) == 8
    backbone = create_backbone(SPEC, "random")
    index = load_dataset("demo", tmp_path / "data")
    for run_dir in found.values():
        config = json.loads((run_dir / "config.json").read_text())
        layer, normalize, bias = config["layer"], config["normalize"], config["gram_bias"]
        assert ("@L0" in run_dir.name) == (layer == 0) and ("-l2-" in run_dir.name) == (
            normalize == "l2")
        for record, line in zip(index.records[:LIMIT], read_jsonl(run_dir / "predictions.jsonl"),
                                strict=True):
            tensor, size = preprocess(load_rgb(record.path), backbone.mean, backbone.std, 14)
            feats = extract(backbone, tensor[None], [FeatureRequest("k", layer)])
            feats = feats[FeatureRequest("k", layer)][0]
            if normalize == "l2":
                feats = feats / feats.norm(dim=-1, keepdim=True)
            grid = (tensor.shape[1] // 14, tensor.shape[2] // 14)
            assert line["box"] == lost_reference(feats, grid, 14, size, 100, bias).box


def test_default_layer_and_normalisation_keep_the_run_id(tmp_path) -> None:
    assert main(cli(tmp_path)) == 0
    assert main(cli(tmp_path, "--layer=-1", "--normalize", "none")) == 0
    assert len(runs(tmp_path)) == 1


def test_sweep_order_is_normalisation_then_bias() -> None:
    base = RunConfig(model=SPEC.name, dataset="demo", weights="random")
    sweep = expand_sweep(base, normalizations=["none", "l2"], values={"gram_bias": [0.0, -0.5]})
    assert [(c.normalize, c.gram_bias) for c in sweep] == [
        ("none", 0.0), ("none", -0.5), ("l2", 0.0), ("l2", -0.5)]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--layer", "7"], "--layer 7: the model has 3 blocks"),
    (["--normalize", "l3"], "expected one of none, l2"),
    (["--features", "x"], "expected one of q, k, v"),
    (["--method", "lots"], "'lots' is not a valid value"),
])
def test_bad_axis_values_are_one_line(tmp_path, capsys, extra, needle) -> None:
    assert main(cli(tmp_path, *extra)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning")]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_readable_names_distinguish_every_setting() -> None:
    common = {"dataset": "voc07", "model": "dinov2_vitl14", "feature": "k"}
    names = {
        make_run_id({**common, "k_patches": 100, "gram_bias": 0.0}, False),
        make_run_id({**common, "k_patches": 50, "gram_bias": 0.0}, False),
        make_run_id({**common, "k_patches": 100, "gram_bias": 0.1}, False),
        make_run_id({**common, "k_patches": 100, "gram_bias": 0.0, "layer": -2}, False),
        make_run_id({**common, "feature": "v", "k_patches": 100, "gram_bias": 0.0}, False),
    }
    assert len({name.rsplit("-", 1)[0] for name in names}) == 5

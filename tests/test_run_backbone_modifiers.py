"""``--pos-interp`` and ``+ttr`` through ``lostreg.run``: their own run ids and cache keys,
default runs unchanged, boxes equal to a model built directly with the modifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone, get_backbone_spec
from lostreg.datasets import load_dataset
from lostreg.datasets.base import load_rgb
from lostreg.features.extract import FeatureRequest, extract, preprocess
from lostreg.io import read_jsonl
from lostreg.methods.lost import lost_reference
from lostreg.run import main

DINO = BackboneSpec("tiny_pos_dino", "vit_small_patch16_224.dino", "dino", 16, 0,
                    pos_embed="dino", model_kwargs=dict(depth=3, embed_dim=48, num_heads=3))
LIMIT = 4


@pytest.fixture(autouse=True)
def tiny_model():
    BACKBONES[DINO.name] = DINO
    yield
    BACKBONES.pop(DINO.name, None)


def cli(root: Path, model: str, *extra: str) -> list[str]:
    return ["--model", model, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / "runs"),
            "--num-workers", "0", "--no-progress", "--limit", str(LIMIT), *extra]


def configs(root: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "config.json").read_text())
            for p in (root / "runs").iterdir()}


def boxes_of(backbone, index) -> list[list[int]]:
    out = []
    for record in index.records[:LIMIT]:
        tensor, size = preprocess(load_rgb(record.path), backbone.mean, backbone.std, 16)
        feats = extract(backbone, tensor[None], [FeatureRequest("k")])[FeatureRequest("k")][0]
        grid = (tensor.shape[1] // 16, tensor.shape[2] // 16)
        out.append(lost_reference(feats, grid, 16, size).box)
    return out


def test_pos_interp_is_an_axis_with_its_own_run_and_the_default_keeps_its_id(tmp_path,
                                                                            model_builds) -> None:
    assert main(cli(tmp_path, DINO.name)) == 0
    (default_id,) = configs(tmp_path)
    assert main(cli(tmp_path, DINO.name, "--pos-interp", "original,timm")) == 0
    found = configs(tmp_path)
    assert len(found) == 2 and default_id in found  # original is the run made before
    (timm_id,) = set(found) - {default_id}
    assert found[timm_id]["identity"]["pos_interp"] == "timm" and "-postimm-" in timm_id
    assert found[timm_id]["pos_embed_interpolation"] == "timm"
    assert found[default_id]["pos_embed_interpolation"] == "dino"
    assert model_builds == [DINO.name, DINO.name]  # the default run was reused: one new build
    index = load_dataset("demo", tmp_path / "data")
    for run_id, pos_interp in ((default_id, "original"), (timm_id, "timm")):
        backbone = create_backbone(DINO, "random", pos_interp=pos_interp)
        lines = list(read_jsonl(tmp_path / "runs" / run_id / "predictions.jsonl"))
        assert [line["box"] for line in lines] == boxes_of(backbone, index)


def test_a_ttr_model_records_its_neurons_and_another_list_is_another_run(tmp_path) -> None:
    neurons = {"kind": "lostreg-register-neurons", "format": 1, "write": "signed_max",
               "neurons": {"1": [3, 7]}}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(neurons))
    second.write_text(json.dumps({**neurons, "neurons": {"1": [5]}}))
    cache = ("--cache-features", str(tmp_path / "cache"))
    assert main(cli(tmp_path, f"{DINO.name}+ttr", "--ttr-neurons", str(first), *cache)) == 0
    assert main(cli(tmp_path, f"{DINO.name}+ttr", "--ttr-neurons", str(second), *cache)) == 0
    assert main(cli(tmp_path, DINO.name, *cache)) == 0
    found = list(configs(tmp_path).values())
    assert len(found) == 3
    shas = {c["identity"].get("ttr_neurons_sha256") for c in found}
    assert len(shas) == 3 and None in shas  # two lists, and the plain model without one
    assert sorted(c["test_time_registers"] for c in found) == [0, 1, 1]
    assert len(list((tmp_path / "cache").iterdir())) == 3  # never one cache for two models
    spec = get_backbone_spec(f"{DINO.name}+ttr", ttr_neurons=first)
    index = load_dataset("demo", tmp_path / "data")
    wanted = spec.identity_extras()["ttr_neurons_sha256"]
    (run_id,) = [name for name, c in configs(tmp_path).items()
                 if c["identity"].get("ttr_neurons_sha256") == wanted]
    lines = list(read_jsonl(tmp_path / "runs" / run_id / "predictions.jsonl"))
    assert [line["box"] for line in lines] == boxes_of(create_backbone(spec, "random"), index)


def test_a_ttr_model_without_a_neuron_list_is_one_line(tmp_path, capsys) -> None:
    assert main(cli(tmp_path, f"{DINO.name}+ttr")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "register-neurons" in err[0]

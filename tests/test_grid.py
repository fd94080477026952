"""Several runs in one command: models x datasets x LOST settings, each model and index once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import lostreg.features.pipeline as pipeline_module
import lostreg.runs.grid as grid_module
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.run import RunConfig, main, paper_suite, run_benchmark

KW = dict(depth=2, embed_dim=64, num_heads=2)
SPECS = (
    BackboneSpec("tiny_grid", "vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0,
                 pos_embed="dinov2", model_kwargs=KW),
    BackboneSpec("tiny_grid_reg", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                 pos_embed="dinov2_reg", model_kwargs=KW),
)
MODELS = [s.name for s in SPECS]
LIMIT = 5


@pytest.fixture
def counted(monkeypatch):
    """Register the tiny models; count model builds and dataset loads. ``voc12`` is served by
    the demo scenes renamed, so a second dataset needs no download."""
    for spec in SPECS:
        BACKBONES[spec.name] = spec
    calls: dict[str, list[str]] = {"models": [], "datasets": []}
    real_create, real_load = pipeline_module.create_backbone, grid_module.load_dataset

    def create(spec, *args, **kwargs):
        calls["models"].append(spec.name)
        return real_create(spec, *args, **kwargs)

    def load(name, data_root, **kwargs):
        calls["datasets"].append(name)
        index = real_load("demo", data_root, **kwargs)
        return dataclasses.replace(index, name=name) if name != "demo" else index

    monkeypatch.setattr(pipeline_module, "create_backbone", create)
    monkeypatch.setattr(grid_module, "load_dataset", load)
    yield calls
    for spec in SPECS:
        BACKBONES.pop(spec.name, None)


def cli(root: Path, *extra: str) -> list[str]:
    return ["--weights", "random", "--data-root", str(root / "data"), "--output",
            str(root / "runs"), "--num-workers", "0", "--no-progress", "--limit", str(LIMIT),
            "--allow-partial-dataset",
            *extra]


def test_grid_builds_each_model_and_indexes_each_dataset_once(tmp_path, counted, capsys) -> None:
    assert main(cli(tmp_path, "--model", ",".join(MODELS), "--dataset", "demo,voc12",
                    "--gram-bias=0,-0.2")) == 0
    assert counted["models"] == MODELS
    assert sorted(counted["datasets"]) == ["demo", "voc12"]
    lines = capsys.readouterr().out.splitlines()
    corloc_lines = [line for line in lines if line.startswith("CorLoc")]
    assert len(corloc_lines) == 8
    assert sum("gram_bias=-0.2" in line for line in corloc_lines) == 4
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 8 and all((r / "metrics.json").exists() for r in runs)

    # every run of the grid is the run one plain command gives
    for run_dir in runs:
        config = json.loads((run_dir / "config.json").read_text())
        single = run_benchmark(RunConfig(
            model=config["model"], dataset=config["dataset"], data_root=tmp_path / "data",
            weights="random", gram_bias=config["gram_bias"], limit=LIMIT,
            output=tmp_path / "single", num_workers=0, progress=False,
            allow_partial_dataset=True))
        assert single.run_id == run_dir.name
        assert (single.run_dir / "predictions.jsonl").read_bytes() == \
            (run_dir / "predictions.jsonl").read_bytes()


def test_suite_runs_the_list_and_rebuilds_the_leaderboard(tmp_path, counted, monkeypatch,
                                                         capsys) -> None:
    from lostreg.reports import leaderboard
    from lostreg.runs import suites

    built: list[dict] = []
    monkeypatch.setitem(suites.SUITES, "paper", dataclasses.replace(
        suites.SUITES["paper"], pairs=((MODELS[0], "demo"), (MODELS[1], "demo"),
                                       (MODELS[0], "voc12"))))
    monkeypatch.setattr(leaderboard, "build_leaderboard", lambda **kw: built.append(kw))
    assert main(cli(tmp_path, "--suite", "paper")) == 0
    assert counted["models"] == MODELS and sorted(counted["datasets"]) == ["demo", "voc12"]
    names = sorted("-".join(p.name.split("-")[1:3]) for p in (tmp_path / "runs").iterdir())
    assert names == [f"demo-{MODELS[0]}", f"demo-{MODELS[1]}", f"voc12-{MODELS[0]}"]
    assert built == [{"runs_dir": tmp_path / "runs", "out_dir": tmp_path}]
    assert "leaderboard rebuilt" in capsys.readouterr().out


def test_paper_suite_is_the_paper_list(monkeypatch) -> None:
    from lostreg.reports import leaderboard

    expected = {(m, d) for m in ("dino_vits16", "dinov2_vitl14", "dinov2_vitl14_reg4",
                                 "deit3_vitb16", "openclip_vitb16")
                for d in ("voc07", "voc12", "coco20k")}
    assert set(paper_suite()) == expected and len(paper_suite()) == 15
    assert paper_suite() == [tuple(pair) for pair in leaderboard.PAPER_SUITE]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--suite", "paper", "--model", "tiny_grid"], "drop --model"),
    (["--model", "tiny_grid", "--k-patches", "5,x"], "--k-patches '5,x'"),
    (["--model", "tiny_grid", "--k-patches", "1.5"], "--k-patches '1.5'"),  # the first value
    (["--model", "tiny_grid", "--gram-bias=abc,0"], "--gram-bias 'abc,0'"),
    (["--model", "tiny_grid", "--features", "k,w"], "'w' is not a valid value"),
    (["--model", "tiny_grid,nope_model", "--dataset", "demo"], "unknown model 'nope_model'"),
    (["--model", "tiny_grid", "--dataset", "demo,voc13"], "unknown dataset 'voc13'"),
])
def test_bad_lists_fail_before_any_work(tmp_path, counted, capsys, extra, needle) -> None:
    assert main(cli(tmp_path, *extra)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0]
    assert counted["models"] == [] and not (tmp_path / "runs").exists()


def test_methods_suite_runs_every_method_and_both_dinoseg_variants(tmp_path, counted,
                                                                   monkeypatch) -> None:
    from lostreg.runs import suites

    monkeypatch.setitem(suites.SUITES, "methods", dataclasses.replace(
        suites.SUITES["methods"], pairs=((MODELS[0], "demo"),)))
    from lostreg.reports import leaderboard
    monkeypatch.setattr(leaderboard, "build_leaderboard", lambda **kw: None)
    assert main(cli(tmp_path, "--suite", "methods", "--dinoseg-head", "0")) == 0  # 2 heads
    assert counted["models"] == [MODELS[0]]  # one pass serves every method
    found = set()
    for run_dir in (tmp_path / "runs").iterdir():
        config = json.loads((run_dir / "config.json").read_text())
        found.add((config["method"], config["method_params"].get("dinoseg_variant")))
    assert found == {("lost", None), ("tokencut", None), ("dinoseg", "reference"),
                     ("dinoseg", "corrected")}
    # a flag narrows the suite's own choice
    assert main(cli(tmp_path, "--suite", "methods", "--dinoseg-head", "0",
                    "--dinoseg-variant", "corrected",
                    "--output", str(tmp_path / "narrow"))) == 0
    variants = {json.loads((d / "config.json").read_text())["method_params"].get("dinoseg_variant")
                for d in (tmp_path / "narrow").iterdir()}
    assert variants == {None, "corrected"}

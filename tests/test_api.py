"""``lostreg.evaluate``: the CLI's pipeline from Python, every flag a keyword, scratch runs kept
off the leaderboard, and a user's module left as it was found."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import lostreg
from lostreg.api import evaluate, plan
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets import load_dataset
from lostreg.errors import LostregError
from lostreg.methods import METHODS
from lostreg.reports.leaderboard import build_leaderboard
from lostreg.run import _grid_of, build_parser, config_from_args, main
from lostreg.runs.grid import expand_sweep
from lostreg.runs.store import scan_runs

KW = dict(depth=2, embed_dim=48, num_heads=6)
SPEC = BackboneSpec("tiny_api_reg4", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=KW)
LIMIT = 6
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_spec(one_thread):
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False,
                             dynamic_img_size=True, **KW)


def test_the_api_writes_the_files_the_cli_writes(tmp_path) -> None:
    args = ["--model", SPEC.name, "--weights", "random", "--dataset", "demo", "--data-root",
            str(tmp_path / "data"), "--limit", str(LIMIT), "--num-workers", "0", "--no-progress",
            "--method", "lost,tokencut", "--gram-bias=0,-0.1"]
    assert main([*args, "--output", str(tmp_path / "cli")]) == 0
    result = evaluate(SPEC.name, weights="random", dataset="demo", data_root=tmp_path / "data",
                      limit=LIMIT, num_workers=0, no_progress=True, methods=["lost", "tokencut"],
                      gram_bias=[0, -0.1], output=tmp_path / "api")
    cli_dirs = sorted((tmp_path / "cli").iterdir())
    assert sorted(d.name for d in result.run_dirs) == [d.name for d in cli_dirs]
    assert len(cli_dirs) == 3
    frame = result.metrics.set_index("run_id")
    for cli_dir in cli_dirs:
        api_dir = tmp_path / "api" / cli_dir.name
        assert (api_dir / "predictions.jsonl").read_bytes() == \
            (cli_dir / "predictions.jsonl").read_bytes()
        cli_config = json.loads((cli_dir / "config.json").read_text())
        api_config = json.loads((api_dir / "config.json").read_text())
        for key in ("identity", "model", "weights", "method", "method_params", "feature"):
            assert api_config[key] == cli_config[key], key
        settings = {k: v for k, v in cli_config["settings"].items() if k != "output"}
        assert {k: v for k, v in api_config["settings"].items() if k != "output"} == settings
        metrics = json.loads((cli_dir / "metrics.json").read_text())
        row = frame.loc[cli_dir.name]
        assert (row["n_hits"], row["n_images"]) == (metrics["n_hits"], metrics["n_images"])
        assert round(row["corloc"], 4) == metrics["corloc"] and bool(row["smoke"])
    assert "CorLoc" in str(result) and result.run_dirs[0].parent == tmp_path / "api"


def cli_dests() -> dict[str, object]:
    """Every lostreg.run option (argparse dest) with its default."""
    return {action.dest: action.default for action in build_parser()._actions
            if action.dest != "help"}


def test_every_cli_flag_is_a_keyword_with_the_same_default() -> None:
    keywords = inspect.signature(evaluate).parameters
    params = {p.name for spec in METHODS.values() for p in spec.params}
    for dest, default in cli_dests().items():
        if dest.startswith("param_"):
            assert dest[len("param_"):] in params  # taken as **method_values
            continue
        name = "backbone" if dest == "model" else dest
        assert name in keywords, dest
        if default is not None and not isinstance(default, Path):
            assert keywords[name].default == default, dest
        elif isinstance(default, Path):
            assert Path(keywords[name].default) == default, dest


@pytest.mark.parametrize("argv, keywords", [
    ([], {}),
    (["--model", "a,b", "--dataset", "demo,voc12", "--method", "lost,tokencut",
      "--gram-bias=0,-0.1", "--k-patches", "50", "--tau", "0.3,0.4", "--layer", "-1,-2",
      "--normalize", "none,l2", "--features", "k,v", "--limit", "5", "--no-hard",
      "--precision", "bf16", "--pos-interp", "original,timm", "--no-binary-graph"],
     dict(backbone=["a", "b"], dataset="demo,voc12", method=("lost", "tokencut"),
          gram_bias=[0.0, -0.1], k_patches=50, tau=[0.3, 0.4], layer=[-1, -2],
          normalize=["none", "l2"], features="k,v", limit=5, no_hard=True, precision="bf16",
          pos_interp=["original", "timm"], binary_graph=False)),
    (["--method", "dinoseg", "--dinoseg-variant", "corrected", "--no-download", "--wait",
      "--cache-features", "--batch-size", "3"],
     dict(methods=["dinoseg"], dinoseg_variant="corrected", no_download=True, wait=True,
          cache_features=True, batch_size=3)),
    (["--suite", "methods", "--tau", "0.25"], dict(suite="methods", tau=0.25)),
])
def test_the_api_plans_the_runs_the_cli_plans(argv, keywords) -> None:
    args = build_parser().parse_args(argv)
    cli_base, cli_grid = config_from_args(args), _grid_of(args)
    backbone = keywords.pop("backbone", None)
    api_base, api_grid = plan(backbone, **keywords)
    cli_base = dataclasses.replace(cli_base, data_root=None)  # the CLI resolves it early
    assert api_base == cli_base

    def sweep(base, grid) -> list:
        values = dict(grid["method_values"])
        for key, name in (("k_patches", "k_patches"), ("gram_biases", "gram_bias")):
            if grid[key] is not None:
                values[name] = grid[key]
        return expand_sweep(base, methods=grid["methods"], features=grid["features"],
                            layers=grid["layers"], normalizations=grid["normalizations"],
                            values=values)

    assert sweep(api_base, api_grid) == sweep(cli_base, cli_grid)
    for key in ("models", "datasets", "pos_interps", "pairs"):
        assert api_grid.get(key) == cli_grid.get(key), key


def test_unknown_or_misplaced_keywords_are_one_line() -> None:
    with pytest.raises(LostregError, match="unknown keyword 'gram_bais'; did you mean gram_bias"):
        evaluate("dino_vits16", gram_bais=0.1)
    with pytest.raises(LostregError, match="patch_size= is for your own model"):
        evaluate("dino_vits16", patch_size=16)
    with pytest.raises(LostregError, match="pos_interp: your own model runs as its own code"):
        evaluate(tiny_vit(), pos_interp="timm")
    with pytest.raises(LostregError, match="is a named backbone's"):
        evaluate(tiny_vit(), name="dino_vits16")


def test_scratch_runs_stay_off_the_leaderboard_and_real_ones_get_a_row(tmp_path) -> None:
    """A module with its own (non-random) weights gets a leaderboard row; the same module
    scored with scratch=True (a look during training) gets a scratch- folder that
    scan_runs and the leaderboard never read."""
    kw = dict(dataset="demo", data_root=tmp_path / "data", limit=LIMIT, num_workers=0,
              no_progress=True, output=tmp_path / "runs")
    model = tiny_vit()
    real = evaluate(model, name="my_vit", **kw)
    scratch = evaluate(model, name="my_vit", scratch=True, **kw)
    (scratch_dir,) = scratch.run_dirs
    assert scratch_dir.name.startswith("scratch-demo-my_vit-lost-keys-")
    assert scratch_dir != real.run_dirs[0] and not real.run_dirs[0].name.startswith("scratch")
    assert json.loads((scratch_dir / "config.json").read_text())["scratch_run"] is True
    assert json.loads((scratch_dir / "metrics.json").read_text())["scratch_run"] is True
    assert "scratch_run" not in json.loads((real.run_dirs[0] / "metrics.json").read_text())
    assert bool(scratch.metrics.loc[0, "scratch"]) and not bool(real.metrics.loc[0, "scratch"])
    assert (predictions := (scratch_dir / "predictions.jsonl").read_bytes()) == \
        (real.run_dirs[0] / "predictions.jsonl").read_bytes() and predictions
    scan = scan_runs(tmp_path / "runs", include_smoke=True)
    assert [run.run_dir for run in scan.runs] == real.run_dirs and scan.scratch_excluded == 1
    table = build_leaderboard(tmp_path / "runs", tmp_path / "board", include_smoke=True)
    assert list(table["run_id"]) == [real.runs[0].run_id]
    assert list(table["model"]) == ["my_vit"]


def test_a_training_loop_call_leaves_the_model_as_it_found_it(tmp_path) -> None:
    """Every N steps: the first N images in dataset order, the module not moved, its
    train/eval flags, the TF32 switches and the random state restored."""
    model = tiny_vit().train()
    model.blocks[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.backends.cuda.matmul.allow_tf32 = True
    rng = torch.random.get_rng_state()
    try:
        result = evaluate(model, dataset="demo", data_root=tmp_path / "data", limit=4,
                          num_workers=0, no_progress=True, output=tmp_path / "runs",
                          scratch=True)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lines = (result.run_dirs[0] / "predictions.jsonl").read_text().splitlines()
    first = [r.image_id for r in load_dataset("demo", tmp_path / "data").records[:4]]
    assert [json.loads(line)["image_id"] for line in lines] == first


def test_importing_lostreg_stays_cheap_and_evaluate_is_one_import() -> None:
    code = ("import sys, lostreg; heavy = [m for m in ('torch', 'timm', 'scipy', 'pandas', "
            "'matplotlib', 'lostreg.api') if m in sys.modules]; print(heavy); "
            "from lostreg import evaluate, UserModel, PatchFeatures; print(evaluate.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "lostreg.api"
    assert lostreg.evaluate is evaluate
    with pytest.raises(AttributeError):
        lostreg.no_such_thing  # noqa: B018

"""``python -m lostreg.protocol`` end to end on a tiny random model and generated data: one
forward per batch for the whole grid, every point a run folder, the study's files, figures
that read well, published figures placed, cross-dataset selection, bad input, the notebook."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from figure_checks import assert_texts_fit, figure_says

import lostreg.features.pipeline as pipeline_module
from lostreg import cli
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets.demo import generate_demo
from lostreg.features.extract import FeatureRequest
from lostreg.io import read_jsonl
from lostreg.reports import leaderboard
from lostreg.reports.leaderboard.published import PUBLISHED_COLUMNS
from lostreg.reports.protocol import ProtocolGrid, read_protocol_csv
from lostreg.reports.protocol.cli import main
from lostreg.reports.protocol.markdown import protocol_markdown
from lostreg.reports.protocol.study import (
    HeldOut,
    StudyKey,
    build_study,
    draw_figures,
    study_figures,
    within_ci,
)

SPEC = BackboneSpec("tiny_protocol", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=4, embed_dim=48, num_heads=3))
LIMIT = 6
STUDY = f"{SPEC.name}-demo-first{LIMIT}-smoke"


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


def args(root: Path, *extra: str, dataset: str = "demo") -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", dataset,
            "--data-root", str(root / "data"), "--runs", str(root / "runs"),
            "--output", str(root / "protocol"), "--limit", str(LIMIT), "--num-workers", "0",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def default_grid(tmp_path_factory):
    """The default 144-point grid, run once; records every backbone build and forward."""
    root = tmp_path_factory.mktemp("protocol")
    built, forwards = [], []
    real_create, real_extract = pipeline_module.create_backbone, pipeline_module.extract

    def create(spec, *a, **k):
        built.append(spec.name)
        return real_create(spec, *a, **k)

    def extract(backbone, images, requests, *a, **k):
        forwards.append((images.shape[0], sorted(requests)))
        return real_extract(backbone, images, requests, *a, **k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_module, "create_backbone", create)
        patch.setattr(pipeline_module, "extract", extract)
        code = main(args(root))
    return root, code, built, forwards


def test_the_whole_grid_costs_one_forward_per_image(default_grid) -> None:
    root, code, built, forwards = default_grid
    assert code == 0
    assert built == [SPEC.name]
    assert sum(n for n, _ in forwards) == LIMIT  # every image through the backbone once
    maps = sorted(FeatureRequest(kind, layer) for kind in "qkv" for layer in (-1, -2, -3, -4))
    assert all(requests == maps for _, requests in forwards)  # all 12 maps from each forward


def test_the_grid_csv_has_every_point_and_each_is_an_ordinary_run(default_grid) -> None:
    root = default_grid[0]
    frame = read_protocol_csv(root / "protocol" / STUDY / "protocol.csv")
    assert len(frame) == 144
    got = {(r["feature"], r["layer"], r["normalize"], r["gram_bias"])
           for r in frame.to_dict("records")}
    assert got == {(p.feature, p.layer, p.normalize, p.gram_bias) for p in ProtocolGrid().points()}
    for row in frame.to_dict("records"):
        run_dir = root / "runs" / row["run_id"]
        config = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert (config["feature"], config["layer"], config["normalize"], config["gram_bias"],
                config["method"]) == (row["feature"], row["layer"], row["normalize"],
                                      row["gram_bias"], "lost")
        hits = [line["hit"] for line in read_jsonl(run_dir / "predictions.jsonl")]
        assert (len(hits), sum(hits)) == (row["n_images"], row["n_hits"]) == (
            metrics["n_images"], metrics["n_hits"])
    board = leaderboard.collect(root / "runs", include_smoke=True, report=None)
    assert len(board.table) == 144  # the leaderboard sees every point


def test_the_study_files_put_best_of_beside_its_selection(default_grid) -> None:
    folder = default_grid[0] / "protocol" / STUDY
    assert {p.name for p in folder.iterdir()} == {
        "protocol.csv", "protocol.md", "selection.json", "heatmap_none.png", "heatmap_l2.png",
        "bias_curves.png", "positions.png"}
    text = (folder / "protocol.md").read_text()
    assert "SMOKE RUN" in text.splitlines()[2]
    assert "| best of grid |" in text and "| split-half, held out |" in text
    assert "(in-sample): optimistic" in text and "on a random half (3 images)" in text
    frame = read_protocol_csv(folder / "protocol.csv")
    selection = json.loads((folder / "selection.json").read_text())
    best = frame.iloc[int(frame["corloc"].to_numpy().argmax())]  # first of equals: grid order
    assert selection["best_of_grid"]["corloc"] == best["corloc"]
    assert selection["best_of_grid"]["point"].startswith(f"{best['feature']} L{best['layer']} ")
    assert selection["split_half"]["n_splits"] == 50 and selection["cross_dataset"] == []


def test_a_rerun_computes_nothing_and_writes_the_same_study(default_grid, capsys) -> None:
    root = default_grid[0]
    folder = root / "protocol" / STUDY
    before = {name: (folder / name).read_bytes()
              for name in ("protocol.csv", "protocol.md", "selection.json")}
    capsys.readouterr()
    assert main(args(root)) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("144 settings (144 already);") and "SMOKE" in out
    assert before == {name: (folder / name).read_bytes() for name in before}


def published_csv(path: Path, values: list[float]) -> Path:
    rows = [{"paper": f"paper{i}", "method": "LOST", "family": "dinov2",
             "backbone": "Tiny", "compare_with": SPEC.name, "with_registers": "true",
             "test_time_registers": "0", "dataset": "demo", "corloc": value,
             "source": f"Someone {i}", "protocol": f"protocol {i}", "verified": "primary",
             "note": "", "metric": "corloc"} for i, value in enumerate(values)]
    pd.DataFrame(rows, columns=PUBLISHED_COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def study(default_grid, tmp_path_factory):
    root = default_grid[0]
    frame = read_protocol_csv(root / "protocol" / STUDY / "protocol.csv")
    value = float(frame["corloc"].iloc[5])
    published = published_csv(tmp_path_factory.mktemp("pub") / "published.csv", [value, 12.3])
    dirs = [root / "runs" / run_id for run_id in frame["run_id"]]
    return build_study(dirs, ProtocolGrid(), runs_dir=root / "runs", default_feature="k",
                       published=published)


def test_published_figures_list_exactly_the_points_whose_interval_holds_them(study) -> None:
    text = protocol_markdown(study)
    value = study.published[0]["corloc"]
    inside = study.frame[(study.frame["ci_low"] <= value) & (value <= study.frame["ci_high"])]
    section = text.split(f"Tiny, trained registers: {value:.1f} (paper0)", 1)[1]
    section = section.split("###", 1)[0]
    assert f"{len(inside)} of 144 grid points have a 95% interval that holds {value:.1f}" in section
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| ")
              and "`" in line}
    assert listed == set(within_ci(study.frame, value)["run_id"].head(10))
    assert listed <= set(inside["run_id"]) and len(listed) == min(10, len(inside))
    assert "*protocol 0*" in section and "chosen on half and scored on the other half" in section


def test_a_published_figure_no_interval_holds_names_the_closest_point(study) -> None:
    frame = study.frame.assign(ci_low=study.frame["corloc"], ci_high=study.frame["corloc"])
    narrow = dataclasses.replace(study, frame=frame)
    text = protocol_markdown(narrow).split("(paper1)", 1)[1]
    closest = frame.iloc[int((frame["corloc"] - 12.3).abs().to_numpy().argmin())]
    assert "No grid point's 95% interval holds 12.3" in text
    assert f"{closest['corloc'] - 12.3:+.2f} points" in text


def test_every_figure_fits_its_text_and_says_smoke(study) -> None:
    drawn = study_figures(study)
    assert set(drawn) == {"heatmap_none.png", "heatmap_l2.png", "bias_curves.png",
                          "positions.png"}
    for name, fig in drawn.items():
        assert_texts_fit(fig, name)
        assert figure_says(fig, "SMOKE RUN"), name
    assert figure_says(drawn["positions.png"], "paper0 (trained registers)")
    assert figure_says(drawn["heatmap_l2.png"], "red frame") or figure_says(
        drawn["heatmap_none.png"], "red frame")


# --- cross-dataset selection on generated VOC07 / VOC12 trees ---------------------------------


SMALL = ["--features", "k", "--layers=-1,-2", "--normalize", "l2", "--bias-l2=0,-0.3"]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    for year, seed in (("2007", 7), ("2012", 12)):
        demo = generate_demo(root / f"gen{year}", seed=seed)
        shutil.move(str(demo), str(root / "data" / f"VOC{year}"))
    return root


def voc(root: Path, dataset: str, *extra: str) -> list[str]:
    return args(root, *SMALL, "--allow-partial-dataset", "--no-download", *extra,
                dataset=dataset)


def small_study(root: Path, dataset: str) -> Path:
    """The folder of the SMALL grid's study: named apart from the default grid's."""
    (folder,) = (root / "protocol").glob(f"{SPEC.name}-{dataset}-first{LIMIT}-grid*-smoke")
    return folder


def test_choosing_on_voc07_and_scoring_on_voc12(two_datasets, capsys) -> None:
    root = two_datasets
    assert main(voc(root, "voc07")) == 0
    assert main(voc(root, "voc12")) == 0  # auto: finds the VOC07 study of the same options
    first = read_protocol_csv(small_study(root, "voc07") / "protocol.csv")
    folder = small_study(root, "voc12")
    second = read_protocol_csv(folder / "protocol.csv")
    assert len(first) == len(second) == 4
    (cross,) = json.loads((folder / "selection.json").read_text())["cross_dataset"]
    there = (100.0 * first["n_hits"] / first["n_images"]).tolist()
    here = (100.0 * second["n_hits"] / second["n_images"]).tolist()
    chosen = there.index(max(there))  # the first of equals: grid order
    assert cross["selected_on"] == "voc07" and cross["n_common_points"] == 4
    assert cross["corloc_there"] == there[chosen]
    assert cross["held_out"] == here[chosen]
    assert cross["in_sample_best"] == max(here)
    assert cross["optimism"] == max(here) - here[chosen]
    assert "| chosen on voc07, scored here |" in (folder / "protocol.md").read_text()
    capsys.readouterr()
    assert main(voc(root, "voc07", "--select-on", "voc12")) == 0  # the other way round
    assert "| chosen on voc12, scored here |" in (
        small_study(root, "voc07") / "protocol.md").read_text()


def test_a_missing_selection_dataset_fails_before_any_run(two_datasets, capsys) -> None:
    root = two_datasets
    before = sorted((root / "runs").iterdir()) if (root / "runs").exists() else []
    assert main(voc(root, "voc07", "--select-on", "coco20k", "--k-patches", "7")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --select-on coco20k: ")
    assert "not found" in err[0]
    after = sorted((root / "runs").iterdir()) if (root / "runs").exists() else []
    assert after == before


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "needle"), [
    (["--model", "tiny_protocol,other"], "--model 'tiny_protocol,other': a protocol study takes one"),
    (["--dataset", "voc99"], "--dataset 'voc99'"),
    (["--layers=-1,x"], "--layers '-1,x': expected whole numbers"),
    (["--bias-l2=0,nan"], "--bias-l2 '0,nan': 'nan' is not a finite number"),
    (["--normalize", "l3"], "--normalize 'l3'"),
    (["--pos-interp", "bilinear"], "--pos-interp 'bilinear'"),
    (["--select-on", "voc99"], "--select-on 'voc99'"),
    (["--splits", "0"], "--splits 0: must be at least 1"),
])
def test_bad_input_is_one_line_and_runs_nothing(tmp_path, capsys, extra, needle) -> None:
    assert cli.main(["protocol", *args(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "protocol").exists()


def test_help_states_each_default_once() -> None:
    from lostreg.reports.protocol.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "$LOSTREG_DATA or datasets/) (default" not in text
    assert "(default: -1,-2,-3,-4)" in text and "(default: q,k,v)" in text


def test_a_layer_the_model_lacks_is_one_line(tmp_path, capsys) -> None:
    assert main(args(tmp_path, "--layers=-1,-9")) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: --layer -9: the model has 4 blocks (valid indices -4..3)"]
    assert "Traceback" not in err and not (tmp_path / "protocol").exists()


def test_pos_interp_puts_both_resamplings_in_one_study(tmp_path, model_builds) -> None:
    """--pos-interp original,timm: one pass (one model) per resampling, every point in both,
    a heatmap per normalisation and resampling; the timm pass's run ids say so."""
    grid = ["--features", "k", "--layers=-1,-2", "--normalize", "none,l2", "--bias-l2=0,-0.5"]
    assert main(args(tmp_path, *grid, "--pos-interp", "original,timm")) == 0
    assert model_builds == [SPEC.name, SPEC.name]
    (folder,) = (tmp_path / "protocol").glob(f"{SPEC.name}-demo-first{LIMIT}-grid*-smoke")
    frame = read_protocol_csv(folder / "protocol.csv")
    assert len(frame) == 12 and frame["pos_interp"].tolist() == ["original"] * 6 + ["timm"] * 6
    assert all(("postimm" in run_id) == (pos == "timm")
               for run_id, pos in zip(frame["run_id"], frame["pos_interp"], strict=True))
    for run_id, pos in zip(frame["run_id"], frame["pos_interp"], strict=True):
        config = json.loads((tmp_path / "runs" / run_id / "config.json").read_text())
        assert config["pos_interp"] == pos
    assert {p.name for p in folder.glob("*.png")} == {
        f"{kind}_{pos}.png" for kind in ("heatmap_none", "heatmap_l2", "bias_curves")
        for pos in ("original", "timm")} | {"positions.png"}


def test_a_bad_ttr_neurons_option_is_one_line_before_any_run(tmp_path, capsys) -> None:
    assert main(args(tmp_path, "--ttr-neurons", str(tmp_path / "n.json"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ttr-neurons is given but --model tiny_protocol has no +ttr" in err[0]
    assert not (tmp_path / "runs").exists()


# --- the notebook ---------------------------------------------------------------------------


def test_notebook_shows_the_protocol_section(default_grid, tmp_path, monkeypatch) -> None:
    from test_notebook import execute, write_run

    runs = tmp_path / "runs"
    write_run(runs, "smoke-demo-a", [True, False, True] * 4, model="dinov2_vits14",
              timm_name="vit_small_patch14_dinov2.lvd142m", smoke=True)
    monkeypatch.setenv("LOSTREG_PROTOCOL", str(default_grid[0] / "protocol"))
    text = execute(runs, monkeypatch)
    assert f"protocol studies in {default_grid[0] / 'protocol'}: 1" in text
    assert f"{SPEC.name} on demo: 144 settings" in text
    assert "| split-half, held out |" in text  # the best-of figure with its selection protocol


def test_a_one_cell_grid_still_fits_its_titles(study) -> None:
    """One feature x one block: the smallest heatmap must still hold the study's long title,
    the best-of note and the SMOKE line (they were drawn over each other)."""
    frame = study.frame
    one = frame[(frame["feature"] == frame["feature"].iloc[0]) & (frame["layer"] == -1)]
    drawn = draw_figures(one, held_out=HeldOut(29.0, 19.8, 50))
    for name, fig in drawn.items():
        assert_texts_fit(fig, name)
        assert figure_says(fig, "SMOKE RUN"), name


def test_another_grid_gets_its_own_study_folder() -> None:
    """A second study with another grid must not replace the first one's files."""
    default, small = ProtocolGrid(), ProtocolGrid(features=("k",), layers=(-1, -2))
    assert default.tag() == "" and small.tag().startswith("grid")
    assert small.tag() == ProtocolGrid(features=("k",), layers=(-1, -2)).tag()
    assert small.tag() != ProtocolGrid(features=("k",), layers=(-1,)).tag()
    assert small.tag() != ProtocolGrid(features=("k",), layers=(-1, -2), k_patches=50).tag()
    key = StudyKey("m", "voc07", limit=4, smoke=True)
    assert key.folder(Path("out")).name == "m-voc07-first4-smoke"
    tagged = dataclasses.replace(key, grid_tag=small.tag())
    assert tagged.folder(Path("out"), "voc12").name == f"m-voc12-first4-{small.tag()}-smoke"

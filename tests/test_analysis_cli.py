"""``python -m lostreg.analyze`` end to end on the generated demo dataset (random tiny model)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from figure_checks import text_problems
from file_reads import count_reads
from PIL import Image
from unfinished_marks import (
    SMOKE,
    assert_only_the_mark_differs,
    finished_copy,
    footer,
    kept_figures,
    mark,
    read_json,
    unfinished_copy,
)

from lostreg import run as lostreg_run
from lostreg.analyze import main
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.io import read_jsonl
from lostreg.reports.analysis.store import TokenMaps

MODEL = "tiny_analysis_cli"
SPEC = BackboneSpec(MODEL, "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=3, embed_dim=48, num_heads=3))


@pytest.fixture(scope="module", autouse=True)
def registered():
    previous = BACKBONES.get(MODEL)
    BACKBONES[MODEL] = SPEC
    yield
    if previous is None:
        del BACKBONES[MODEL]
    else:
        BACKBONES[MODEL] = previous


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert lostreg_run.main(["--model", MODEL, "--weights", "random", "--dataset", "demo",
                             "--data-root", str(data_root), "--limit", "5", "--output", str(out),
                             "--num-workers", "0", "--no-progress"]) == 0
    (folder,) = list(out.iterdir())
    return folder


def model_args(data_root: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--weights", "random", "--dataset", "demo", "--data-root",
            str(data_root), "--num-workers", "0", "--no-progress", *extra]


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.width > 100


def test_norms_cli_writes_consistent_json_maps_and_figures(data_root, tmp_path, monkeypatch,
                                                           capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["norms", *model_args(data_root, "--limit", "4", "--layers", "0", "-1")]) == 0
    assert "threshold" in capsys.readouterr().out
    # random weights: smoke- prefix; the folder names the study's --limit and blocks (#21 row 9)
    out = tmp_path / "results" / "analysis" / f"smoke-{MODEL}-demo-first4-blocks0_2"
    payload = json.loads((out / "norms.json").read_text())
    assert payload["smoke_run"] is True and "SMOKE" in payload["note"]
    assert payload["weights"]["source"] == "random"
    assert (payload["model"], payload["dataset"], payload["n_images"]) == (MODEL, "demo", 4)
    assert payload["layers"] == [0, 2] and payload["primary_layer"] == 2
    assert "before the model's final norm" in payload["norm_definition"].lower()
    maps = TokenMaps.load(out / payload["tokens_file"])
    assert maps.image_ids == [row["image_id"] for row in payload["per_image"]]
    values = maps.norms[2].astype(np.float64)
    threshold = payload["threshold"]
    flags = values > threshold if threshold is not None else np.zeros(values.shape, bool)
    assert payload["n_tokens"] == values.size == sum(r["n_tokens"] for r in payload["per_image"])
    assert payload["n_outliers"] == int(flags.sum()) == sum(r["n_outliers"]
                                                              for r in payload["per_image"])
    assert payload["outlier_fraction"] == pytest.approx(flags.mean())
    similarity = payload["neighbour_similarity"]
    assert set(similarity) >= {"outlier_mean", "normal_mean", "difference"}
    assert similarity["n_outlier"] + similarity["n_normal"] == values.size
    for name in payload["figures"]:
        assert is_png(out / name)
    assert "norm_hist_block0.png" in payload["figures"]


def test_norms_cli_manual_threshold_and_errors(data_root, tmp_path, capsys) -> None:
    out = tmp_path / "manual"
    assert main(["norms", *model_args(data_root, "--limit", "2", "--threshold", "1e-3",
                                      "--output", str(out))]) == 0
    payload = json.loads((out / "norms.json").read_text())
    assert payload["threshold_source"] == "manual" and payload["outlier_fraction"] == 1.0
    assert "threshold" in payload["auto_split"]
    capsys.readouterr()
    assert main(["norms", *model_args(data_root, "--layers", "3")]) == 2
    assert capsys.readouterr().err.startswith("error: --layers 3: the model has 3 blocks")
    assert main(["norms", *model_args(data_root, "--threshold", "-1")]) == 2
    assert "error: --threshold" in capsys.readouterr().err
    assert main(["norms", "--model", MODEL, "--weights", str(tmp_path / "none.pt"),
                 "--dataset", "demo", "--data-root", str(data_root)]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_attribution_cli_on_a_real_run(run_dir, capsys) -> None:
    assert main(["attribution", "--run", str(run_dir), "--num-workers", "0",
                 "--no-progress"]) == 0
    assert "| all images | 5 |" in capsys.readouterr().out
    analysis = run_dir / "analysis"
    norms = json.loads((analysis / "norms" / "norms.json").read_text())
    predictions = list(read_jsonl(run_dir / "predictions.jsonl"))
    maps = TokenMaps.load(analysis / "norms" / "tokens.npz")
    assert maps.image_ids == [p["image_id"] for p in predictions] and norms["n_images"] == 5
    rows = (analysis / "attribution.csv").read_text().splitlines()
    assert len(rows) == 6
    saved = json.loads((analysis / "attribution.json").read_text())
    assert saved["threshold"] == norms["threshold"]
    assert saved["summary"][0]["n_hits"] == sum(p["hit"] for p in predictions)
    # the recorded seed norm is the stored token norm at the run's seed
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(","), strict=True))
    row, col = predictions[0]["seed"]
    assert float(first["seed_norm"]) == pytest.approx(float(maps.norm_map(0, 2)[row, col]))
    # a second call reuses the maps computed for the run
    assert main(["attribution", "--run", str(run_dir), "--norms",
                 str(analysis / "norms" / "norms.json")]) == 0


def test_show_cli_renders_panels_and_index(run_dir, capsys) -> None:
    predictions = list(read_jsonl(run_dir / "predictions.jsonl"))
    wanted = [predictions[3]["image_id"], predictions[0]["image_id"]]
    assert main(["show", "--run", str(run_dir), "--images", *wanted, "--device", "cpu"]) == 0
    show = run_dir / "analysis" / "show"
    pngs = sorted(show.glob("*.png"))
    assert [p.name for p in pngs] == [f"000-{wanted[0]}.png", f"001-{wanted[1]}.png"]
    assert all(is_png(p) for p in pngs)
    page = (show / "index.html").read_text()
    for png in pngs:
        assert f'src="{png.name}"' in page and f'href="{png.name}"' in page
    assert "SMOKE RUN" in page
    assert "differ" not in page  # recomputed seeds and boxes equal the run's
    capsys.readouterr()
    assert main(["show", "--run", str(run_dir), "--images", "no_such_image"]) == 2
    assert "no_such_image" in capsys.readouterr().err


def test_analyses_refuse_other_weights_than_the_run(run_dir, tmp_path, capsys) -> None:
    import torch

    from lostreg.backbones import create_backbone

    checkpoint = tmp_path / "other.pt"
    torch.save(create_backbone(SPEC, "random", seed=1).model.state_dict(), checkpoint)
    assert main(["attribution", "--run", str(run_dir), "--recompute", "--weights",
                 str(checkpoint), "--num-workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and "'random'" in err


# --- an unfinished run's outputs say so, with its image count (issue 20 follow-up) -----------


def test_an_unfinished_box_run_is_named_so_in_every_output(run_dir, tmp_path, monkeypatch,
                                                          capsys) -> None:
    folder = unfinished_copy(run_dir, tmp_path / "runs", keep=2)
    expected = mark(2, 5)  # --limit 5: the run's total is known from its identity
    assert main(["attribution", "--run", str(folder), "--num-workers", "0",
                 "--no-progress"]) == 0
    assert f"**{expected}.**" in (folder / "analysis" / "attribution.md").read_text()
    saved = read_json(folder / "analysis" / "attribution.json")
    assert saved["unfinished_run"] == {"images_predicted": 2, "split_images": 5,
                                       "note": expected}
    figures = kept_figures(monkeypatch)
    assert main(["show", "--run", str(folder), "--device", "cpu", "--no-progress"]) == 0
    page = (folder / "analysis" / "show" / "index.html").read_text()
    assert f'<p class="warn">{html.escape(expected)}</p>' in page
    assert len(figures) == 2 and all(footer(fig) == f"{SMOKE} {expected}" for fig in figures)
    assert all(text_problems(fig) == [] for fig in figures)  # the longer footer still fits
    assert capsys.readouterr().err.count("is unfinished") == 2  # one warning per command


def test_a_finished_box_run_gets_only_what_it_got_before(run_dir, tmp_path, monkeypatch) -> None:
    """The same run finished and unfinished with every line (the same images): the outputs
    differ only by the unfinished mark, so a finished run's are what they were."""
    assert_only_the_mark_differs(main, finished_copy(run_dir, tmp_path / "finished"),
                                 unfinished_copy(run_dir, tmp_path / "unfinished"),
                                 kept_figures(monkeypatch), mark(5, 5))


def test_several_runs_name_each_unfinished_run_by_its_label(run_dir, tmp_path, monkeypatch,
                                                            capsys) -> None:
    """hits.md and runs.json of ``attribution --hits-only``, and the side-by-side page and
    panels of ``show``: the unfinished run's mark carries its label, the finished run none."""
    unfinished = unfinished_copy(run_dir, tmp_path / "unfinished", keep=3)
    finished = finished_copy(run_dir, tmp_path / "finished")
    expected = mark(3, 5, "lost #1")  # the same settings twice: labelled by position
    out = tmp_path / "compare"
    assert main(["attribution", "--hits-only", "--run", str(unfinished), str(finished),
                 "--output", str(out)]) == 0
    hits = (out / "hits.md").read_text()
    assert f"**{expected}.**" in hits and hits.count("UNFINISHED") == 1
    records = read_json(out / "runs.json")
    assert [record.get("unfinished_run") for record in records] == [
        {"images_predicted": 3, "split_images": 5, "note": mark(3, 5)}, None]
    figures = kept_figures(monkeypatch)
    assert main(["show", "--run", str(unfinished), str(finished), "--device", "cpu",
                 "--no-progress", "--output", str(out / "show")]) == 0
    page = (out / "show" / "index.html").read_text()
    assert f'<p class="warn">{html.escape(expected)}</p>' in page
    assert page.count("UNFINISHED") == 1
    assert len(figures) == 3 and all(footer(fig) == f"{SMOKE} {expected}" for fig in figures)
    assert [record.get("unfinished_run", {}).get("images_predicted") for record in
            read_json(out / "show" / "runs.json")] == [3, None]
    capsys.readouterr()


def test_attribution_of_several_runs_warns_once_per_unfinished_run(run_dir, tmp_path,
                                                                   capsys) -> None:
    """Each run is read for its own table and again for the comparison: one warning each."""
    unfinished = unfinished_copy(run_dir, tmp_path / "unfinished", keep=3)
    finished = finished_copy(run_dir, tmp_path / "finished")
    capsys.readouterr()
    assert main(["attribution", "--run", str(unfinished), str(finished), "--num-workers", "0",
                 "--no-progress", "--output", str(tmp_path / "compare")]) == 0
    assert capsys.readouterr().err.count("is unfinished") == 1


def test_attribution_of_several_runs_reads_each_predictions_file_once(run_dir, tmp_path,
                                                                      monkeypatch) -> None:
    """``attribution`` of two box runs (one unfinished) reads each run's predictions.jsonl
    once: for its own attribution and for the comparison table alike."""
    unfinished = unfinished_copy(run_dir, tmp_path / "unfinished", keep=3)
    finished = finished_copy(run_dir, tmp_path / "finished")
    reads = count_reads(monkeypatch, "predictions.jsonl")
    assert main(["attribution", "--run", str(unfinished), str(finished), "--num-workers", "0",
                 "--no-progress", "--output", str(tmp_path / "compare")]) == 0
    assert (tmp_path / "compare" / "hits.csv").is_file()
    assert (finished / "analysis" / "attribution.csv").is_file()
    assert reads == {unfinished / "predictions.jsonl": 1, finished / "predictions.jsonl": 1}

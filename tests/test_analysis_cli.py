"""``python -m lostreg.analyze`` end to end on the generated demo dataset (random tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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

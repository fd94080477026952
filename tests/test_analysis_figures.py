"""Every analysis figure, rendered from smoke runs with long labels (a long model name, long
image ids): no text leaves the canvas or overlaps another, ticks are plain numbers, and each
figure says SMOKE RUN. Also ``analyze show`` with several runs (one panel per method, masks
recomputed through the method registry) and its progress bar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_methods import expected, fake_method_registered
from figure_checks import drawn_texts, offset_texts, text_problems
from PIL import Image
from voc_trees import write_voc2007 as write_tree

from lostreg import run as lostreg_run
from lostreg.analyze import main
from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone
from lostreg.evaluation.corloc import is_hit
from lostreg.evaluation.iou import best_iou
from lostreg.features.extract import FeatureRequest, extract, preprocess
from lostreg.io import read_jsonl
from lostreg.methods.lost import lost_reference_with_mask
from lostreg.reports.analysis import plots
from lostreg.reports.analysis.compare import backbone_key, recompute_image, show_compare
from lostreg.reports.analysis.report import show_run
from lostreg.reports.analysis.runs import load_run, load_runs, run_labels

MODEL = "tiny_dinov2_vitl14_reg4_with_a_deliberately_long_model_name_for_figure_tests"
SPEC = BackboneSpec(MODEL, "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))
# (image id, width, height, object box in VOC's 1-based inclusive pixels)
IMAGES = [("2008_000123_a_rather_long_image_identifier_from_a_custom_split_first", 90, 64,
           (20, 10, 60, 50)),
          ("2008_000456_a_rather_long_image_identifier_from_a_custom_split_second", 70, 56,
           (5, 5, 40, 50)),
          ("2008_000789_a_rather_long_image_identifier_from_a_custom_split_third", 64, 64,
           (30, 30, 64, 64))]


@pytest.fixture(scope="module", autouse=True)
def registered():
    BACKBONES[MODEL] = SPEC
    with fake_method_registered():
        yield
    del BACKBONES[MODEL]


def write_voc2007(root: Path) -> None:
    write_tree(root, IMAGES)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_voc2007(root)
    return root


@pytest.fixture(scope="module")
def lost_run(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert lostreg_run.main(["--model", MODEL, "--weights", "random", "--dataset", "voc07",
                             "--data-root", str(data_root), "--allow-partial-dataset",
                             "--no-download", "--output", str(out), "--num-workers", "0",
                             "--no-progress"]) == 0
    (folder,) = list(out.iterdir())
    return folder


def fake_predictions(lost_dir: Path, data_root: Path) -> list[dict]:
    """What a fake_top run over the same images writes, computed here independently: the
    pipeline's own features, the numpy definition of the method, CorLoc's IoU."""
    backbone = create_backbone(SPEC, "random")
    lines = []
    for prediction in read_jsonl(lost_dir / "predictions.jsonl"):
        path = data_root / "VOC2007" / prediction["file"]
        tensor, size = preprocess(Image.open(path).convert("RGB"), backbone.mean, backbone.std,
                                  14)
        grid = (tensor.shape[1] // 14, tensor.shape[2] // 14)
        feats = extract(backbone, tensor[None], [FeatureRequest("k")])[FeatureRequest("k")][0]
        box, _ = expected(feats.numpy(), grid, 14, size)
        iou = best_iou(box, prediction["gt_boxes"])
        lines.append({**prediction, "box": box, "seed": None, "best_iou": round(iou, 6),
                      "hit": is_hit(iou)})
    return lines


def write_fake_run(lost_dir: Path, data_root: Path, folder: Path) -> Path:
    """A run folder of the fake method over the LOST run's images (the schema of a run made
    with --method: config.json's method and method_params, seeds null)."""
    shutil.copytree(lost_dir, folder, ignore=shutil.ignore_patterns("analysis"))
    config = json.loads((folder / "config.json").read_text())
    config.update(method="fake_top", method_params={"fake_level": 0.0},
                  run_id=config["run_id"] + "-fake_top")
    (folder / "config.json").write_text(json.dumps(config))
    lines = fake_predictions(lost_dir, data_root)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    return folder


@pytest.fixture(scope="module")
def fake_run(lost_run, data_root, tmp_path_factory) -> Path:
    return write_fake_run(lost_run, data_root, tmp_path_factory.mktemp("fake") / "run")


@pytest.fixture
def figures(monkeypatch) -> dict[str, dict]:
    """Every figure the analyses save, checked at the resolution it is saved with, by file
    name: its text problems, offset texts, drawn texts and tick labels."""
    seen: dict[str, dict] = {}
    original = plots.save_figure

    def checking(fig, path, dpi=None):
        if dpi:
            fig.set_dpi(dpi)
        ticks = [label.get_text() for ax in fig.axes if ax.get_visible()
                 for label in (*ax.get_xticklabels(), *ax.get_yticklabels())
                 if label.get_text()]
        texts = drawn_texts(fig)
        seen[Path(path).name] = {"problems": text_problems(fig, texts=texts),
                                 "offsets": offset_texts(fig, texts),
                                 "texts": [t.get_text() for t, _ in texts], "ticks": ticks}
        original(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", checking)
    return seen


def assert_reads_well(name: str, figure: dict, *must_say: str) -> None:
    assert figure["problems"] == [], (name, figure["problems"])
    assert figure["offsets"] == [], (name, figure["offsets"])
    for tick in figure["ticks"]:  # plain numbers: no 3×10^0, no 1e-7+1.4e-2
        float(tick.replace("\N{MINUS SIGN}", "-"))
    flat = " ".join(t.replace("\n", "") for t in figure["texts"])
    assert "SMOKE RUN" in flat, name
    for text in must_say:
        assert text.replace(" ", "") in flat.replace(" ", ""), (name, text)


def test_norms_figures_fit_and_say_smoke(data_root, tmp_path, figures) -> None:
    out = tmp_path / "norms"
    assert main(["norms", "--model", MODEL, "--weights", "random", "--dataset", "voc07",
                 "--data-root", str(data_root), "--no-download", "--threshold", "2",
                 "--output", str(out), "--num-workers", "0", "--no-progress"]) == 0
    assert set(figures) == {"norm_hist_block1.png", "neighbour_similarity.png"}
    for name, figure in figures.items():
        assert_reads_well(name, figure, MODEL)
        with Image.open(out / name) as png:
            assert png.format == "PNG"


def test_show_panels_fit_with_plain_colorbars_and_progress(lost_run, tmp_path, figures,
                                                            capsys) -> None:
    assert main(["show", "--run", str(lost_run), "--device", "cpu", "--output",
                 str(tmp_path / "show")]) == 0
    err = capsys.readouterr().err
    assert "show " in err and "3/3" in err  # the progress bar, on stderr
    assert len(figures) == 3
    for (name, figure), (image_id, *_) in zip(sorted(figures.items()), IMAGES, strict=True):
        assert_reads_well(name, figure, MODEL, image_id, "LOST degree")
        assert len(figure["ticks"]) >= 10  # the colorbars have ticks
    page = (tmp_path / "show" / "index.html").read_text()
    assert "SMOKE RUN" in page and "differ" not in page
    assert main(["show", "--run", str(lost_run), "--device", "cpu", "--max-images", "1",
                 "--output", str(tmp_path / "again"), "--no-progress"]) == 0
    assert "img" not in capsys.readouterr().err


def test_plain_formatter_tells_ticks_apart_without_offsets() -> None:
    formatter = plots.PlainFormatter()
    assert formatter.format_ticks([0.0142855, 0.0142856, 0.0142857]) == [
        "0.0142855", "0.0142856", "0.0142857"]
    assert formatter.format_ticks([0, 0.5, 1.0, 1.5]) == ["0", "0.5", "1.0", "1.5"]
    assert formatter.format_ticks([20, 40, 60]) == ["20", "40", "60"]
    assert formatter.format_ticks([-1.0, -0.5, 0.0]) == ["-1.0", "-0.5", "0"]
    assert formatter.format_ticks([2e-5, 4e-5]) == ["2e-5", "4e-5"]
    assert formatter.format_ticks([1e6, 2e6]) == ["1e6", "2e6"]
    assert formatter.get_offset() == ""
    locator = plots.PlainLogLocator()
    assert locator.tick_values(0.4, 6.5) == pytest.approx([0.5, 1, 2, 5])
    assert locator.tick_values(1, 1e5) == pytest.approx([1, 10, 100, 1e3, 1e4, 1e5])
    assert locator.tick_values(2, 6.5) == pytest.approx([2, 3, 4, 5, 6])
    narrow = locator.tick_values(1.42, 1.45)  # inside one 1-2-5 step: evenly spaced ticks
    assert len(narrow) >= 2 and all(1.42 <= t <= 1.45 for t in narrow)


def test_show_of_a_seedless_method_draws_its_mask(fake_run, tmp_path, figures) -> None:
    index = show_run(fake_run, device="cpu", output=tmp_path / "fake", max_images=1)
    (name, figure), = figures.items()
    assert_reads_well(name, figure, "FakeTop patch mask (cyan)")
    assert not any("LOST degree" in t for t in figure["texts"])
    page = index.read_text()
    assert "differ" not in page and "FakeTop panels" in page and "seed" not in page.split(
        "<ul>")[1]


def test_compare_recomputes_each_method_and_draws_them_side_by_side(
        lost_run, fake_run, data_root, tmp_path, figures, capsys) -> None:
    infos = load_runs([lost_run, fake_run])
    assert run_labels(infos) == ["lost", "fake_top"]
    # the masks behind the panels: LOST's against its per-image reference, fake_top's
    # against the numpy definition; boxes and seeds equal the stored predictions
    backbone = create_backbone(SPEC, "random")
    key = backbone_key(infos[0])
    assert backbone_key(infos[1]) == key
    for number, (image_id, *_) in enumerate(IMAGES):
        image = Image.open(data_root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg")
        image = image.convert("RGB")
        lost_result, fake_result = recompute_image(image, infos, {key: [0, 1]},
                                                   {key: backbone}, torch.device("cpu"))
        tensor, size = preprocess(image, backbone.mean, backbone.std, 14)
        grid = (tensor.shape[1] // 14, tensor.shape[2] // 14)
        feats = extract(backbone, tensor[None], [FeatureRequest("k")])[FeatureRequest("k")][0]
        reference, component = lost_reference_with_mask(feats, grid, 14, size)
        assert np.array_equal(lost_result.mask, component.numpy())
        assert lost_result.box == reference.box
        assert lost_result.agrees_with(infos[0].predictions[number])
        box, mask = expected(feats.numpy(), grid, 14, size)
        assert np.array_equal(fake_result.mask, mask) and fake_result.box == box
        assert fake_result.seed is None
        assert fake_result.agrees_with(infos[1].predictions[number])

    index = show_compare([lost_run, fake_run], device="cpu", output=tmp_path / "cmp",
                         progress=True)
    assert "3/3" in capsys.readouterr().err
    assert len(figures) == 3
    for name, figure in figures.items():
        assert_reads_well(name, figure, "lost", "fake_top", MODEL)
    page = index.read_text()
    assert "differ" not in page and "SMOKE RUN" in page and "lost: hit" in page or \
        "lost: miss" in page
    runs = json.loads((tmp_path / "cmp" / "runs.json").read_text())
    assert [r["label"] for r in runs] == ["lost", "fake_top"]


def test_compare_warns_when_a_stored_box_is_not_what_the_method_gives(
        lost_run, fake_run, tmp_path, capsys) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(fake_run, tampered)
    lines = list(read_jsonl(tampered / "predictions.jsonl"))
    lines[1]["box"] = [0, 0, 14, 14]
    (tampered / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    index = show_compare([lost_run, tampered], device="cpu", output=tmp_path / "cmp")
    err = capsys.readouterr().err
    assert f"warning: {IMAGES[1][0]}: recomputed fake_top differs from the run" in err
    assert err.count("differs") == 1
    assert "[recomputed fake_top differ from the run]" in index.read_text()


def test_compare_cli_options_and_errors(lost_run, fake_run, tmp_path, capsys,
                                        monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["show", "--run", str(lost_run), "--run", str(fake_run), "--device", "cpu",
                 "--images", IMAGES[2][0], "--no-progress"]) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "results" / "analysis").iterdir()
    assert folder.name.startswith("smoke-compare-voc07-")
    assert str((folder / "show").relative_to(tmp_path)) in out
    assert [p.name for p in (folder / "show").glob("*.png")] == [f"000-{IMAGES[2][0]}.png"]
    assert main(["show", "--run", str(lost_run), str(fake_run), "--threshold", "3"]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert main(["show", "--run", str(lost_run), str(fake_run), "--images", "nope"]) == 2
    assert "no image 'nope'" in capsys.readouterr().err
    assert load_run(fake_run).method.describe() == "fake_top (fake_level=0.0) on k"


def test_attribution_of_several_runs_shares_token_maps_and_tables_hits(lost_run, fake_run,
                                                                       tmp_path) -> None:
    from lostreg.reports.analysis.attribution import attribute_runs

    results, table = attribute_runs([lost_run, fake_run], device="cpu", num_workers=0,
                                    output=tmp_path / "hits")
    assert results[1].norms_path == results[0].norms_path == (
        lost_run / "analysis" / "norms" / "norms.json")
    assert not (fake_run / "analysis" / "norms").exists()  # same model and images: reused
    assert all(row["seed_row"] is None for row in results[1].rows)
    assert [row["seed_row"] is None for row in results[0].rows] == [False] * len(IMAGES)
    stored = [list(read_jsonl(run / "predictions.jsonl")) for run in (lost_run, fake_run)]
    assert [(r["hit_lost"], r["hit_fake_top"]) for r in table.rows] == [
        (a["hit"], b["hit"]) for a, b in zip(*stored, strict=True)]
    assert (tmp_path / "hits" / "hits.csv").is_file()


def test_run_labels_name_what_differs(lost_run) -> None:
    base = load_run(lost_run)

    def variant(**changes) -> object:
        return type(base)(base.run_dir, {**base.config, **changes}, base.predictions)

    five = {**base.config.get("method_params", {"gram_bias": 0.0}), "k_patches": 5}
    assert run_labels([base, variant(k_patches=5, method_params=five)]) == [
        "lost k_patches=100", "lost k_patches=5"]
    assert run_labels([base, variant(feature="v")]) == ["lost feature=k", "lost feature=v"]
    assert run_labels([base, variant(model="other_model")]) == [f"lost {MODEL}",
                                                                "lost other_model"]
    assert run_labels([base, variant()]) == ["lost #1", "lost #2"]
    assert run_labels([base, variant(method="fake_top", method_params={}),
                       variant(method="fake_top", method_params={"fake_level": 1.0})]) == [
        "lost", "fake_top fake_level=0.0", "fake_top fake_level=1.0"]


def test_show_refuses_a_feature_it_cannot_recompute(lost_run, tmp_path, capsys) -> None:
    odd = tmp_path / "odd"
    shutil.copytree(lost_run, odd, ignore=shutil.ignore_patterns("analysis"))
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "feature": "k_unknown"}))
    assert main(["show", "--run", str(odd), "--device", "cpu", "--no-progress"]) == 2
    assert "feature 'k_unknown' is not known" in capsys.readouterr().err

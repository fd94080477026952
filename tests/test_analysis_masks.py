"""``analyze show`` and ``analyze attribution`` on mask runs (issue 19's follow-up): real smoke
runs of a tiny random model on a generated ECSSD tree (TokenCut, LOST and DINO-seg), and
hand-made mask-run folders for the 0/0 cases. Every panel and table is checked against a plain
computation from the files: the mask pycocotools decodes from the line, the GT PIL reads from
the dataset, TokenCut's IoU from the two, torch's own nearest upsampling for which token falls
where."""

from __future__ import annotations

import csv
import html
import json
import math
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from figure_checks import drawn_texts, text_problems
from file_reads import count_reads
from mask_run_folders import write_mask_run
from PIL import Image
from pycocotools import mask as mask_utils
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

from lostreg.analyze import main as analyze
from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone
from lostreg.datasets.mask_demo import generate_mask_tree
from lostreg.errors import LostregError
from lostreg.evaluation.saliency_protocol import feature_grid, resize_to_patch_multiple
from lostreg.features.extract import preprocess
from lostreg.reports.analysis.mask_attribution import attribute_mask_run, iou_table
from lostreg.reports.analysis.mask_report import show_mask_compare, show_mask_run
from lostreg.reports.analysis.norms import patch_token_norms
from lostreg.reports.analysis.store import TokenMaps
from lostreg.reports.analysis.tokens import block_outputs
from lostreg.run import main as run

SPEC = BackboneSpec("tiny_mask_analysis", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14,
                    4, pos_embed="dinov2_reg",
                    model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 6})
IMAGES = 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Three finished smoke mask runs (TokenCut, LOST, DINO-seg) on 4 generated ECSSD scenes
    whose sides round both ways to a patch multiple (so the resized grid is not the padded
    one), every other GT with grey borders."""
    root = tmp_path_factory.mktemp("mask_analysis")
    generate_mask_tree(root / "data", "ecssd", IMAGES, seed=3, sizes=(40, 72), grey_borders=True)
    BACKBONES[SPEC.name] = SPEC
    try:
        assert run(["--model", SPEC.name, "--weights", "random", "--dataset", "ecssd",
                    "--data-root", str(root / "data"), "--runs", str(root / "runs"),
                    "--num-workers", "0", "--no-progress", "--device", "cpu",
                    "--allow-partial-dataset", "--method", "tokencut,lost,dinoseg"]) == 0
        yield root
    finally:
        BACKBONES.pop(SPEC.name, None)


def run_of(tree: Path, method: str) -> Path:
    (folder,) = [p for p in (tree / "runs").iterdir() if f"-{method}-" in p.name]
    return folder


def lines_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def pycoco_mask(line: dict) -> np.ndarray:
    """The line's mask as pycocotools decodes it (the format's own decoder)."""
    rle = {"size": line["pred_mask_rle"]["size"],
           "counts": line["pred_mask_rle"]["counts"].encode("ascii")}
    with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy=
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def gt_of(tree: Path, image_id: str) -> np.ndarray:
    return np.array(Image.open(tree / "data" / "ECSSD" / "ground_truth_mask" / f"{image_id}.png")
                    .convert("L"))


def tokencut_iou(mask: np.ndarray, gt: np.ndarray) -> float:
    """TokenCut's ``metric.py`` IoU: intersection / union of the binary mask and gt > 0."""
    inter = np.float32((mask & (gt > 0)).sum())
    union = np.float32((mask | (gt > 0)).sum())
    return float(inter / union) if union else math.nan


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the panels save, kept open for inspection (a stub file is written)."""
    return kept_figures(monkeypatch)


def test_show_draws_the_stored_mask_the_gt_and_the_iou(tree, figures, tmp_path) -> None:
    folder = run_of(tree, "tokencut")
    chosen = ["00000", "00001"]  # 00001 (44x45): 3x3 resized, 4x4 padded
    index = show_mask_run(folder, chosen, device="cpu", output=tmp_path / "show")
    lines = [line for line in lines_of(folder) if line["image_id"] in chosen]
    assert len(figures) == len(chosen)
    for fig, line in zip(figures, lines, strict=True):
        image_ax, gt_ax, mask_ax, *map_axes = [ax for ax in fig.axes if ax.get_images()]
        mask, gt = pycoco_mask(line), gt_of(tree, line["image_id"])
        assert np.array_equal(mask_ax.get_images()[0].get_array(), mask.astype(np.float32))
        assert np.array_equal(gt_ax.get_images()[0].get_array(), gt)
        overlay = image_ax.get_images()[1].get_array()
        assert np.array_equal(overlay[..., 3] > 0, mask)  # the cyan layer is the stored mask
        assert f"IoU {line['sal_iou']:.3f}" in " ".join(mask_ax.get_title().split())
        assert tokencut_iou(mask, gt) == pytest.approx(line["sal_iou"], abs=1e-6)
        grid = feature_grid(line["width"], line["height"], 14)  # the resized image's grid
        assert all(ax.get_images()[0].get_array().shape == grid for ax in map_axes)
    assert not text_problems(figures[1], texts=drawn_texts(figures[1]))
    page = index.read_text()
    assert "differs" not in page  # the method recomputed on the resized image gives the mask
    assert "SMOKE RUN" in page and "TokenCut&#x27;s per-image IoU" in page
    assert any(feature_grid(line["width"], line["height"], 14)
               != (-(-line["height"] // 14), -(-line["width"] // 14)) for line in lines)


def test_show_flags_a_recomputed_mask_that_differs(tree, figures, tmp_path, monkeypatch) -> None:
    import lostreg.reports.analysis.mask_report as mask_report

    monkeypatch.setattr(mask_report, "refined", lambda record, upsampled, *_: 0 * upsampled)
    index = show_mask_run(run_of(tree, "lost"), ["00000"], device="cpu", output=tmp_path)
    assert "recomputed lost mask or seed differs from the run" in index.read_text()


def test_show_refuses_a_gt_that_is_not_the_one_scored(tree, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tree / "data", data)
    gt_path = data / "ECSSD" / "ground_truth_mask" / "00002.png"
    gray = np.array(Image.open(gt_path))
    gray[: gray.shape[0] // 2] = 0  # an edited GT: fewer object pixels than the run counted
    Image.fromarray(gray).save(gt_path)
    with pytest.raises(LostregError, match=r"00002\.png: not the ground truth run .* scored"):
        show_mask_compare([run_of(tree, "tokencut"), run_of(tree, "lost")], ["00002"],
                          data_root=data, output=tmp_path / "compare")


def test_several_mask_runs_side_by_side_need_no_model(tree, figures, tmp_path, monkeypatch,
                                                      capsys) -> None:
    import lostreg.reports.analysis.runs as runs_module

    monkeypatch.setattr(runs_module, "create_backbone", None)  # a model build would fail
    methods = ("tokencut", "lost", "dinoseg")
    folders = [run_of(tree, method) for method in methods]
    assert analyze(["show", "--run", *map(str, folders), "--output", str(tmp_path / "c"),
                    "--no-progress"]) == 0
    per_run = [lines_of(folder) for folder in folders]
    for number, fig in enumerate(figures):
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert "GT mask" in axes[0].get_title()
        for ax, method, lines in zip(axes[1:], methods, per_run, strict=True):
            line = lines[number]
            title = " ".join(ax.get_title().split())
            assert title.startswith(method) and f"IoU {line['sal_iou']:.3f}" in title
            assert np.array_equal(ax.get_images()[1].get_array()[..., 3] > 0, pycoco_mask(line))
    assert json.loads((tmp_path / "c" / "runs.json").read_text())[1]["refine"] == "none"
    assert analyze(["show", "--run", str(folders[0]), "--misses"]) == 2
    assert "--misses" in capsys.readouterr().err


def test_several_mask_runs_side_by_side_read_each_gt_once(tree, figures, tmp_path,
                                                          monkeypatch) -> None:
    """Each image's GT is read once for all the runs shown beside it (each run's prediction
    still checked against it). Counted at ``read_gt``, what ``MaskTarget.gray`` calls: its
    in-memory cache would hide repeated reads from a count of file opens."""
    import lostreg.evaluation.mask_gt as mask_gt

    reads: Counter = Counter()
    plain_read_gt = mask_gt.read_gt

    def counting_read_gt(path, size):
        reads[Path(path).name] += 1
        return plain_read_gt(path, size)

    monkeypatch.setattr(mask_gt, "read_gt", counting_read_gt)
    folders = [run_of(tree, method) for method in ("tokencut", "lost", "dinoseg")]
    show_mask_compare(folders, output=tmp_path / "c")
    assert len(figures) == IMAGES
    assert reads == {f"{line['image_id']}.png": 1 for line in lines_of(folders[0])}


def box_run(root: Path) -> Path:
    """A finished box run folder (the demo set, CorLoc lines) for mixing with mask runs."""
    folder = root / "box"
    folder.mkdir()
    weights = {"source": "random", "path": None, "sha256": None, "hub_id": None}
    (folder / "config.json").write_text(json.dumps({
        "run_id": "box", "model": SPEC.name, "patch_size": 14, "dataset": "demo",
        "weights": weights, "feature": "k", "k_patches": 100, "gram_bias": 0.0,
        "smoke_run": True}))
    (folder / "predictions.jsonl").write_text(json.dumps({
        "image_id": "00000", "width": 66, "height": 42, "box": [0, 0, 14, 14], "seed": [0, 0],
        "gt_boxes": [], "best_iou": 0.0, "hit": False}) + "\n")
    (folder / "metrics.json").write_text("{}")
    return folder


@pytest.mark.parametrize("command", [["show"], ["attribution", "--hits-only"]])
def test_a_box_run_and_a_mask_run_are_one_clear_line(tree, tmp_path, capsys, command) -> None:
    mask, box = run_of(tree, "lost"), box_run(tmp_path)
    for runs in ((mask, box), (box, mask)):
        assert analyze([command[0], "--run", *map(str, runs), *command[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "a box run (CorLoc) and a mask run (saliency)" in err[0]


def plain_inside(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Tokens at least half of whose pixels (torch's own nearest upsampling, as TokenCut's
    ``F.interpolate``) are in the mask."""
    rows, cols = grid
    source = F.interpolate(torch.arange(rows * cols, dtype=torch.float32).view(1, 1, rows, cols),
                           size=mask.shape, mode="nearest")[0, 0].long().numpy()
    inside = np.zeros(grid, dtype=bool)
    for token in range(rows * cols):
        pixels = mask[source == token]
        inside.flat[token] = pixels.size > 0 and pixels.mean() >= 0.5
    return inside


def test_attribution_split_against_a_plain_computation(tree) -> None:
    folder = run_of(tree, "tokencut")
    attribute_mask_run(folder, device="cpu", num_workers=0)  # computes the token maps
    maps = TokenMaps.load(folder / "analysis" / "norms" / "tokens.npz")
    layer = maps.layers[-1]
    peaks = sorted(float(maps.norm_map(i, layer).max()) for i in range(len(maps)))
    threshold = (peaks[1] + peaks[2]) / 2  # two images with outliers, two without
    result = attribute_mask_run(folder, threshold=threshold, device="cpu", num_workers=0)
    lines = lines_of(folder)
    groups: dict[bool, list[float]] = {True: [], False: []}
    outliers_total = outliers_inside = 0
    for line, row in zip(lines, result.rows, strict=True):
        position = maps.position(line["image_id"])
        assert maps.grid(position) == feature_grid(line["width"], line["height"], 14)
        outliers = maps.norm_map(position, layer) > threshold
        inside = plain_inside(pycoco_mask(line), maps.grid(position))
        assert row["n_outliers"] == outliers.sum() and row["mask_tokens"] == inside.sum()
        assert row["mask_outliers"] == (outliers & inside).sum()
        assert row["iou"] == line["sal_iou"]
        groups[bool(outliers.any())].append(line["sal_iou"])
        outliers_total += outliers.sum()
        outliers_inside += (outliers & inside).sum()
    summary = {row["group"]: row for row in result.summary}
    assert summary["image has outliers"]["n_images"] == 2
    for has, name in ((True, "image has outliers"), (False, "image has none")):
        assert summary[name]["mean_iou"] == pytest.approx(100 * np.mean(groups[has]))
    everything = summary["all images"]
    assert everything["outliers_in_mask_pct"] == pytest.approx(
        100 * outliers_inside / outliers_total)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert everything["mean_iou"] == pytest.approx(metrics["iou"], abs=1e-4)
    assert "TokenCut's per-image IoU (sal_iou" in result.markdown
    written = json.loads((folder / "analysis" / "attribution.json").read_text())
    assert written["saliency_definition"] == "tokencut" and written["target"] == "mask"


def test_token_maps_of_a_mask_run_are_of_the_resized_image(tree) -> None:
    folder = run_of(tree, "tokencut")
    attribute_mask_run(folder, device="cpu", num_workers=0)
    maps = TokenMaps.load(folder / "analysis" / "norms" / "tokens.npz")
    backbone = create_backbone(SPEC, "random")
    image = Image.open(tree / "data" / "ECSSD" / "images" / "00001.jpg").convert("RGB")
    tensor, _ = preprocess(resize_to_patch_multiple(image, 14), backbone.mean, backbone.std, 14)
    _, outputs = block_outputs(backbone.model, tensor[None], [1])
    norms = patch_token_norms(outputs[1], backbone.num_prefix_tokens)[0].numpy()
    assert np.allclose(maps.norm_map(maps.position("00001"), 1).ravel(), norms, rtol=2e-3)


@pytest.mark.parametrize("protocol", [None, "pad"])
def test_padded_token_maps_are_refused_or_redone_for_a_mask_run(tree, tmp_path, capsys,
                                                                  protocol) -> None:
    """Token maps of padded images (``image_protocol`` "pad", or absent: a norms.json from
    before mask runs) are not on a mask run's resized grids: given by ``--norms`` they are
    one line; found in ``<run>/analysis/norms`` they are recomputed, not reused."""
    folder = finished_copy(run_of(tree, "tokencut"), tmp_path / "run")
    attribute_mask_run(folder, device="cpu", num_workers=0)  # resized maps in analysis/norms
    stored = folder / "analysis" / "norms"
    payload = read_json(stored / "norms.json")
    assert payload["image_protocol"] == "resize"
    padded = {k: v for k, v in payload.items() if k != "image_protocol"}
    if protocol is not None:
        padded["image_protocol"] = protocol
    given = tmp_path / "given"
    shutil.copytree(stored, given)
    (given / "norms.json").write_text(json.dumps(padded))
    attribution_md = (folder / "analysis" / "attribution.md").read_text()
    capsys.readouterr()
    assert analyze(["attribution", "--run", str(folder), "--norms", str(given / "norms.json"),
                    "--device", "cpu", "--no-progress", "--num-workers", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {given / 'norms.json'}: not from the run's model and data (images pad vs "
        "the run's resize (to a patch multiple))"]
    assert (folder / "analysis" / "attribution.md").read_text() == attribution_md
    (stored / "norms.json").write_text(json.dumps(padded))
    assert analyze(["attribution", "--run", str(folder), "--device", "cpu", "--no-progress",
                    "--num-workers", "0"]) == 0
    assert "using the token maps" not in capsys.readouterr().err
    assert read_json(stored / "norms.json")["image_protocol"] == "resize"  # written anew


# --- hand-made mask runs: 0/0 images, several runs, no model ---------------------------------


def hand_norms(root: Path, run_dir: Path, outlier_images: set[int]) -> Path:
    """norms.json + tokens.npz for a hand-made run (2x2 resized grid): norm 10 everywhere,
    100 on token (0, 0) of the images in ``outlier_images``; threshold 50."""
    lines = lines_of(run_dir)
    folder = root / "norms"
    folder.mkdir()
    norms = [np.where(np.arange(4) == 0, 100.0 if i in outlier_images else 10.0, 10.0)
             for i in range(len(lines))]
    TokenMaps.from_images([line["image_id"] for line in lines], [(2, 2)] * len(lines),
                          {11: norms}, [np.zeros(4)] * len(lines)).save(folder / "tokens.npz")
    (folder / "norms.json").write_text(json.dumps({
        "kind": "lostreg-norms", "model": "dinov2_vits14", "dataset": "ecssd",
        "weights": {"source": "hub", "sha256": "ab" * 32}, "image_protocol": "resize",
        "primary_layer": 11, "threshold": 50.0, "tokens_file": "tokens.npz"}))
    return folder / "norms.json"


def test_a_0_0_image_is_left_out_of_the_means_and_counted(tmp_path) -> None:
    folder = write_mask_run(tmp_path / "runs", "plain", [0, 3, None, 1, 6], empty_images=1)
    norms = hand_norms(tmp_path, folder, outlier_images={0, 1, 3})
    result = attribute_mask_run(folder, norms)
    lines = lines_of(folder)
    assert lines[0]["sal_iou"] is None and result.rows[0]["iou"] is None
    summary = {row["group"]: row for row in result.summary}
    with_outliers = summary["image has outliers"]
    assert (with_outliers["n_images"], with_outliers["n_iou_undefined"]) == (3, 1)
    assert with_outliers["mean_iou"] == pytest.approx(
        100 * np.mean([lines[1]["sal_iou"], lines[3]["sal_iou"]]))
    assert summary["image has none"]["mean_iou"] == pytest.approx(
        100 * np.mean([lines[2]["sal_iou"], lines[4]["sal_iou"]]))
    with open(folder / "analysis" / "attribution.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["iou"] == ""


def test_several_mask_runs_per_image_iou_side_by_side(tmp_path, capsys) -> None:
    shifts = {"base": [0, 3, None, 1], "other": [2, 0, 4, 1]}
    params = ({"tau": 0.2, "eps": 1e-5, "binary_graph": True},
              {"k_patches": 100, "gram_bias": 0.0})
    folders = [write_mask_run(tmp_path / "runs", name, values, method=method,
                              method_params=method_params, empty_images=1)
               for (name, values), method, method_params
               in zip(shifts.items(), ("tokencut", "lost"), params, strict=True)]
    table = iou_table(folders, tmp_path / "out")
    per_run = [lines_of(folder) for folder in folders]
    for number, row in enumerate(table.rows):
        ious = [lines[number]["sal_iou"] for lines in per_run]
        assert [row["iou_tokencut"], row["iou_lost"]] == ious
        defined = [v for v in ious if v is not None]
        best = {label for label, v in zip(("tokencut", "lost"), ious, strict=True)
                if defined and v == max(defined)}
        assert set(filter(None, row["best"].split(";"))) == best
    shared = [n for n in range(4) if all(lines[n]["sal_iou"] is not None for lines in per_run)]
    for summary, lines in zip(table.summary, per_run, strict=True):
        assert summary["n_iou_undefined"] == 1
        assert summary["mean_iou_shared"] == pytest.approx(
            100 * np.mean([lines[n]["sal_iou"] for n in shared]))
    assert analyze(["attribution", "--run", *map(str, folders), "--hits-only", "--output",
                    str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "ious.csv" in out and "TokenCut's per-image IoU" in out
    assert (tmp_path / "cli" / "ious.csv").read_text() == (tmp_path / "out" / "ious.csv"
                                                           ).read_text()


def test_attribution_of_two_finished_mask_runs_reads_each_file_once(tree, tmp_path,
                                                                   monkeypatch) -> None:
    """Each finished mask run's predictions.jsonl is read once by ``attribution`` of two runs:
    its lines checked against metrics.json, attributed and compared from that one read."""
    folders = [finished_copy(run_of(tree, method), tmp_path / "runs")
               for method in ("tokencut", "lost")]
    reads = count_reads(monkeypatch, "predictions.jsonl")
    assert analyze(["attribution", "--run", *map(str, folders), "--device", "cpu",
                    "--no-progress", "--num-workers", "0", "--output",
                    str(tmp_path / "compare")]) == 0
    assert all((folder / "analysis" / "attribution.csv").is_file() for folder in folders)
    assert (tmp_path / "compare" / "ious.csv").is_file()
    assert reads == {folder / "predictions.jsonl": 1 for folder in folders}


def test_register_neurons_on_a_saliency_set_sees_its_resized_images(tree, monkeypatch) -> None:
    """``register-neurons`` feeds a saliency set's images as its runs do (resized to a patch
    multiple, not padded) in both passes: the automatic threshold's norm pass (no
    ``threshold``: ``_threshold_from_norms`` runs) and the scoring pass, so the outliers it
    explains are the runs' outliers."""
    from lostreg.datasets import load_dataset
    from lostreg.reports.analysis import collect, neurons
    from lostreg.reports.analysis import norms as norms_module

    fed: dict[str, list[tuple[int, int]]] = {"threshold": [], "scores": []}
    split_inputs: list[int] = []
    real_outputs, real_scores = collect.block_outputs, neurons.accumulate_scores

    def recording_outputs(model, images, layers):
        fed["threshold"].extend(tuple(images.shape[-2:]) for _ in range(len(images)))
        return real_outputs(model, images, layers)

    def recording_scores(backbone, batches, *args):
        kept = list(batches)
        fed["scores"].extend(tuple(batch.shape[-2:]) for batch in kept for _ in range(len(batch)))
        return real_scores(backbone, kept, *args)

    def fixed_split(values):
        split_inputs.append(int(np.asarray(values).size))
        return norms_module.ThresholdSplit(1.0, True, "fixed by the test")

    monkeypatch.setattr(collect, "block_outputs", recording_outputs)
    monkeypatch.setattr(neurons, "accumulate_scores", recording_scores)
    monkeypatch.setattr(norms_module, "split_threshold", fixed_split)
    index = load_dataset("ecssd", tree / "data", download=False)
    config = neurons.NeuronSearchConfig(model=SPEC.name, output=tree / "neurons.json",
                                        device="cpu", threshold=None, num_workers=0,
                                        progress=False)
    data, _ = neurons.find_register_neurons(config, create_backbone(SPEC, "random"), index)
    assert data["provenance"]["threshold"] == 1.0
    assert data["provenance"]["threshold_source"] == "auto (norm analysis)"
    expected = []
    for record in index.records:
        width, height = resize_to_patch_multiple(Image.open(record.path), 14).size
        expected.append((height, width))
    assert sorted(fed["threshold"]) == sorted(expected)
    assert sorted(fed["scores"]) == sorted(expected)
    assert split_inputs == [sum(h * w // 14 ** 2 for h, w in expected)]  # every resized token
    assert any(h % 14 or w % 14 for w, h in (Image.open(r.path).size for r in index.records))


# --- unfinished mask runs: analysed on the images they have, as box runs are (issue 20) --------


def unfinished_warning(folder: Path, images: int) -> str:
    return (f"warning: {folder} is unfinished (no metrics.json); using the {images} images it "
            "has predicted so far")


def test_an_unfinished_mask_run_is_shown_on_the_images_it_has(tree, figures, tmp_path,
                                                              capsys) -> None:
    folder = unfinished_copy(run_of(tree, "tokencut"), tmp_path, keep=2)
    assert analyze(["show", "--run", str(folder), "--device", "cpu", "--no-progress",
                    "--output", str(tmp_path / "show")]) == 0
    assert capsys.readouterr().err.splitlines() == [unfinished_warning(folder, 2)]
    lines = lines_of(run_of(tree, "tokencut"))[:2]
    assert len(figures) == 2  # the torn third line is no image
    for fig, line in zip(figures, lines, strict=True):
        mask_ax = [ax for ax in fig.axes if ax.get_images()][2]
        assert np.array_equal(mask_ax.get_images()[0].get_array(),
                              pycoco_mask(line).astype(np.float32))
        assert f"IoU {line['sal_iou']:.3f}" in " ".join(mask_ax.get_title().split())
    page = (tmp_path / "show" / "index.html").read_text()
    assert page.count("<figure") == 2 and "differs" not in page


def test_an_unfinished_mask_run_gets_its_attribution(tree, tmp_path, capsys) -> None:
    folder = unfinished_copy(run_of(tree, "lost"), tmp_path, keep=3)
    assert analyze(["attribution", "--run", str(folder), "--device", "cpu", "--no-progress",
                    "--num-workers", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "unfinished" in line] == [unfinished_warning(folder, 3)]
    lines = lines_of(run_of(tree, "lost"))[:3]
    with open(folder / "analysis" / "attribution.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image_id"] for row in rows] == [line["image_id"] for line in lines]
    assert [float(row["iou"]) for row in rows] == [line["sal_iou"] for line in lines]
    maps = TokenMaps.load(folder / "analysis" / "norms" / "tokens.npz")
    assert maps.image_ids == [line["image_id"] for line in lines]  # only the images it has
    with open(folder / "analysis" / "attribution_summary.csv", newline="") as handle:
        everything = next(row for row in csv.DictReader(handle) if row["group"] == "all images")
    assert int(everything["n_images"]) == 3
    assert float(everything["mean_iou"]) == pytest.approx(
        100 * np.mean([line["sal_iou"] for line in lines]))


def edit_line(folder: Path, number: int, **values) -> None:
    lines = (folder / "predictions.jsonl").read_text().splitlines(keepends=True)
    lines[number - 1] = json.dumps({**json.loads(lines[number - 1]), **values}) + "\n"
    (folder / "predictions.jsonl").write_text("".join(lines))


@pytest.mark.parametrize("command", ["show", "attribution"])
def test_an_unfinished_mask_run_still_has_every_line_checked(tree, tmp_path, capsys,
                                                             command) -> None:
    folder = unfinished_copy(run_of(tree, "tokencut"), tmp_path, keep=3)
    edit_line(folder, 2, sal_iou=0.123456)  # no metrics.json to catch it: the line's counts do
    assert analyze([command, "--run", str(folder), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{folder / 'predictions.jsonl'}:2: 'sal_iou' is 0.123456" in err[0]
    assert not (folder / "analysis").exists()


def drop_last_line(folder: Path) -> str:
    lines = (folder / "predictions.jsonl").read_text().splitlines(keepends=True)
    (folder / "predictions.jsonl").write_text("".join(lines[:-1]))
    return f"{IMAGES - 1} images but metrics.json says {IMAGES}"


def raise_metrics_iou(folder: Path) -> str:
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["iou"] = round(metrics["iou"] + 1.0, 4)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return f"'iou' is {metrics['iou']} but the predictions give"


@pytest.mark.parametrize("tamper", [drop_last_line, raise_metrics_iou])
@pytest.mark.parametrize("command", ["show", "attribution"])
def test_a_finished_mask_run_whose_files_disagree_is_still_refused(tree, tmp_path, capsys,
                                                                   command, tamper) -> None:
    source = run_of(tree, "tokencut")
    folder = tmp_path / source.name
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("analysis"))
    expected = tamper(folder)
    assert analyze([command, "--run", str(folder), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and expected in err[0] and "unfinished" not in err[0]
    assert not (folder / "analysis").exists()


def test_an_unfinished_box_run_gives_the_same_warning(tmp_path, capsys) -> None:
    from lostreg.reports.analysis.runs import load_run

    folder = box_run(tmp_path)
    (folder / "metrics.json").unlink()
    info = load_run(folder)
    assert capsys.readouterr().err.splitlines() == [unfinished_warning(folder, 1)]
    assert [p["image_id"] for p in info.predictions] == ["00000"]


# --- an unfinished mask run's outputs say so, with its image count (issue 20 follow-up) ------


def test_an_unfinished_mask_run_is_named_so_in_every_output(tree, figures, tmp_path,
                                                           capsys) -> None:
    folder = unfinished_copy(run_of(tree, "tokencut"), tmp_path, keep=2)
    expected = mark(2, IMAGES)  # a partial dataset of 4 images: recorded in its identity
    assert analyze(["show", "--run", str(folder), "--device", "cpu", "--no-progress"]) == 0
    page = (folder / "analysis" / "show" / "index.html").read_text()
    assert f'<p class="warn">{html.escape(expected)}</p>' in page
    assert len(figures) == 2 and all(footer(fig) == f"{SMOKE} {expected}" for fig in figures)
    assert all(text_problems(fig) == [] for fig in figures)
    assert analyze(["attribution", "--run", str(folder), "--device", "cpu", "--no-progress",
                    "--num-workers", "0"]) == 0
    assert f"**{expected}.**" in (folder / "analysis" / "attribution.md").read_text()
    assert read_json(folder / "analysis" / "attribution.json")["unfinished_run"] == {
        "images_predicted": 2, "split_images": IMAGES, "note": expected}
    capsys.readouterr()


def test_a_finished_mask_run_gets_only_what_it_got_before(tree, figures, tmp_path) -> None:
    """The same mask run finished and unfinished with every line: its outputs differ only by
    the unfinished mark."""
    assert_only_the_mark_differs(
        analyze, finished_copy(run_of(tree, "lost"), tmp_path / "finished"),
        unfinished_copy(run_of(tree, "lost"), tmp_path / "unfinished"),
        figures, mark(IMAGES, IMAGES), attribution_args=["--device", "cpu"])


def test_several_mask_runs_name_each_unfinished_run_by_its_label(tree, figures, tmp_path,
                                                                 capsys) -> None:
    unfinished = unfinished_copy(run_of(tree, "tokencut"), tmp_path, keep=3)
    finished = finished_copy(run_of(tree, "lost"), tmp_path / "finished")
    expected = mark(3, IMAGES, "tokencut")
    out = tmp_path / "compare"
    assert analyze(["attribution", "--hits-only", "--run", str(unfinished), str(finished),
                    "--output", str(out)]) == 0
    table = (out / "ious.md").read_text()
    assert f"**{expected}.**" in table and table.count("UNFINISHED") == 1
    assert [record.get("unfinished_run") for record in read_json(out / "runs.json")] == [
        {"images_predicted": 3, "split_images": IMAGES, "note": mark(3, IMAGES)}, None]
    assert analyze(["show", "--run", str(unfinished), str(finished), "--no-progress",
                    "--output", str(out / "show")]) == 0
    page = (out / "show" / "index.html").read_text()
    assert f'<p class="warn">{html.escape(expected)}</p>' in page
    assert page.count("UNFINISHED") == 1
    assert len(figures) == 3 and all(footer(fig) == f"{SMOKE} {expected}" for fig in figures)
    assert [record.get("unfinished_run", {}).get("images_predicted") for record in
            read_json(out / "show" / "runs.json")] == [3, None]
    capsys.readouterr()

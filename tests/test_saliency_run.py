"""Saliency runs end to end on generated trees: each method's mask against a per-image
reference written like the published code, the refine modes, the folder rescored alone, bad
settings, the suite."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference_hooks import last_block_tokens
from saliency_references import reference_bilateral
from torchvision import transforms

from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone, get_backbone_spec
from lostreg.datasets import load_dataset
from lostreg.datasets.mask_demo import generate_mask_tree
from lostreg.evaluation.rle import decode
from lostreg.evaluation.saliency import image_counts, read_gray_mask
from lostreg.evaluation.saliency_metric import SALIENCY
from lostreg.io import read_jsonl
from lostreg.methods.bilateral import bilateral_refine
from lostreg.methods.lost import lost_reference_with_mask
from lostreg.methods.tokencut import reference_robustness, tokencut_reference
from lostreg.run import main
from lostreg.runs.config import RunConfig, pass_key
from lostreg.runs.grid import expand_sweep
from lostreg.runs.predictions import load_predictions
from lostreg.runs.suites import get_suite

SPEC = BackboneSpec("tiny_saliency", "vit_small_patch16_224.dino", "dino", 16, 0,
                    pos_embed="dino", model_kwargs=dict(depth=2, embed_dim=48, num_heads=6))
IMAGES = 5
REFINES = ("none", "bilateral", "bilateral-binary")


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


def cli(root: Path, out: str, *extra: str) -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", "ecssd",
            "--data-root", str(root / "data"), "--output", str(root / out), "--num-workers", "0",
            "--no-progress", "--allow-partial-dataset", *extra]


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory, tiny_model) -> tuple[Path, dict[tuple[str, str], Path]]:
    """Three methods x three refinements on one generated tree, in one pass."""
    root = tmp_path_factory.mktemp("saliency")
    generate_mask_tree(root / "data", "ecssd", IMAGES, seed=1, sizes=(40, 72), grey_borders=True)
    assert main(cli(root, "runs", "--method", "lost,tokencut,dinoseg",
                    "--refine", ",".join(REFINES))) == 0
    runs = {}
    for run_dir in (root / "runs").iterdir():
        config = json.loads((run_dir / "config.json").read_text())
        runs[(config["method"], config["refine"])] = run_dir
    return root, runs


def reference_features(backbone, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and class-token attention of a resized image as TokenCut's scripts get them:
    torchvision transforms, hooks on timm's own (unfused) forward of the last block."""
    tensor = transforms.Compose([transforms.ToTensor(),
                                 transforms.Normalize(backbone.mean, backbone.std)])(image)
    keys, attention = last_block_tokens(backbone, tensor[None])
    return keys[1:], attention[:, 0, 1:]  # (patches, D), (heads, patches)


def resize_pil(image: Image.Image, patch: int) -> Image.Image:
    """TokenCut's ``utils.resize_pil``, as it is written."""
    w, h = image.size
    new_w, new_h = int(round(w / patch)) * patch, int(round(h / patch)) * patch
    return image.resize((new_w, new_h), resample=Image.LANCZOS)


def dino_kept(cls_attention: torch.Tensor, head: int = 4, mass: float = 0.6) -> np.ndarray:
    """DINO's thresholded attention (``visualize_attention.py`` / LOST's ``dino_seg``): the
    patches holding ``mass`` of the head's attention (stable sort, as lostreg documents)."""
    val, idx = torch.sort(cls_attention, stable=True)
    val /= torch.sum(val, dim=1, keepdim=True)
    th_attn = torch.cumsum(val, dim=1) > (1 - mass)
    idx2 = torch.argsort(idx)
    for h in range(th_attn.shape[0]):
        th_attn[h] = th_attn[h][idx2[h]]
    return th_attn[head].numpy()


def upsample(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mask[None, None], size=(h, w), mode='nearest')`` as TokenCut calls it
    (a float32 tensor: TokenCut's CUDA kernel computes the indices in float32)."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="nearest")[0, 0].numpy().astype(np.float64)


def reference_masks(record, backbone) -> tuple[dict[str, np.ndarray], bool]:
    """Each method's upsampled mask for one image by the reference steps, and whether
    TokenCut's answer is robust (defined beyond any solver's rounding)."""
    image = Image.open(record.path).convert("RGB")
    resized = resize_pil(image, 16)
    keys, cls_attention = reference_features(backbone, resized)
    grid = (resized.height // 16, resized.width // 16)
    size = (resized.height, resized.width)
    tokencut = tokencut_reference(keys, grid, 16, size)
    robust, _ = reference_robustness(keys, tokencut.mask)
    _, lost_mask = lost_reference_with_mask(keys, grid, 16, size)
    patch_masks = {"tokencut": tokencut.mask.numpy(), "lost": lost_mask.numpy(),
                   "dinoseg": dino_kept(cls_attention).reshape(grid)}
    return {m: upsample(mask, (image.height, image.width))
            for m, mask in patch_masks.items()}, robust


def test_one_pass_serves_every_method_and_refinement(grid_runs) -> None:
    _, runs = grid_runs
    assert set(runs) == {(m, r) for m in ("lost", "tokencut", "dinoseg") for r in REFINES}
    for (_, refine), run_dir in runs.items():
        config = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert config["mask_protocol"] == metrics["mask_protocol"] == "tokencut-saliency"
        assert config["identity"]["refine"] == refine and config["target"] == "mask"
        assert (refine in run_dir.name) == (refine != "none")
        assert metrics["seconds"]["runs_in_pass"] == 9
        assert metrics["seconds"]["backbone_images"] == IMAGES  # one forward per image
        assert metrics["data_checks"]["grey_gt_masks"] == 2  # generated with grey borders


def test_each_methods_mask_is_the_published_protocols(grid_runs) -> None:
    root, runs = grid_runs
    backbone = create_backbone(SPEC, "random")
    index = load_dataset("ecssd", root / "data", download=False)
    lines = {key: list(read_jsonl(run_dir / "predictions.jsonl")) for key, run_dir in runs.items()}
    compared = {"tokencut": 0, "lost": 0, "dinoseg": 0}
    for position, record in enumerate(index.records):
        expected, robust = reference_masks(record, backbone)
        gray = read_gray_mask(record.gt_mask)
        image = np.array(Image.open(record.path).convert("RGB"))
        for method, reference in expected.items():
            if method == "tokencut" and not robust:
                continue
            compared[method] += 1
            line = lines[(method, "none")][position]
            assert line["image_id"] == record.image_id
            assert np.array_equal(decode(line["pred_mask_rle"]), reference > 0.5), method
            assert line["sal_counts"] == image_counts(reference, gray).as_json()
            soft, _ = reference_bilateral(image, reference)
            refined = lines[(method, "bilateral")][position]
            assert np.array_equal(decode(refined["pred_mask_rle"]), soft > 0.5)
            assert refined["sal_iou"] == pytest.approx(
                SALIENCY.score({"sal_counts": image_counts(soft, gray).as_json()}, None)
                ["sal_iou"], abs=1e-6)
            binary = lines[(method, "bilateral-binary")][position]
            corrected = bilateral_refine(image, reference, component_rule="largest").binary
            assert np.array_equal(decode(binary["pred_mask_rle"]), corrected)
    assert compared["lost"] == compared["dinoseg"] == IMAGES and compared["tokencut"] >= 3


def test_metrics_are_recomputed_from_the_folder_alone(grid_runs) -> None:
    from lostreg.runs.folder import line_format

    root, runs = grid_runs
    index = load_dataset("ecssd", root / "data", download=False)
    fmt = line_format(index, 16)
    for run_dir in runs.values():
        written = json.loads((run_dir / "metrics.json").read_text())
        loaded = load_predictions(run_dir, None, fmt=fmt, repair=False)  # no dataset
        assert not loaded.problems
        ordered = [loaded.lines[r.image_id] for r in index.records]
        recomputed = SALIENCY.evaluate(ordered)
        assert {k: written[k] for k in recomputed} == recomputed


def test_a_tampered_line_is_recomputed_and_the_rerun_equals_the_first(grid_runs, capsys) -> None:
    root, runs = grid_runs
    run_dir = runs[("tokencut", "bilateral")]
    path = run_dir / "predictions.jsonl"
    original = path.read_bytes()
    lines = [json.loads(line) for line in original.splitlines()]
    lines[1]["sal_counts"]["pixels"] += 1  # no longer adds up: a bad line
    lines[2]["sal_iou"] = 0.123  # a wrong per-image score: recomputed from the counts
    path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    assert main(cli(root, "runs", "--method", "tokencut", "--refine", "bilateral")) == 0
    assert path.read_bytes() == original
    err = capsys.readouterr().err
    assert "1 bad, 1 corrected" in err and "quarantine.jsonl" in err


def test_the_issue_command_runs_end_to_end(tmp_path) -> None:
    """``--dataset ecssd --method tokencut --refine bilateral --model dino_vits16``, offline
    on a generated tree (random weights: a smoke run), then again: already finished."""
    generate_mask_tree(tmp_path / "data", "ecssd", 3, sizes=(48, 80))
    argv = ["--dataset", "ecssd", "--method", "tokencut", "--refine", "bilateral", "--model",
            "dino_vits16", "--weights", "random", "--data-root", str(tmp_path / "data"),
            "--output", str(tmp_path / "runs"), "--allow-partial-dataset", "--no-progress"]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("smoke-ecssd-dino_vits16-tokencut-keys-bilateral-partial3-")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert main(argv) == 0
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize(("extra", "needle"), [
    (["--dataset", "demo", "--refine", "bilateral"],
     "--refine bilateral: only for the saliency datasets (ecssd, duts_te, dut_omron); demo is "
     "scored on boxes"),
    (["--refine", "crf"], "--refine 'crf': 'crf' is not a valid value (expected one of none, "
                          "bilateral, bilateral-binary)"),
])
def test_bad_refine_is_one_line(tmp_path, capsys, extra, needle) -> None:
    generate_mask_tree(tmp_path / "data", "ecssd", 1)
    assert main(cli(tmp_path, "runs", *extra)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "runs").exists()


def test_partial_tree_is_refused_without_the_flag(tmp_path, capsys) -> None:
    generate_mask_tree(tmp_path / "data", "ecssd", 2)
    argv = [a for a in cli(tmp_path, "runs") if a != "--allow-partial-dataset"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ecssd test lists 2 images, expected 1000" in err and "--allow-partial-dataset" in err


def test_saliency_suite_contents() -> None:
    suite = get_suite("saliency")
    models = ["dino_vits16", "dinov2_vitl14", "dinov2_vitl14_reg4", "dinov2_vitl14+ttr",
              "dinov3_vits16"]
    assert list(suite.pairs) == [(m, d) for m in models for d in ("ecssd", "duts_te", "dut_omron")]
    assert suite.methods == ("lost", "tokencut", "dinoseg")
    for model in models:
        get_backbone_spec(model)  # every name resolves (+ttr with its shipped neuron list)
    base = RunConfig(dataset="ecssd")
    sweep = expand_sweep(base, methods=suite.methods,
                         refine_by_method={m: list(v) for m, v in suite.refine.items()})
    assert [(c.method, c.refine) for c in sweep] == [
        ("lost", "none"), ("tokencut", "none"), ("tokencut", "bilateral"), ("dinoseg", "none")]
    assert len({json.dumps(pass_key(c), default=str) for c in sweep}) == 1  # one pass
    flagged = expand_sweep(base, methods=suite.methods, refines=["bilateral"],
                           refine_by_method=None)
    assert {c.refine for c in flagged} == {"bilateral"}
    assert dataclasses.replace(base, refine="bilateral") != base


def test_resized_features_have_their_own_cache_and_a_cached_rerun_is_exact(
        tmp_path, model_builds) -> None:
    generate_mask_tree(tmp_path / "data", "ecssd", 3)
    cache = ("--cache-features", str(tmp_path / "cache"), "--method", "tokencut")
    assert main(cli(tmp_path, "cached", *cache)) == 0
    assert main(cli(tmp_path, "again", *cache)) == 0
    assert model_builds == [SPEC.name]  # the second run read every feature from the cache
    (key,) = (tmp_path / "cache").glob("*/key.json")
    assert json.loads(key.read_text())["image_protocol"] == "resize"
    (first,), (second,) = (tmp_path / "cached").iterdir(), (tmp_path / "again").iterdir()
    assert (first / "predictions.jsonl").read_bytes() == (second / "predictions.jsonl").read_bytes()


def test_bench_saliency_runs_on_a_tiny_tree(tmp_path, capsys) -> None:
    from benchmarks import bench_saliency

    assert bench_saliency.main(["--model", SPEC.name, "--images", "3", "--sides", "40,60",
                                "--size-scale", "1", "--num-workers", "0",
                                "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_images"] == 3 and set(result["runs"]) == {
        "lost/none", "tokencut/none", "tokencut/bilateral", "dinoseg/none"}
    assert "ratio run / bare forward" in capsys.readouterr().out


def test_mask_threads_write_the_same_lines(tmp_path, monkeypatch) -> None:
    """On a GPU the per-image mask work is spread over threads; the lines are the same."""
    import lostreg.runs.sweep as sweep

    generate_mask_tree(tmp_path / "data", "ecssd", 4)
    extra = ("--method", "lost,tokencut", "--refine", "none,bilateral", "--batch-size", "4")
    assert main(cli(tmp_path, "one", *extra)) == 0
    monkeypatch.setattr(sweep, "mask_threads", lambda device_type: 3)
    assert main(cli(tmp_path, "three", *extra)) == 0
    for run_dir in (tmp_path / "one").iterdir():
        other = tmp_path / "three" / run_dir.name
        assert (run_dir / "predictions.jsonl").read_bytes() == \
            (other / "predictions.jsonl").read_bytes()


def test_an_image_too_small_to_resize_is_one_line_and_the_rest_is_kept(tmp_path, capsys) -> None:
    generate_mask_tree(tmp_path / "data", "ecssd", 3)
    Image.new("RGB", (8, 40)).save(tmp_path / "data" / "ECSSD" / "images" / "00001.jpg")
    Image.new("L", (8, 40)).save(tmp_path / "data" / "ECSSD" / "ground_truth_mask" / "00001.png")
    assert main(cli(tmp_path, "runs", "--method", "tokencut")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "00001.jpg" in err[0] and "rounds to no 16-px patch" in err[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [line["image_id"] for line in read_jsonl(run_dir / "predictions.jsonl")] == [
        "00000", "00002"]

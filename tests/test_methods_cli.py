"""``--method lost,tokencut,dinoseg`` end to end, checked against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_hooks import last_block_tokens
from torchvision import transforms

from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone
from lostreg.datasets import load_dataset
from lostreg.io import read_jsonl
from lostreg.methods.dinoseg import dinoseg_reference
from lostreg.methods.lost import lost_reference
from lostreg.methods.tokencut import reference_robustness, tokencut_reference
from lostreg.run import main

SPEC = BackboneSpec("tiny_methods", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=2, embed_dim=48, num_heads=6))
LIMIT = 8


@pytest.fixture(autouse=True)
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


def cli(root: Path, out: str, *extra: str) -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / out),
            "--num-workers", "0", "--no-progress", "--limit", str(LIMIT), *extra]


def independent_features(backbone, path: Path) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """Keys and class-token attention the way the reference scripts get them: torchvision
    transforms, zero padding, hooks on timm's own (unfused) forward, LOST's reshape."""
    img = Image.open(path).convert("RGB")
    tensor = transforms.Compose([transforms.ToTensor(),
                                 transforms.Normalize(backbone.mean, backbone.std)])(img)
    h, w = tensor.shape[1:]
    p = backbone.patch_size
    padded = torch.zeros(3, int(np.ceil(h / p) * p), int(np.ceil(w / p) * p))
    padded[:, :h, :w] = tensor
    tokens, attention = last_block_tokens(backbone, padded[None])
    keys = tokens[5:]
    cls_attention = attention[:, 0, 5:].transpose(0, 1)  # (patches, heads)
    grid = (padded.shape[1] // p, padded.shape[2] // p)
    return keys, cls_attention, grid, (h, w)


def test_three_methods_share_one_pass_and_match_their_references(tmp_path, model_builds) -> None:
    assert main(cli(tmp_path, "runs", "--method", "lost,tokencut,dinoseg",
                    "--dinoseg-variant", "reference,corrected")) == 0
    assert model_builds == [SPEC.name]  # one forward pass served all four runs
    runs = {}
    for run_dir in (tmp_path / "runs").iterdir():
        config = json.loads((run_dir / "config.json").read_text())
        key = config["method"] + ("-" + config["method_params"].get("dinoseg_variant", "")
                                  if config["method"] == "dinoseg" else "")
        runs[key] = (config, list(read_jsonl(run_dir / "predictions.jsonl")))
        assert (run_dir / "metrics.json").is_file()
    assert set(runs) == {"lost", "tokencut", "dinoseg-reference", "dinoseg-corrected"}
    assert runs["tokencut"][0]["feature"] == "k" and runs["dinoseg-reference"][0]["feature"] == "attn"
    backbone = create_backbone(SPEC, "random")
    index = load_dataset("demo", tmp_path / "data")
    robust = 0
    for position, record in enumerate(index.records[:LIMIT]):
        keys, cls_attention, grid, size = independent_features(backbone, record.path)
        line = {name: lines[position] for name, (_, lines) in runs.items()}
        assert all(entry["image_id"] == record.image_id for entry in line.values())
        assert line["lost"]["box"] == lost_reference(keys, grid, 14, size).box
        reference = tokencut_reference(keys, grid, 14, size)
        box_ok, seed_ok = reference_robustness(keys, reference.mask)
        if box_ok:
            robust += 1
            assert line["tokencut"]["box"] == reference.box.tolist(), record.image_id
        if seed_ok:
            assert line["tokencut"]["seed"] == list(divmod(int(reference.seed), grid[1]))
        for variant in ("reference", "corrected"):
            expected = dinoseg_reference(cls_attention, grid, 14, size, variant=variant)
            assert line[f"dinoseg-{variant}"]["box"] == expected.box.tolist(), (variant, position)
            assert line[f"dinoseg-{variant}"]["seed"] is None
    assert robust >= LIMIT // 2  # the TokenCut comparison is not vacuous


def test_tokencut_on_cached_keys_never_builds_the_model(tmp_path, model_builds) -> None:
    cache = ("--cache-features", str(tmp_path / "cache"))
    assert main(cli(tmp_path, "runs", *cache)) == 0  # LOST on k fills the cache
    assert model_builds == [SPEC.name]
    assert main(cli(tmp_path, "runs", *cache, "--method", "tokencut", "--tau", "0.2,0.3")) == 0
    assert model_builds == [SPEC.name]
    assert main(cli(tmp_path, "plain", "--method", "tokencut", "--tau", "0.2,0.3")) == 0
    for plain in (tmp_path / "plain").iterdir():
        cached = tmp_path / "runs" / plain.name
        assert (cached / "predictions.jsonl").read_bytes() == (plain / "predictions.jsonl").read_bytes()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--tau", "0.3"], "--tau is a setting of tokencut; add it to --method"),
    (["--method", "dinoseg", "--features", "k"], "--method dinoseg reads attn, not --features k"),
    (["--method", "dinoseg", "--dinoseg-head", "9"], "head"),
    (["--method", "tokencut", "--eps", "x"], "--eps 'x'"),
    (["--method", "dinoseg", "--dinoseg-variant", "fixed"], "expected one of reference, corrected"),
])
def test_method_settings_errors_are_one_line(tmp_path, capsys, extra, needle) -> None:
    assert main(cli(tmp_path, "runs", *extra)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning")]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err

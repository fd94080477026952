"""Visual report pieces: recomputed maps, panel rendering, and a safe static index page."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lostreg.backbones import BackboneSpec, create_backbone
from lostreg.features.extract import FEATURE_KINDS, FeatureRequest, extract, extract_features, preprocess
from lostreg.methods.lost import lost, lost_reference_with_mask
from lostreg.reports.analysis.norms import patch_token_norms
from lostreg.reports.analysis.report import compute_image_maps, method_features, render_panel, write_index
from lostreg.reports.analysis.runs import RunMethod
from lostreg.reports.analysis.tokens import block_outputs, last_block_readout

TINY = dict(depth=2, embed_dim=48, num_heads=3)
LOST_K = RunMethod("lost", {"k_patches": 100, "gram_bias": 0.0}, "k")


@pytest.fixture(scope="module")
def reg4():
    spec = BackboneSpec("tiny_report_reg4", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14,
                        4, pos_embed="dinov2_reg", model_kwargs=TINY)
    return create_backbone(spec, "random")


def picture(height: int = 60, width: int = 90) -> Image.Image:
    array = np.full((height, width, 3), 200, dtype=np.uint8)
    array[15:45, 30:70] = (200, 30, 30)
    return Image.fromarray(array)


def test_image_maps_match_the_pipeline(reg4) -> None:
    image = picture()
    maps = compute_image_maps(reg4, image, LOST_K, torch.device("cpu"))
    assert maps.grid == (5, 7) and maps.size == (60, 90)
    assert maps.prefix_names == ["CLS", "register 1", "register 2", "register 3", "register 4"]
    assert maps.attention.shape == (5, 5, 7)
    assert np.allclose(maps.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)
    tensor, size = preprocess(image, reg4.mean, reg4.std, 14)
    feats = extract_features(reg4, tensor[None], "k")[0]
    reference = lost(feats, (5, 7), 14, size)
    assert maps.result.box == reference.box
    assert maps.result.seed == divmod(reference.seed, 7)
    assert np.array_equal(maps.degrees, reference.degrees.reshape(5, 7).float().numpy())
    _, component = lost_reference_with_mask(feats, (5, 7), 14, size)
    assert np.array_equal(maps.result.mask, component.numpy())
    _, outputs = block_outputs(reg4.model, tensor[None], [1])
    norms = patch_token_norms(outputs[1], reg4.num_prefix_tokens)[0].reshape(5, 7).numpy()
    assert np.allclose(maps.norms, norms)


def test_model_without_registers_shows_only_cls() -> None:
    spec = BackboneSpec("tiny_report_dino", "vit_small_patch16_224.dino", "dino", 16, 0,
                        pos_embed="dino", model_kwargs=TINY)
    backbone = create_backbone(spec, "random")
    maps = compute_image_maps(backbone, picture(40, 50), LOST_K, torch.device("cpu"))
    assert maps.prefix_names == ["CLS"] and maps.attention.shape == (1, 3, 4)


@pytest.mark.parametrize("request_", [FeatureRequest("q"), FeatureRequest("v"),
                                      FeatureRequest("attn"), FeatureRequest("k", 0)])
def test_method_features_equal_the_pipeline_extract(reg4, request_) -> None:
    """Last-block kinds derived from the readout's qkv (no second forward) and other layers
    (through extract) are exactly what the run pipeline computes."""
    tensor, _ = preprocess(picture(), reg4.mean, reg4.std, 14)
    images = tensor[None]
    qkv, _ = last_block_readout(reg4.model, images)
    ours = method_features(reg4, images, [request_], last_qkv=qkv)[request_]
    assert torch.equal(ours, extract(reg4, images, [request_])[request_])
    assert request_.kind in FEATURE_KINDS


def test_l2_normalised_runs_are_recomputed_on_normalised_features(reg4) -> None:
    image = picture()
    normalised = RunMethod("lost", {"k_patches": 100, "gram_bias": 0.0}, "k", -1, "l2")
    maps = compute_image_maps(reg4, image, normalised, torch.device("cpu"))
    tensor, size = preprocess(image, reg4.mean, reg4.std, 14)
    feats = torch.nn.functional.normalize(extract_features(reg4, tensor[None], "k")[0], dim=-1)
    reference = lost(feats, (5, 7), 14, size)
    assert maps.result.box == reference.box
    assert np.array_equal(maps.degrees, reference.degrees.reshape(5, 7).float().numpy())


def test_render_panel_and_escaped_index(reg4, tmp_path) -> None:
    image = picture()
    maps = compute_image_maps(reg4, image, LOST_K, torch.device("cpu"))
    prediction = {"image_id": "x", "box": maps.result.box, "seed": list(maps.result.seed),
                  "hit": False, "gt_boxes": [[30, 15, 70, 45]]}
    assert maps.result.agrees_with(prediction)
    assert not maps.result.agrees_with({**prediction, "seed": None})
    threshold = float(np.median(maps.norms))  # marks about half the tokens
    render_panel(tmp_path / "a b.png", image, prediction, maps, 14, threshold, "title")
    with Image.open(tmp_path / "a b.png") as png:
        assert png.format == "PNG" and png.width > 300
    caption = '<script>alert(1)</script> & "quoted"'
    write_index(tmp_path / "index.html", "run <1>", ["SMOKE RUN x", "note & more"],
                [{"file": "a b.png", "caption": caption, "anchor": "img0"}])
    page = (tmp_path / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp;" in page
    assert 'src="a%20b.png"' in page and "run &lt;1&gt;" in page
    assert "note &amp; more" in page

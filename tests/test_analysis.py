"""Artifact statistics: threshold split, neighbour similarity, token maps, planted outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lostreg.backbones import BackboneSpec, create_backbone
from lostreg.datasets import load_dataset
from lostreg.errors import LostregError
from lostreg.features.extract import last_qkv, preprocess
from lostreg.reports.analysis.collect import collect_token_maps, layer_statistics, thresholds_for
from lostreg.reports.analysis.norms import (
    box_patch_slice,
    neighbour_similarity,
    otsu_split,
    outlier_mask,
    patch_token_norms,
    split_threshold,
    touches_mask,
)
from lostreg.reports.analysis.store import TokenMaps
from lostreg.reports.analysis.tokens import (
    attention_from_qkv,
    block_outputs,
    last_block_readout,
    resolve_layers,
)

TINY = dict(depth=3, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def tiny():
    spec = BackboneSpec("tiny_analysis_stats", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2",
                        14, 4, pos_embed="dinov2_reg", model_kwargs=TINY)
    return create_backbone(spec, "random")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load_dataset("demo", tmp_path_factory.mktemp("data"))


# --- threshold split -------------------------------------------------------------------------


def bimodal(rng, n: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal body around 30 plus a ``share`` of tokens ~10x higher; returns (norms, is_high)."""
    k = int(round(n * share))
    norms = np.concatenate([10 ** rng.normal(1.5, 0.12, n - k), 10 ** rng.normal(2.6, 0.08, k)])
    is_high = np.arange(n) >= n - k
    order = rng.permutation(n)
    return norms[order], is_high[order]


@pytest.mark.parametrize("share", [0.003, 0.02, 0.15])
def test_split_finds_the_small_high_norm_mode(share) -> None:
    norms, is_high = bimodal(np.random.default_rng(1), 50_000, share)
    split = split_threshold(norms)
    assert split.bimodal and split.threshold is not None
    # the modes are 11 log-sigmas apart: the split must recover membership exactly
    assert np.array_equal(outlier_mask(norms, split.threshold), is_high)
    assert split.high_weight == pytest.approx(share, rel=0.05)
    assert split.separation > 2 and split.valley_ratio < 0.5


def test_otsu_alone_misplaces_a_rare_mode() -> None:
    """Why the split is a mixture: Otsu cuts into the big mode when the small one is rare."""
    rng = np.random.default_rng(2)
    norms = np.concatenate([10 ** rng.normal(1.5, 0.15, 49_750), 10 ** rng.normal(2.5, 0.1, 250)])
    otsu = 10 ** otsu_split(np.log10(norms))
    assert (norms > otsu).sum() > 1000
    split = split_threshold(norms)
    assert abs(int((norms > split.threshold).sum()) - 250) < 10


@pytest.mark.parametrize("kind", ["lognormal", "gamma", "uniform_log", "heavy_tail", "constant"])
def test_split_returns_no_threshold_on_unimodal_norms(kind) -> None:
    rng = np.random.default_rng(3)
    n = 40_000
    norms = {
        "lognormal": lambda: 10 ** rng.normal(1.5, 0.2, n),
        "gamma": lambda: rng.gamma(2.0, 10.0, n),
        "uniform_log": lambda: 10 ** rng.uniform(0, 2, n),
        "heavy_tail": lambda: 10 ** (1 + 0.1 * rng.standard_t(3, n)),
        "constant": lambda: np.full(n, 7.0),
    }[kind]()
    split = split_threshold(norms)
    assert split.threshold is None and not split.bimodal
    assert not outlier_mask(norms, split.threshold).any()
    assert split.reason


def test_split_rejects_a_high_mode_holding_the_majority() -> None:
    rng = np.random.default_rng(4)
    norms = np.concatenate([10 ** rng.normal(1, 0.05, 3000), 10 ** rng.normal(2, 0.05, 7000)])
    split = split_threshold(norms)
    assert split.threshold is None and "not a rare" in split.reason


# --- neighbour similarity, masks, boxes ------------------------------------------------------


def test_neighbour_similarity_on_a_constructed_grid() -> None:
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    grid = e0.repeat(3, 4, 1)  # 3x4 grid, every cell along e0 ...
    grid[1, 1] = e1  # ... but one orthogonal cell
    grid[0, 3] = -2 * e0  # and one opposite cell in a corner
    sims = neighbour_similarity(grid)
    expected = torch.tensor([
        [1.0, 2 / 3, 1 / 3, -1.0],  # (0,2): +1 (left), -1 (corner), +1 (below)
        [2 / 3, 0.0, 3 / 4, 1 / 3],  # (1,1): all 4 neighbours orthogonal
        [1.0, 2 / 3, 1.0, 1.0],
    ])
    assert torch.allclose(sims, expected, atol=1e-6)
    batched = neighbour_similarity(torch.stack([grid, grid * 5]))
    assert torch.allclose(batched[0], expected, atol=1e-6)
    assert torch.allclose(batched[1], expected, atol=1e-6)  # scale-free
    assert torch.isnan(neighbour_similarity(torch.ones(1, 1, 3))).all()


def test_touches_and_box_slice() -> None:
    mask = np.zeros((4, 5), dtype=bool)
    mask[2, 3] = True
    assert touches_mask(mask, 2, 3) and touches_mask(mask, 1, 3) and touches_mask(mask, 2, 4)
    assert not touches_mask(mask, 1, 2) and not touches_mask(mask, 0, 0)
    # LOST boxes are patch unions clipped to the image: [x1,y1,x2,y2] = [16, 0, 50, 40] on a
    # 50x40 image with 16px patches covers columns 1..3 and rows 0..2
    rows, cols = box_patch_slice([16, 0, 50, 40], 16, (3, 4))
    assert (rows, cols) == (slice(0, 3), slice(1, 4))
    assert box_patch_slice([0, 0, 16, 16], 16, (3, 4)) == (slice(0, 1), slice(0, 1))


def test_outlier_mask_is_strict_and_none_means_nothing() -> None:
    norms = np.array([1.0, 5.0, 5.0001, 9.0])
    assert outlier_mask(norms, 5.0).tolist() == [False, False, True, True]
    assert not outlier_mask(norms, None).any()


def test_token_maps_roundtrip_and_threshold_mapping(tmp_path) -> None:
    rng = np.random.default_rng(5)
    grids = [(2, 3), (1, 1), (4, 2)]
    norms = {7: [rng.uniform(1, 100, r * c) for r, c in grids],
             11: [rng.uniform(1, 100, r * c) for r, c in grids]}
    sims = [rng.uniform(-1, 1, r * c) for r, c in grids]
    maps = TokenMaps.from_images(["a", "b/1", "c"], grids, norms, sims)
    maps.save(tmp_path / "t.npz")
    back = TokenMaps.load(tmp_path / "t.npz")
    assert back.image_ids == ["a", "b/1", "c"] and back.layers == [7, 11]
    assert back.position("c") == 2 and back.position("zz") is None
    for i, (r, c) in enumerate(grids):
        assert back.norm_map(i, 11).shape == (r, c)
        assert np.array_equal(back.norm_map(i, 7).ravel(),
                              norms[7][i].astype(np.float16).astype(np.float32))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(LostregError, match="bad.npz"):
        TokenMaps.load(tmp_path / "bad.npz")
    assert thresholds_for(None, [11], 12, None) == {11: None}
    assert thresholds_for([3, -1], [3, 11], 12, [5.0]) == {3: 5.0, 11: 5.0}
    assert thresholds_for([-1, 3], [3, 11], 12, [9.0, 2.0]) == {11: 9.0, 3: 2.0}
    with pytest.raises(LostregError, match="--threshold"):
        thresholds_for([3, -1], [3, 11], 12, [1.0, 2.0, 3.0])
    with pytest.raises(LostregError, match="--layers 12"):
        resolve_layers([12], 12)
    assert resolve_layers([-1, 11, 0], 12) == [0, 11]


# --- on a model ------------------------------------------------------------------------------


def test_block_outputs_are_before_the_final_norm_and_chain(tiny) -> None:
    model = tiny.model
    images = torch.randn(2, 3, 42, 56)
    embedded, outputs = block_outputs(model, images, [0, 2])
    assert embedded.shape == (2, 3, 4, 48)
    with torch.inference_mode():
        assert torch.allclose(model.norm(outputs[2]), model.forward_features(images), atol=1e-5)
        chained = model.blocks[2](model.blocks[1](outputs[0]))
    assert torch.allclose(chained, outputs[2], atol=1e-5)
    qkv, last = last_block_readout(model, images)
    assert torch.equal(last, outputs[2])
    assert torch.equal(qkv, last_qkv(model, images))
    assert patch_token_norms(last, tiny.num_prefix_tokens).shape == (2, 12)


def test_prefix_attention_is_timm_attention_renormalised_over_patches(tiny) -> None:
    model, npt = tiny.model, tiny.num_prefix_tokens
    images = torch.randn(1, 3, 42, 56)
    attn = model.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.inference_mode():
            model.forward_features(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    full = captured["a"][:, :, :npt, npt:]  # (B, heads, prefix, patches)
    reference = (full / full.sum(-1, keepdim=True)).mean(1)
    ours = attention_from_qkv(attn, last_qkv(model, images), npt)
    assert ours.shape == (1, 5, 12)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours.sum(-1), torch.ones(1, 5), atol=1e-5)


def test_uniform_patches_have_neighbour_similarity_one(tiny) -> None:
    from PIL import Image

    array = np.zeros((42, 70, 3), dtype=np.uint8)
    array[:, :28] = (90, 140, 30)  # two uniform patch columns
    array[:, 28:] = np.random.default_rng(0).integers(0, 256, (42, 42, 3))
    tensor, _ = preprocess(Image.fromarray(array), tiny.mean, tiny.std, 14)
    embedded, _ = block_outputs(tiny.model, tensor[None], [2])
    sims = neighbour_similarity(embedded)[0]
    assert torch.allclose(sims[:, 0], torch.ones(3), atol=1e-5)  # only uniform neighbours
    assert (sims[:, 3:] < 0.99).all()


def test_planted_high_norm_tokens_are_found_exactly(tiny, demo) -> None:
    """Scale chosen patch tokens of the last block's output: the statistics must flag exactly
    those tokens, in every image, and nothing else."""
    npt = tiny.num_prefix_tokens
    records = list(demo.records[:9])

    def planted(rows: int, cols: int) -> list[int]:
        return sorted({0, (rows // 2) * cols + cols // 2, rows * cols - 1})

    def plant(_module, _inputs, output):
        rows, cols = current["grid"]
        out = output.clone()
        for index in planted(rows, cols):
            out[:, npt + index] *= 500.0
        return out

    # the hook needs the grid: derive it from the patch embedding of the same forward
    current = {}
    grab = tiny.model.patch_embed.register_forward_hook(
        lambda m, i, o: current.__setitem__("grid", tuple(o.shape[1:3])))
    hook = tiny.model.blocks[-1].register_forward_hook(plant)
    try:
        maps, skipped = collect_token_maps(tiny, records, [1, 2], torch.device("cpu"),
                                           batch_size=4)
    finally:
        hook.remove()
        grab.remove()
    assert not skipped and maps.image_ids == [r.image_id for r in records]
    stats = layer_statistics(maps, 2)
    assert stats["threshold"] is not None and stats["threshold_source"] == "auto"
    expected_total = 0
    for i, row in enumerate(stats["per_image"]):
        rows, cols = maps.grid(i)
        expected = planted(rows, cols)
        found = np.flatnonzero(outlier_mask(maps.norm_map(i, 2), stats["threshold"]))
        assert found.tolist() == expected, row["image_id"]
        assert row["n_outliers"] == len(expected)
        expected_total += len(expected)
    assert stats["n_outliers"] == expected_total
    assert stats["outlier_fraction"] == pytest.approx(expected_total / maps.offsets[-1])
    # block 1 was not touched: its norms stay unimodal-ish and far below the planted ones
    assert maps.norms[1].astype(np.float64).max() < stats["threshold"]
    manual = layer_statistics(maps, 2, threshold=1e9)
    assert manual["n_outliers"] == 0 and manual["threshold_source"] == "manual"
    assert manual["auto_split"]["threshold"] == stats["threshold"]

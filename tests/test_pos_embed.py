"""Position-embedding interpolation as each family's original code does it, pinned against a
direct ``F.interpolate`` call with the original arguments (not against our own helper)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from lostreg.backbones import (
    BACKBONES,
    POS_EMBED_MODES,
    BackboneSpec,
    create_backbone,
    install_pos_embed,
    resample_patch_pos_embed,
)
from lostreg.errors import LostregError
from lostreg.features.extract import padded_size

# A VOC image of 500x375 (width x height) padded to whole patches.
VOC_H, VOC_W = 375, 500
GRID16 = tuple(v // 16 for v in padded_size(VOC_H, VOC_W, 16))  # (24, 32)
GRID14 = tuple(v // 14 for v in padded_size(VOC_H, VOC_W, 14))  # (27, 36)
TINY = dict(depth=2, embed_dim=48, num_heads=3)


def patch_pos(side: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, side * side, dim, generator=torch.Generator().manual_seed(seed))


def as_image(pos: torch.Tensor) -> torch.Tensor:
    side = math.isqrt(pos.shape[1])
    return pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)


def as_tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])


def official_offset(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO v1 / DINOv2 (no registers): scale factor with a 0.1 offset, no antialias."""
    side = math.isqrt(pos.shape[1])
    return as_tokens(F.interpolate(as_image(pos), scale_factor=((rows + 0.1) / side,
                                                                (cols + 0.1) / side),
                                   mode="bicubic"))


def official_by_size(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINOv2 with registers (and timm): by output size, antialias on, no offset."""
    return as_tokens(F.interpolate(as_image(pos), size=(rows, cols), mode="bicubic",
                                   antialias=True))


def test_voc_grids() -> None:
    assert GRID16 == (24, 32) and GRID14 == (27, 36)


@pytest.mark.parametrize("grid", [GRID16, (14, 20), (3, 1), (40, 14)])
def test_dino_v1_is_scale_factor_with_offset(grid) -> None:
    pos = patch_pos(14)
    ours = resample_patch_pos_embed(pos, grid, "dino")
    assert ours.shape == (1, grid[0] * grid[1], 16)
    assert torch.equal(ours, official_offset(pos, *grid))


@pytest.mark.parametrize("grid", [GRID14, (37, 50), (5, 2)])
def test_dinov2_is_scale_factor_with_offset(grid) -> None:
    pos = patch_pos(37, seed=1)
    assert torch.equal(resample_patch_pos_embed(pos, grid, "dinov2"), official_offset(pos, *grid))


@pytest.mark.parametrize("mode", ["dinov2_reg", "timm"])
@pytest.mark.parametrize("grid", [GRID14, (37, 50), (5, 2)])
def test_register_and_timm_modes_are_by_size_with_antialias(mode, grid) -> None:
    pos = patch_pos(37, seed=2)
    assert torch.equal(resample_patch_pos_embed(pos, grid, mode), official_by_size(pos, *grid))


@pytest.mark.parametrize("mode", POS_EMBED_MODES)
def test_identity_at_pretrained_grid(mode) -> None:
    pos = patch_pos(14, seed=3)
    assert resample_patch_pos_embed(pos, (14, 14), mode) is pos


def test_dino_v1_differs_from_timm_at_voc_size() -> None:
    """The test above would catch a regression to timm's resampling: at a VOC size the two
    differ well beyond rounding (scale-factor sampling positions + no antialias)."""
    torch.manual_seed(4)
    with_cls = torch.randn(1, 1 + 14 * 14, 16)
    timm_pos = resample_abs_pos_embed(with_cls, new_size=list(GRID16), num_prefix_tokens=1)
    ours = resample_patch_pos_embed(with_cls[:, 1:], GRID16, "dino")
    assert timm_pos.shape[1] == 1 + ours.shape[1]
    gap = (timm_pos[:, 1:] - ours).abs().max().item()
    assert gap > 0.05, gap
    dinov2 = resample_patch_pos_embed(patch_pos(37, seed=5), GRID14, "dinov2")
    timm2 = resample_abs_pos_embed(patch_pos(37, seed=5), new_size=list(GRID14),
                                   num_prefix_tokens=0)
    assert (dinov2 - timm2).abs().max().item() > 0.05


def test_dtype_is_kept_and_interpolation_runs_in_float32() -> None:
    pos = patch_pos(14, seed=6).to(torch.bfloat16)
    out = resample_patch_pos_embed(pos, GRID16, "dino")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, official_offset(pos.float(), *GRID16).to(torch.bfloat16))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="not a square grid"):
        resample_patch_pos_embed(torch.zeros(1, 15, 4), (3, 5), "dino")
    with pytest.raises(ValueError, match="unknown pos_embed mode"):
        resample_patch_pos_embed(patch_pos(4), (3, 5), "nearest")
    with pytest.raises(ValueError, match="unknown pos_embed mode"):
        install_pos_embed(torch.nn.Identity(), "nearest")


def test_registry_sets_each_family_mode() -> None:
    for spec in BACKBONES.values():
        if spec.family == "dino":
            assert spec.pos_embed == "dino", spec.name
        elif spec.family == "dinov2":
            assert spec.pos_embed == ("dinov2_reg" if spec.num_registers else "dinov2"), spec.name
        else:
            assert spec.pos_embed == "timm", spec.name


# --- the models really use it --------------------------------------------------------------


def unit_pos_embed(model: torch.nn.Module, seed: int) -> None:
    """Random init draws position embeddings with std 0.02; trained ones are O(1). Use O(1)
    so "differs from timm" is measured on a realistic scale."""
    with torch.no_grad():
        model.pos_embed.normal_(generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dino_vits16():
    backbone = create_backbone("dino_vits16", "random")
    unit_pos_embed(backbone.model, 11)
    return backbone


def test_dino_vits16_pos_embed_is_dino_v1s(dino_vits16) -> None:
    """Class token + position 0, then patches + the DINO v1 interpolation, at a VOC grid."""
    model = dino_vits16.model
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 384) and not model.no_embed_class
    rows, cols = GRID16
    x = torch.randn(2, rows, cols, 384, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model._pos_embed(x)
        pos = model.pos_embed
        cls = model.cls_token.expand(2, -1, -1) + pos[:, :1]
        patches = x.reshape(2, rows * cols, 384) + official_offset(pos[:, 1:], rows, cols)
        expected = torch.cat([cls, patches], dim=1)
        timm_default = VisionTransformer._pos_embed(model, x)
    assert torch.equal(got, expected)
    assert (got - timm_default).abs().max().item() > 0.05


def test_dino_vits16_forward_uses_it(dino_vits16) -> None:
    """The whole forward goes through the replacement: it changes the output at a VOC-like
    size and changes nothing at the pretrained 224x224."""
    model = dino_vits16.model
    generator = torch.Generator().manual_seed(8)
    voc = torch.randn(1, 3, 16 * 6, 16 * 9, generator=generator)
    square = torch.randn(1, 3, 224, 224, generator=generator)
    with torch.no_grad():
        ours_voc, ours_square = model.forward_features(voc), model.forward_features(square)
        patched = model._pos_embed
        del model._pos_embed  # back to timm's class method
        try:
            timm_voc, timm_square = model.forward_features(voc), model.forward_features(square)
        finally:
            model._pos_embed = patched
    assert torch.equal(ours_square, timm_square)
    assert not torch.allclose(ours_voc, timm_voc, atol=1e-3)


@pytest.mark.parametrize("name,mode", [("dinov2_vits14", "dinov2"),
                                       ("dinov2_vits14_reg4", "dinov2_reg")])
def test_dinov2_models(name, mode) -> None:
    """DINOv2 without registers: class slot in pos_embed, offset interpolation (differs from
    timm). With registers: timm's own behaviour, bit for bit (registers get no position)."""
    spec = BACKBONES[name]
    assert spec.pos_embed == mode
    backbone = create_backbone(BackboneSpec(f"{name}_tiny", spec.timm_name, spec.family, 14,
                                            spec.num_registers, pos_embed=mode,
                                            model_kwargs=TINY), "random")
    model = backbone.model
    unit_pos_embed(model, 12)
    rows, cols = GRID14
    x = torch.randn(1, rows, cols, 48, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = model._pos_embed(x)
        timm_default = VisionTransformer._pos_embed(model, x)
    assert got.shape == (1, 1 + spec.num_registers + rows * cols, 48)
    if spec.num_registers:
        assert model.no_embed_class and model.pos_embed.shape[1] == 37 * 37
        assert torch.equal(got, timm_default)
    else:
        pos = model.pos_embed
        assert pos.shape[1] == 1 + 37 * 37
        expected = torch.cat([model.cls_token + pos[:, :1],
                              x.reshape(1, -1, 48) + official_offset(pos[:, 1:], rows, cols)], 1)
        assert torch.equal(got, expected)
        assert (got - timm_default).abs().max().item() > 0.05


def test_fixed_size_model_keeps_working() -> None:
    """Without dynamic_img_size timm hands (B, N, C) tokens on the model's own grid."""
    spec = BackboneSpec("dino_fixed_tiny", "vit_small_patch16_224.dino", "dino", 16, 0,
                        pos_embed="dino", model_kwargs=dict(TINY, dynamic_img_size=False))
    model = create_backbone(spec, "random").model
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ours = model.forward_features(images)
        del model._pos_embed
        assert torch.equal(ours, model.forward_features(images))


# --- --pos-interp ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vits14"])
def test_pos_interp_timm_differs_from_original_at_voc_size_only(name) -> None:
    """``--pos-interp timm`` swaps in timm's resampling: a different embedding at 500x375 than
    the family's original, the same at the pretrained grid, and timm's own bit for bit."""
    spec = BACKBONES[name]
    tiny = BackboneSpec(f"{name}_tiny", spec.timm_name, spec.family, spec.patch_size,
                        spec.num_registers, pos_embed=spec.pos_embed, model_kwargs=TINY)
    original = create_backbone(tiny, "random", seed=5)
    timm_interp = create_backbone(tiny, "random", seed=5, pos_interp="timm")
    assert original.spec.pos_interp == "original" and timm_interp.spec.pos_interp == "timm"
    assert timm_interp.spec.pos_embed_mode == "timm" and original.spec.pos_embed_mode == spec.pos_embed
    assert timm_interp.spec.identity_extras() == {"pos_interp": "timm"}
    assert original.spec.identity_extras() == {}
    for backbone in (original, timm_interp):
        unit_pos_embed(backbone.model, 13)
    voc = GRID16 if spec.patch_size == 16 else GRID14
    side = math.isqrt(original.model.pos_embed.shape[1] - (0 if original.model.no_embed_class else 1))
    for grid, same in ((voc, False), ((side, side), True)):
        x = torch.randn(1, *grid, 48, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            a, b = original.model._pos_embed(x), timm_interp.model._pos_embed(x)
            timm_default = VisionTransformer._pos_embed(timm_interp.model, x)
        assert torch.equal(b, timm_default)
        assert torch.equal(a, b) if same else (a - b).abs().max().item() > 0.05


def test_pos_interp_is_validated() -> None:
    with pytest.raises(LostregError, match="--pos-interp must be one of original, timm"):
        create_backbone(BackboneSpec("t", "vit_small_patch16_224.dino", "dino", 16, 0,
                                     pos_embed="dino", model_kwargs=TINY), "random",
                        pos_interp="bilinear")
    model = create_backbone(BackboneSpec("t2", "vit_small_patch16_224.dino", "dino", 16, 0,
                                         model_kwargs=TINY), "random").model
    install_pos_embed(model, "dino", pos_interp="timm")
    assert "_pos_embed" not in vars(model)  # timm's own method, untouched

"""Image protocol and feature extraction: registers stripped, head order kept, LOST's padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone, get_backbone_spec
from lostreg.errors import LostregError
from lostreg.features.extract import extract_features, padded_size, preprocess, select_feature

TINY = dict(depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def tiny_reg4():
    spec = BackboneSpec("tiny_reg4_test", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                        pos_embed="dinov2_reg", model_kwargs=TINY)
    return create_backbone(spec, "random")


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_preprocess_matches_torchvision_then_zero_pad() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = image(37, 50)
    ours, size = preprocess(img, mean, std, 16)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])(img)
    assert size == (37, 50)
    assert ours.shape == (3, 48, 64)
    assert torch.equal(ours[:, :37, :50], reference)
    assert torch.count_nonzero(ours[:, 37:, :]) == 0 and torch.count_nonzero(ours[:, :, 50:]) == 0


def test_image_smaller_than_a_patch_is_padded_to_one_patch() -> None:
    tensor, size = preprocess(image(5, 9), (0.5,) * 3, (0.5,) * 3, 14)
    assert size == (5, 9) and tensor.shape == (3, 14, 14)
    assert padded_size(14, 15, 14) == (14, 28)


def test_select_feature_slices_heads_in_order_and_drops_prefix() -> None:
    batch, tokens, heads, head_dim, prefix = 2, 7, 3, 4, 5
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim)
    # LOST's own reshape: (B, T, 3, heads, hd) -> k -> (B, T, heads*hd)
    k_lost = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[1]
    k_lost = k_lost.transpose(1, 2).reshape(batch, tokens, -1)
    assert torch.equal(select_feature(qkv, "k", prefix), k_lost[:, prefix:])
    assert select_feature(qkv, "q", prefix).shape == (batch, tokens - prefix, heads * head_dim)
    with pytest.raises(ValueError):
        select_feature(qkv, "x", prefix)


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_features_equal_lost_style_hook_on_full_forward(tiny_reg4, kind) -> None:
    """Independent path: hook the last qkv during timm's own forward, reshape like LOST, drop
    1 class + 4 register tokens counted from the spec (not from the model)."""
    tensor, _ = preprocess(image(60, 90), tiny_reg4.mean, tiny_reg4.std, 14)
    batch = tensor.unsqueeze(0)
    store = {}
    hook = tiny_reg4.model.blocks[-1].attn.qkv.register_forward_hook(
        lambda module, args, output: store.setdefault("qkv", output))
    with torch.no_grad():
        tiny_reg4.model.forward_features(batch)
    hook.remove()
    qkv = store["qkv"]
    heads = tiny_reg4.model.blocks[-1].attn.num_heads
    b, t, _ = qkv.shape
    q, k, v = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
    expected = {"q": q, "k": k, "v": v}[kind].transpose(1, 2).reshape(b, t, -1)
    expected = expected[:, 1 + tiny_reg4.spec.num_registers:]
    ours = extract_features(tiny_reg4, batch, kind)
    assert ours.shape == (1, (70 // 14) * (98 // 14), 48)  # 60x90 pads to 70x98
    assert torch.equal(ours, expected)


def test_register_tokens_do_not_leak_into_features(tiny_reg4) -> None:
    """Changing the register tokens changes patch features (they attend), but the output has
    exactly one row per patch, and a model whose registers are zeroed still has the same
    number of rows: registers are never kept as rows."""
    tensor, _ = preprocess(image(56, 56), tiny_reg4.mean, tiny_reg4.std, 14)
    feats = extract_features(tiny_reg4, tensor.unsqueeze(0))
    assert tiny_reg4.num_prefix_tokens == 5
    assert feats.shape[1] == 16
    qkv_rows = tiny_reg4.model.reg_token.shape[1] + 1 + 16
    from lostreg.features.extract import last_qkv

    with torch.no_grad():
        qkv = last_qkv(tiny_reg4.model, tensor.unsqueeze(0))
    assert qkv.shape[1] == qkv_rows
    dim = qkv.shape[-1] // 3
    for token in range(5):
        key = qkv[0, token, dim:2 * dim]
        assert not any(torch.equal(key, row) for row in feats[0])


def test_registry_entries_and_aliases() -> None:
    assert get_backbone_spec("dinov2_reg4").name == "dinov2_vitl14_reg4"
    assert get_backbone_spec("dinov2").timm_name == "vit_large_patch14_dinov2.lvd142m"
    assert get_backbone_spec("dino_vits8").timm_name == "vit_small_patch8_224.dino"
    for size in "sblg":
        reg = BACKBONES[f"dinov2_vit{size}14_reg4"]
        assert reg.num_registers == 4 and reg.patch_size == 14 and reg.default_feature == "k"
        assert BACKBONES[f"dinov2_vit{size}14"].num_registers == 0
    assert BACKBONES["deit3_vitb16"].default_feature == "v"
    assert BACKBONES["openclip_vitb16"].default_feature == "v"


def test_unknown_model_lists_close_names() -> None:
    with pytest.raises(LostregError, match="dinov2_vitl14_reg4"):
        get_backbone_spec("dinov2_vitl14_reg")
    with pytest.raises(LostregError, match="unknown timm model"):
        get_backbone_spec("timm:not_a_model_xyz")


def test_timm_passthrough_counts_registers_from_the_model() -> None:
    spec = get_backbone_spec("timm:vit_small_patch14_reg4_dinov2")
    assert (spec.num_registers, spec.patch_size) == (4, 14)


def test_clip_backbone_uses_clip_normalisation() -> None:
    import timm

    cfg = timm.models.get_pretrained_cfg(BACKBONES["openclip_vitb16"].timm_name)
    assert tuple(cfg.mean) != (0.485, 0.456, 0.406)
    spec = BackboneSpec("tiny_clip_test", BACKBONES["openclip_vitb16"].timm_name, "openclip", 16,
                        0, default_feature="v", model_kwargs=TINY)
    assert create_backbone(spec, "random").mean == tuple(cfg.mean)

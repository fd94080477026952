"""The method and feature-kind registries: the narrow signatures every method and kind share."""

from __future__ import annotations

import pytest
import torch

from lostreg.backbones import BackboneSpec, create_backbone
from lostreg.errors import LostregError
from lostreg.features.extract import (
    FeatureRequest,
    extract,
    extract_features,
    last_qkv,
    layer_qkv,
    preprocess,
)
from lostreg.methods import METHODS, MethodOutput, get_method
from lostreg.methods.lost import lost, lost_reference

P = 14


@pytest.fixture(scope="module")
def tiny_reg4():
    spec = BackboneSpec("tiny_reg4_registry", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14,
                        4, pos_embed="dinov2_reg", model_kwargs=dict(depth=3, embed_dim=48, num_heads=3))
    return create_backbone(spec, "random")


def images(backbone, shape=(2, 3, 56, 70), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_lost_entry_matches_lost_and_its_reference_with_the_boxed_mask() -> None:
    spec = get_method("lost")
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(6, 5 * 7, 8, generator=gen)
    sizes = torch.tensor([[64, 90]] * 6)
    params = spec.resolve({"k_patches": 10})
    out = spec.run(feats, (5, 7), P, sizes, params)
    assert isinstance(out, MethodOutput) and out.mask.shape == (6, 5, 7)
    plain = lost(feats, (5, 7), P, sizes, 10)
    assert torch.equal(out.box, plain.box) and torch.equal(out.seed, plain.seed)
    for i in range(6):
        ref = spec.reference(feats[i], (5, 7), P, (64, 90), params)
        assert torch.equal(ref.box, out.box[i]) and int(ref.seed) == int(out.seed[i])
        assert torch.equal(ref.mask, out.mask[i])
        assert ref.box.tolist() == lost_reference(feats[i], (5, 7), P, (64, 90), 10).box
        # the box is the mask's bounding box, clipped to the image
        rows, cols = torch.nonzero(out.mask[i], as_tuple=True)
        assert out.box[i].tolist() == [int(cols.min()) * P, int(rows.min()) * P,
                                       min((int(cols.max()) + 1) * P, 90),
                                       min((int(rows.max()) + 1) * P, 64)]


def test_negative_bias_mask_falls_back_to_the_seed_patch() -> None:
    feats = torch.randn(3, 12, 4, generator=torch.Generator().manual_seed(1))
    spec = get_method("lost")
    out = spec.run(feats, (3, 4), P, torch.tensor([[42, 56]] * 3),
                   spec.resolve({"gram_bias": -1e6}))
    for i in range(3):
        assert out.mask[i].sum() == 1 and out.mask[i].flatten()[out.seed[i]]


def test_lost_identity_keeps_the_pre_registry_run_id_fields() -> None:
    spec = get_method("lost")
    assert spec.identity(spec.resolve({})) == {"k_patches": 100, "gram_bias": 0.0}


def test_unknown_method_and_bad_parameters_are_one_line() -> None:
    with pytest.raises(LostregError, match="did you mean lost"):
        get_method("lots")
    with pytest.raises(LostregError, match="--k-patches 0"):
        get_method("lost").resolve({"k_patches": 0})
    with pytest.raises(LostregError, match="no parameter 'tau'"):
        get_method("lost").resolve({"tau": 0.2})
    assert "lost" in METHODS


def test_layer_minus_one_is_todays_last_qkv_and_layer_l_is_a_hook_on_block_l(tiny_reg4) -> None:
    model = tiny_reg4.model
    x = images(tiny_reg4)
    with torch.inference_mode():
        by_layer = layer_qkv(model, x, [-1, 0, 1, -2])
        assert torch.equal(by_layer[-1], last_qkv(model, x))
        store = {}
        hooks = [model.blocks[i].attn.qkv.register_forward_hook(
            lambda m, a, out, i=i: store.setdefault(i, out)) for i in range(3)]
        model.forward_features(x)
        for hook in hooks:
            hook.remove()
    assert torch.equal(by_layer[0], store[0]) and torch.equal(by_layer[1], store[1])
    assert torch.equal(by_layer[-2], store[1])
    with pytest.raises(LostregError, match="--layer 3: the model has 3 blocks"):
        layer_qkv(model, x, [3])


def test_extract_matches_extract_features_for_every_request(tiny_reg4) -> None:
    x = images(tiny_reg4)
    out = extract(tiny_reg4, x, [FeatureRequest("k"), FeatureRequest("v", 0),
                                 FeatureRequest("attn")])
    assert torch.equal(out[FeatureRequest("k")], extract_features(tiny_reg4, x, "k"))
    assert out[FeatureRequest("v", 0)].shape == (2, 4 * 5, 48)
    assert out[FeatureRequest("attn")].shape == (2, 4 * 5, 3)


def test_cls_attention_equals_timms_own_attention_matrix_on_patch_columns(tiny_reg4) -> None:
    """Independent path: timm's unfused attention computes the full softmax; hook it and keep
    row 0 (class token) and the patch columns (registers dropped, not renormalised)."""
    model = tiny_reg4.model
    attn = model.blocks[-1].attn
    x = images(tiny_reg4)
    store = {}
    fused = attn.fused_attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda m, a, out: store.setdefault("a", out))
    try:
        with torch.inference_mode():
            model.forward_features(x)
    finally:
        hook.remove()
        attn.fused_attn = fused
    expected = store["a"][:, :, 0, 5:].transpose(1, 2)  # 1 class + 4 registers
    ours = extract(tiny_reg4, x, [FeatureRequest("attn")])[FeatureRequest("attn")]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert (ours.sum(dim=1) < 1).all()  # the prefix tokens hold some of the mass


def test_preprocess_is_unchanged_by_the_registry() -> None:
    from PIL import Image

    tensor, size = preprocess(Image.new("RGB", (20, 10)), (0.5,) * 3, (0.5,) * 3, P)
    assert size == (10, 20) and tensor.shape == (3, 14, 28)


def test_methods_keep_their_registration_order() -> None:
    """The registry's order is what --help, the suites and the reports list (comparison.md's
    sections): LOST, the default, first, then DINO-seg and TokenCut, as in every release."""
    from lostreg.methods import METHODS

    assert list(METHODS)[:3] == ["lost", "dinoseg", "tokencut"]

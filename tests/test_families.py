"""Every supported timm family end to end on a tiny random model: q/k/v from hooks in the
model's own forward, the attention recomputed from them equals the model's own attention,
RoPE as DINOv3's original code writes it, early stop, DINOv3 entries and release files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lostreg.backbones import (
    BACKBONES,
    BackboneSpec,
    build_model,
    create_backbone,
    family_of,
    get_backbone_spec,
)
from lostreg.errors import LostregError
from lostreg.features.extract import (
    FeatureRequest,
    extract,
    layer_views,
    run_taps,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, embed_dim=48, num_heads=3)
# one tiny model per family and projection layout (timm name, patch, has RoPE)
MODELS = {
    "vit_dino": ("vit_small_patch16_224.dino", 16, False),
    "vit_dinov2_reg4": ("vit_small_patch14_reg4_dinov2.lvd142m", 14, False),
    "deit3": ("deit3_base_patch16_224.fb_in22k_ft_in1k", 16, False),
    "clip": ("vit_base_patch16_clip_224.laion2b", 16, False),
    "siglip": ("vit_base_patch16_siglip_224.webli", 16, False),
    "dinov3": ("vit_small_patch16_dinov3.lvd1689m", 16, True),  # EVA, fused qkv, no bias
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb.lvd1689m", 16, True),  # fused qkv + bias
    "dinov3_swiglu": ("vit_huge_plus_patch16_dinov3.lvd1689m", 16, True),
    "eva02_fused": ("eva02_tiny_patch14_224.mim_in22k", 14, True),  # GluMlp, bias via F.linear
    "eva02_separate": ("eva02_base_patch14_224.mim_in22k", 14, True),  # q/k/v projections
    "rope_mixed": ("vit_base_patch16_rope_mixed_224.naver_in1k", 16, True),  # AttentionRope
}


def tiny_spec(key: str, **changes) -> BackboneSpec:
    timm_name, patch, _ = MODELS[key]
    meta = build_model(BackboneSpec("probe", timm_name, "timm", patch, 0, model_kwargs=TINY),
                       meta=True)
    registers = family_of(meta).num_registers(meta)
    return BackboneSpec(f"tiny_{key}", timm_name, "timm", patch, registers,
                        model_kwargs=dict(TINY), **changes)


@pytest.fixture(scope="module")
def tiny_models():
    return {key: create_backbone(tiny_spec(key), "random", seed=3) for key in MODELS}


def images_for(patch: int, batch: int = 2, rows: int = 3, cols: int = 4, seed: int = 0):
    return torch.randn(batch, 3, rows * patch, cols * patch,
                       generator=torch.Generator().manual_seed(seed))


def last_attention(backbone, x: torch.Tensor) -> torch.Tensor:
    """The last block's softmax attention ``(B, heads, T, T)`` from the model's own unfused
    forward: the independent reference for what lostreg reads."""
    attn = backbone.model.blocks[-1].attn
    store, fused = {}, attn.fused_attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda m, a, out: store.setdefault("a", out))
    try:
        with torch.inference_mode():
            backbone.model.forward_features(x)
    finally:
        hook.remove()
        attn.fused_attn = fused
    return store["a"]


@pytest.mark.parametrize("key", list(MODELS))
def test_every_family_extracts_patch_features(tiny_models, key) -> None:
    backbone = tiny_models[key]
    _, patch, rope = MODELS[key]
    kinds = ["q", "k", "v"] + (["attn"] if backbone.model.cls_token is not None else [])
    kinds += ["q_rope", "k_rope"] if rope else []
    out = extract(backbone, images_for(patch), [FeatureRequest(k) for k in kinds])
    for kind in kinds:
        width = 3 if kind == "attn" else 48
        assert out[FeatureRequest(kind)].shape == (2, 12, width), kind
        assert out[FeatureRequest(kind)].dtype == torch.float32
    if not rope:
        with pytest.raises(LostregError, match="rotary position embeddings"):
            extract(backbone, images_for(patch), [FeatureRequest("k_rope")])


def _attention_from_features(view, attn) -> torch.Tensor:
    """The attention output recomputed from our q/k (after norms and RoPE) and v: plain math,
    not the model's code path."""
    q, k = view.attention_qk()
    v = view.heads()[2]
    probs = ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)
    x = (probs @ v.float()).transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)
    return attn.proj(attn.norm(x))


@pytest.mark.parametrize("key", list(MODELS))
def test_recomputed_attention_equals_the_models_own(tiny_models, key) -> None:
    """q, k, v, RoPE and q/k norms as read are exactly what the attention uses: its output,
    recomputed from them, equals the block's attention output in the model's own forward."""
    backbone = tiny_models[key]
    model = backbone.model
    x = images_for(MODELS[key][1], seed=1)
    store = {}
    handle = model.blocks[-1].attn.register_forward_hook(lambda m, a, out: store.setdefault("o", out))
    try:
        with torch.inference_mode():
            model.forward_features(x)
    finally:
        handle.remove()
    with torch.inference_mode():
        taps = run_taps(model, x, qkv=[1])
        view = layer_views(backbone, taps, {1: 1})[1]
        ours = _attention_from_features(view, model.blocks[-1].attn)
    torch.testing.assert_close(ours, store["o"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["dinov3", "eva02_separate", "rope_mixed", "vit_dinov2_reg4"])
def test_attn_kind_equals_the_models_softmax(tiny_models, key) -> None:
    """``attn`` = row 0 of the model's own (unfused) attention matrix, patch columns."""
    backbone = tiny_models[key]
    x = images_for(MODELS[key][1], seed=2)
    npt = backbone.num_prefix_tokens
    expected = last_attention(backbone, x)[:, :, 0, npt:].transpose(1, 2)
    ours = extract(backbone, x, [FeatureRequest("attn")])[FeatureRequest("attn")]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def _official_dinov3_rope(x: torch.Tensor, rows: int, cols: int, base: float) -> torch.Tensor:
    """DINOv3's RopePositionEmbedding (normalize_coords="separate", no augmentation) and its
    rope_apply, written from the paper's code: x ``(B, H, HW, D)``."""
    head_dim = x.shape[-1]
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    coords_h = torch.arange(0.5, rows, dtype=torch.float32) / rows
    coords_w = torch.arange(0.5, cols, dtype=torch.float32) / cols
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * torch.cos(angles) + torch.cat([-x2, x1], dim=-1) * torch.sin(angles)


def test_k_rope_is_dinov3s_rotation_of_k(tiny_models) -> None:
    backbone = tiny_models["dinov3"]
    x = images_for(16, rows=3, cols=5, seed=4)
    out = extract(backbone, x, [FeatureRequest(k) for k in ("q", "k", "q_rope", "k_rope")])
    for plain, rotated in (("q", "q_rope"), ("k", "k_rope")):
        heads = out[FeatureRequest(plain)].reshape(2, 15, 3, 16).transpose(1, 2)
        expected = _official_dinov3_rope(heads, 3, 5, base=100.0).transpose(1, 2).reshape(2, 15, 48)
        torch.testing.assert_close(out[FeatureRequest(rotated)], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[FeatureRequest("k")], out[FeatureRequest("k_rope")])


@pytest.mark.parametrize("key", ["dinov3", "eva02_separate", "clip"])
def test_forward_stops_at_the_deepest_requested_projection(tiny_models, key) -> None:
    backbone = tiny_models[key]
    calls = []
    handle = backbone.model.blocks[-1].register_forward_pre_hook(lambda m, a: calls.append(1))
    norm = backbone.model.norm.register_forward_pre_hook(lambda m, a: calls.append("norm"))
    try:
        extract(backbone, images_for(MODELS[key][1]), [FeatureRequest("k", 0)])
        assert calls == []  # block 1 and the final norm never ran
        extract(backbone, images_for(MODELS[key][1]), [FeatureRequest("k")])
        assert calls == [1]  # the last block started, the final norm did not run
    finally:
        handle.remove()
        norm.remove()


@pytest.mark.parametrize("name,why", [
    ("timm:vit_relpos_base_patch16_224", "not supported"),
    ("timm:beit_base_patch16_224", "not supported"),
    ("timm:swin_tiny_patch4_window7_224", "not a ViT with patch tokens"),
    ("timm:resnet18", "not a ViT with patch tokens"),
])
def test_unsupported_models_get_one_line(name, why) -> None:
    with pytest.raises(LostregError, match=why) as info:
        get_backbone_spec(name)
    assert "\n" not in str(info.value)


def test_timm_passthrough_counts_dinov3_storage_tokens_as_registers() -> None:
    spec = get_backbone_spec("timm:vit_small_patch16_dinov3")
    assert (spec.num_registers, spec.patch_size) == (4, 16)


# --- DINOv3 ------------------------------------------------------------------------------------


def test_dinov3_registry_entries_are_timms_released_models() -> None:
    import timm

    released = set(timm.list_models("*dinov3*", pretrained=True))
    names = {"dinov3_vits16": "small", "dinov3_vitsp16": "small_plus", "dinov3_vitb16": "base",
             "dinov3_vitl16": "large", "dinov3_vith16p": "huge_plus", "dinov3_vit7b16": "7b"}
    for short, arch in names.items():
        spec = BACKBONES[short]
        assert spec.timm_name == f"vit_{arch}_patch16_dinov3.lvd1689m" and spec.timm_name in released
        assert (spec.patch_size, spec.num_registers, spec.default_feature) == (16, 4, "k")
        assert spec.rope_periods == "bf16"
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        assert tuple(cfg.mean) == (0.485, 0.456, 0.406) and tuple(cfg.std) == (0.229, 0.224, 0.225)
    meta = build_model(BACKBONES["dinov3_vitl16"], meta=True)
    assert meta.num_prefix_tokens == 5  # class + 4 storage tokens, all stripped


def test_dinov3_rope_periods_are_rounded_to_bfloat16_as_released() -> None:
    exact = create_backbone(tiny_spec("dinov3"), "random").model.rope.periods
    rounded = create_backbone(tiny_spec("dinov3", rope_periods="bf16"), "random").model.rope.periods
    assert torch.equal(rounded, exact.to(torch.bfloat16).float())
    assert not torch.equal(rounded, exact)


def official_dinov3_state(model: torch.nn.Module, k_bias_garbage: bool = True) -> dict:
    """A timm DINOv3 state dict rewritten in the official release's key layout (storage_tokens,
    ls1/ls2.gamma, fused qkv.bias with its bias_mask, rope_embed.periods, mask_token)."""
    state, out = model.state_dict(), {}
    for key, value in state.items():
        if key.endswith(("attn.q_bias", "attn.k_bias", "attn.v_bias")) or key.startswith("rope."):
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        out[key.replace("gamma_2", "ls2.gamma")] = value
    for i, block in enumerate(model.blocks):
        attn, prefix = block.attn, f"blocks.{i}.attn.qkv."
        if attn.q_bias is not None:
            k_bias = torch.full_like(attn.q_bias, 7.0) if k_bias_garbage else attn.k_bias
            out[prefix + "bias"] = torch.cat([attn.q_bias, k_bias, attn.v_bias])
            out[prefix + "bias_mask"] = torch.cat([torch.ones_like(attn.q_bias),
                                                  torch.zeros_like(attn.q_bias),
                                                  torch.ones_like(attn.q_bias)])
    out["rope_embed.periods"] = model.rope.periods.to(torch.bfloat16)
    out["mask_token"] = torch.zeros(1, model.embed_dim)
    return out


def test_official_dinov3_release_file_is_converted(tmp_path) -> None:
    spec = tiny_spec("dinov3_qkvb", rope_periods="bf16")
    source = create_backbone(spec, "random", seed=9)
    with torch.no_grad():  # non-zero q/v biases, so dropping them would show
        for block in source.model.blocks:
            block.attn.q_bias.normal_(generator=torch.Generator().manual_seed(1))
            block.attn.v_bias.normal_(generator=torch.Generator().manual_seed(2))
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(official_dinov3_state(source.model), path)
    loaded = create_backbone(spec, str(path))
    x = images_for(16, rows=2, cols=3, seed=5)
    with torch.inference_mode():
        assert torch.equal(source.model.forward_features(x), loaded.model.forward_features(x))
    # the same file into the model without q/v biases: refused, not silently dropped
    with pytest.raises(LostregError, match="_qkvb"):
        create_backbone(tiny_spec("dinov3", rope_periods="bf16"), str(path))


def test_official_dinov3_file_periods_are_used(tmp_path) -> None:
    spec = tiny_spec("dinov3", rope_periods="bf16")
    source = create_backbone(spec, "random", seed=4)
    state = official_dinov3_state(source.model)
    state["rope_embed.periods"] = torch.tensor([1.0, 2.5, 9.0, 40.0])
    path = tmp_path / "official.pth"
    torch.save(state, path)
    loaded = create_backbone(spec, str(path))
    assert torch.equal(loaded.model.rope.periods, torch.tensor([1.0, 2.5, 9.0, 40.0]))


def test_dinov3_cli_run_on_the_demo(tmp_path) -> None:
    """The command that used to end in a traceback, on the smallest real DINOv3 config."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lostreg.run", "--dataset", "demo", "--model",
         "timm:vit_small_patch16_dinov3", "--weights", "random", "--limit", "2",
         "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
         "--num-workers", "0", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("CorLoc") or "CorLoc" in proc.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_registers"] == 4 and config["timm_name"] == "vit_small_patch16_dinov3"
    assert "Traceback" not in proc.stderr


def test_rope_table_extension_is_the_identity_rotation() -> None:
    from timm.layers import apply_rot_embed_cat

    from lostreg.backbones.families import extend_rope

    rope = torch.randn(6, 32)
    x = torch.randn(2, 3, 7, 16)
    rotated = apply_rot_embed_cat(x, extend_rope(rope, 1), half=True)
    assert torch.equal(rotated[:, :, -1], x[:, :, -1])
    assert torch.equal(rotated[:, :, :6], apply_rot_embed_cat(x[:, :, :6], rope, half=True))
    assert F.mse_loss(rotated[:, :, :6], x[:, :, :6]) > 0


def test_layer_l_of_an_eva_model_equals_a_hook_on_block_l(tiny_models) -> None:
    from lostreg.features.extract import layer_qkv

    model = tiny_models["dinov3"].model
    x = images_for(16, seed=6)
    store = {}
    hooks = [model.blocks[i].attn.qkv.register_forward_hook(
        lambda m, a, out, i=i: store.setdefault(i, out)) for i in range(2)]
    try:
        with torch.inference_mode():
            model.forward_features(x)
            by_layer = layer_qkv(model, x, [0, -1])
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(by_layer[0], store[0]) and torch.equal(by_layer[-1], store[1])


def test_norm_diagnostics_on_dinov3(tiny_models, tmp_path) -> None:
    """``analyze norms`` and the panels' prefix attention on a RoPE model with storage tokens:
    4 registers named, attention = the model's own softmax renormalised over the patches."""
    from lostreg.reports.analysis.collect import NormsConfig, analyze_norms
    from lostreg.reports.analysis.tokens import panel_readout

    backbone = tiny_models["dinov3"]
    result = analyze_norms(NormsConfig(model="tiny_dinov3", dataset="demo",
                                       data_root=tmp_path / "data", weights="random",
                                       device="cpu", limit=3, output=tmp_path / "norms",
                                       num_workers=0, progress=False), backbone)
    assert result.payload["num_prefix_tokens"] == 5 and result.payload["n_images"] == 3
    x = images_for(16, batch=1, seed=7)
    full = last_attention(backbone, x)[:, :, :5, 5:]
    expected = (full / full.sum(-1, keepdim=True)).mean(1)
    readout = panel_readout(backbone, x, "k")
    assert readout.names == ["CLS", "register 1", "register 2", "register 3", "register 4"]
    torch.testing.assert_close(readout.attention, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["vit_dinov2_reg4", "dinov3", "eva02_separate"])
def test_blocks_before_the_read_one_use_fused_attention(tiny_models, key, monkeypatch) -> None:
    """Reading q/k/v must not push the model off PyTorch's fused scaled-dot-product attention
    (the fast path on a GPU): every block before the one read runs it, and the read block
    stops at its projection, so it computes no attention at all."""
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    backbone = tiny_models[key]
    extract(backbone, images_for(MODELS[key][1]), [FeatureRequest("k")])
    assert len(calls) == len(backbone.model.blocks) - 1

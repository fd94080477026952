"""Weights: local timm checkpoints, official DINOv2 release files, random, and the hub offline."""

from __future__ import annotations

import pytest
import torch

from lostreg.backbones import BackboneSpec, create_backbone, resolve_hub_file
from lostreg.errors import LostregError
from lostreg.io import sha256_file

TINY = dict(depth=2, embed_dim=48, num_heads=3)
REG = BackboneSpec("tiny_reg4_w", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                   pos_embed="dinov2_reg", model_kwargs=TINY)


def forward(backbone, seed: int = 1) -> torch.Tensor:
    images = torch.randn(1, 3, 42, 56, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return backbone.model.forward_features(images)


def test_random_weights_are_seeded_and_flagged() -> None:
    a, b = create_backbone(REG, "random"), create_backbone(REG, "random")
    assert a.weights.is_random and a.weights.identity() == "random"
    assert torch.equal(forward(a), forward(b))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_roundtrip(tmp_path, suffix) -> None:
    source = create_backbone(REG, "random", seed=7)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    loaded = create_backbone(REG, str(path))
    assert loaded.weights.source == "file" and loaded.weights.sha256 == sha256_file(path)
    assert torch.equal(forward(source), forward(loaded))


def test_official_dinov2_release_format_is_converted(tmp_path) -> None:
    """An official DINOv2 reg checkpoint has register_tokens, mask_token and a pos_embed with a
    class slot; timm's filter folds the class position into cls_token."""
    source = create_backbone(REG, "random", seed=3)
    # multiples of 1/64 make "cls - class_pos + class_pos" exact, so the check can be equality
    with torch.no_grad():
        source.model.cls_token.copy_(torch.round(torch.randn(1, 1, 48) * 64) / 64)
    state = dict(source.model.state_dict())
    grid_tokens = state["pos_embed"].shape[1]
    class_pos = torch.round(torch.randn(1, 1, 48) * 64) / 64
    official = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = state["reg_token"]
    official["cls_token"] = state["cls_token"] - class_pos
    official["pos_embed"] = torch.cat([class_pos, state["pos_embed"]], dim=1)
    official["mask_token"] = torch.zeros(1, 48)
    assert official["pos_embed"].shape[1] == grid_tokens + 1
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, path)
    loaded = create_backbone(REG, str(path))
    assert torch.equal(forward(source), forward(loaded))


def test_checkpoint_with_pickled_code_is_refused(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("executed!",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(LostregError, match="evil.pth: cannot read checkpoint"):
        create_backbone(REG, str(path))


def test_bad_checkpoint_files_give_one_line_errors(tmp_path) -> None:
    with pytest.raises(LostregError, match="not found"):
        create_backbone(REG, str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(LostregError, match="corrupt.pth"):
        create_backbone(REG, str(corrupt))
    other = create_backbone(BackboneSpec("tiny_other", "vit_small_patch16_224.dino", "dino", 16, 0,
                                         model_kwargs=dict(depth=1, embed_dim=48, num_heads=3)),
                            "random")
    wrong = tmp_path / "wrong.pth"
    torch.save(other.model.state_dict(), wrong)
    with pytest.raises(LostregError, match="does not fit the model|cannot convert"):
        create_backbone(REG, str(wrong))


def test_hub_unreachable_names_weights_path(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(LostregError) as info:
        resolve_hub_file("vit_small_patch16_224.dino")
    message = str(info.value)
    assert "--weights PATH" in message and "\n" not in message


def test_hub_weights_load_from_the_offline_cache(monkeypatch, tmp_path) -> None:
    """`--weights hub` with HF_HUB_OFFLINE=1 and the file already in the Hugging Face cache:
    the same file timm would fetch is found, hashed and loaded."""
    import huggingface_hub.constants as constants
    from safetensors.torch import save_file

    source = create_backbone(REG, "random", seed=11)
    repo = tmp_path / "hub" / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    loaded = create_backbone(REG, "hub")
    assert loaded.weights.source == "hub"
    assert loaded.weights.hub_id == "timm/vit_small_patch14_reg4_dinov2.lvd142m"
    assert loaded.weights.sha256 == sha256_file(snapshot / "model.safetensors")
    assert torch.equal(forward(source), forward(loaded))


def test_weights_file_is_hashed_once_per_process(tmp_path, monkeypatch) -> None:
    """A run hashes the file to name itself, then builds the model: one read of the file."""
    from lostreg.backbones import weights
    from lostreg.run import describe_backbone

    path = tmp_path / "tiny.pth"
    torch.save(create_backbone(REG, "random").model.state_dict(), path)
    calls = []
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or sha256_file(p))
    info = describe_backbone(REG, str(path))
    built = create_backbone(REG, str(path))
    assert info.weights == built.weights and len(calls) == 1


@pytest.mark.parametrize("name", ["dinov2_vitl14_reg4", "openclip_vitb16", "dino_vits8",
                                  "timm:eva02_tiny_patch14_224.mim_in22k"])
def test_description_from_the_meta_device_matches_the_model(name) -> None:
    """A run describes its backbone from a shapes-only build (weight init skipped where timm
    allows it); prefix tokens and parameter count must equal the real model's."""
    from lostreg.backbones import build_model, get_backbone_spec
    from lostreg.run import describe_backbone

    spec = get_backbone_spec(name)
    info = describe_backbone(spec, "random")
    real = build_model(spec)
    assert info.num_prefix_tokens == real.num_prefix_tokens
    assert info.num_params == sum(p.numel() for p in real.parameters())


# --- issue 15: fast, precise failures ----------------------------------------------------------


def unreachable_hub(monkeypatch, tmp_path) -> list:
    """The hub looks online to huggingface_hub (no HF_HUB_OFFLINE) but no connection succeeds,
    as on a machine without network: the probe must notice, once."""
    import huggingface_hub.constants as constants

    from lostreg.backbones import weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    monkeypatch.setattr(weights, "_HUB_REACHABLE", {})
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(weights.socket, "create_connection", refuse)
    return calls


def test_offline_hub_fails_fast_and_names_the_file(monkeypatch, tmp_path, capfd) -> None:
    import time

    calls = unreachable_hub(monkeypatch, tmp_path)
    start = time.monotonic()
    for _ in range(2):
        with pytest.raises(LostregError) as info:
            resolve_hub_file("vit_small_patch16_224.dino")
    assert time.monotonic() - start < 5
    assert len(calls) == 1 and calls[0][0] == ("huggingface.co", 443) and calls[0][1] <= 5
    message = str(info.value)
    assert "\n" not in message and "--weights PATH" in message
    assert "timm/vit_small_patch16_224.dino" in message and "model.safetensors" in message
    assert str(tmp_path / "hub" / "models--timm--vit_small_patch16_224.dino") in message
    assert "thrown while requesting" not in capfd.readouterr().err


def test_unreachable_hub_still_uses_the_cache(monkeypatch, tmp_path) -> None:
    from safetensors.torch import save_file

    unreachable_hub(monkeypatch, tmp_path)
    source = create_backbone(REG, "random", seed=12)
    repo = tmp_path / "hub" / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
              str(snapshot / "model.safetensors"))
    loaded = create_backbone(REG, "hub")
    assert loaded.weights.source == "hub" and torch.equal(forward(source), forward(loaded))


@pytest.mark.parametrize("content,what", [
    (b"hello weights\n", "it is a text file (starts 'hello weights')"),
    (b"", "the file is empty"),
    (bytes(range(1, 200)) * 3, "not a torch.save archive"),
])
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, content, what) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(LostregError) as info:
        create_backbone(REG, str(path))
    assert what in str(info.value) and str(path) in str(info.value)
    assert "KeyError" not in str(info.value)


def test_gated_hub_weights_say_how_to_get_them(monkeypatch, tmp_path) -> None:
    """DINOv3's hub repositories are gated: say so, and how to get in or around it."""
    import huggingface_hub

    from lostreg.backbones import weights

    class GatedRepoError(Exception):
        pass

    def gated(*args, **kwargs):
        raise GatedRepoError("401 Client Error. Cannot access gated repo")

    monkeypatch.setattr(weights, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(LostregError, match="gated on the Hugging Face hub .*huggingface-cli login"
                                           ".*--weights PATH") as info:
        resolve_hub_file("vit_small_patch16_dinov3.lvd1689m")
    assert "timm/vit_small_patch16_dinov3.lvd1689m" in str(info.value)


def test_a_name_prefix_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """``timm:`` and ``py:`` names resolve through ``NAME_PREFIXES``; a new kind of name is one
    ``register_name_prefix`` call, modifiers included."""
    from lostreg.backbones import registry

    assert {"timm:", "py:"} <= set(registry.NAME_PREFIXES)
    monkeypatch.setattr(registry, "NAME_PREFIXES", dict(registry.NAME_PREFIXES))
    seen = []

    def resolve(name: str) -> registry.BackboneSpec:
        seen.append(name)
        return registry.BACKBONES["dinov2_vitl14"]

    registry.register_name_prefix("toy:", resolve)
    spec = registry.get_backbone_spec("toy:anything+ttr")
    assert seen == ["toy:anything"] and spec.test_time_registers == 1
    with pytest.raises(LostregError, match="unknown model 'toyx'"):
        registry.get_backbone_spec("toyx")

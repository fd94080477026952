"""Issue 20, rows 5 and 6: a checkpoint whose tensors have the wrong shape or a non-floating
dtype is one line naming the tensor, never a ``size mismatch`` traceback or a silent cast."""

from __future__ import annotations

import pytest
import torch

from lostreg.backbones import BackboneSpec, create_backbone
from lostreg.errors import LostregError

TI = BackboneSpec("tiny_ti_w", "vit_small_patch16_224.dino", "dino", 16, 0,
                  model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))
S = BackboneSpec("tiny_s_w", "vit_small_patch16_224.dino", "dino", 16, 0,
                 model_kwargs=dict(depth=2, embed_dim=96, num_heads=3))
REG = BackboneSpec("tiny_reg4_hw", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                   pos_embed="dinov2_reg", model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))


def state_of(spec: BackboneSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in create_backbone(spec, "random", seed=seed).model.state_dict()
            .items()}


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_transposed_qkv_names_the_tensor_both_shapes_and_the_model(tmp_path) -> None:
    state = state_of(TI)
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"].t().contiguous()
    path = tmp_path / "transposed.pth"
    torch.save(state, path)
    with pytest.raises(LostregError) as info:
        create_backbone(TI, str(path))
    assert one_line(info) == (
        f"{path}: checkpoint does not fit the model: blocks.0.attn.qkv.weight has shape "
        "[48, 144] in the checkpoint but [144, 48] in vit_small_patch16_224.dino (2 blocks, "
        "width 48); is it the right --model?")


def test_wider_weights_for_a_narrower_model_name_the_first_tensor(tmp_path) -> None:
    path = tmp_path / "vit_s.pth"
    torch.save(state_of(S), path)
    with pytest.raises(LostregError) as info:
        create_backbone(TI, str(path))
    assert one_line(info) == (
        f"{path}: checkpoint does not fit the model: cls_token has shape [1, 1, 96] in the "
        "checkpoint but [1, 1, 48] in vit_small_patch16_224.dino (2 blocks, width 48); is it "
        "the right --model?")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int64, torch.uint8,
                                   torch.complex64])
def test_non_floating_weights_are_refused(tmp_path, dtype) -> None:
    state = state_of(TI)
    state["blocks.1.norm1.weight"] = state["blocks.1.norm1.weight"].to(dtype)
    path = tmp_path / "int.pth"
    torch.save(state, path)
    with pytest.raises(LostregError) as info:
        create_backbone(TI, str(path))
    name = str(dtype).removeprefix("torch.")
    assert one_line(info).startswith(f"{path}: tensor blocks.1.norm1.weight has dtype {name}; "
                                     "weights must be floating point")


def test_an_integer_tensor_of_a_release_file_is_refused_before_conversion(tmp_path) -> None:
    """In an official DINOv2 file timm's filter adds the class position to ``cls_token``: an
    int32 ``cls_token`` would come out float, so the check is on the file as read."""
    state = state_of(REG)
    official = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official["register_tokens"] = state["reg_token"]
    official["cls_token"] = torch.ones(1, 1, 48, dtype=torch.int32)
    official["pos_embed"] = torch.cat([torch.zeros(1, 1, 48), state["pos_embed"]], dim=1)
    official["mask_token"] = torch.zeros(1, 48)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, path)
    with pytest.raises(LostregError, match=r"tensor cls_token has dtype int32; weights must be"):
        create_backbone(REG, str(path))


def test_half_precision_weights_still_load(tmp_path) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in state_of(TI, seed=5).items()}
    path = tmp_path / "bf16.pth"
    torch.save(state, path)
    loaded = create_backbone(TI, str(path)).model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in state.items())

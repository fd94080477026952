"""Image protocol and feature extraction: LOST's, to the pixel.

Images are RGB via PIL, ``ToTensor`` (``uint8 / 255``), normalised with the model's mean/std,
**not resized**, then zero-padded at the bottom and right (after normalisation) to a multiple
of the patch size. Padding patches are part of the feature map.

Features are q, k or v of the **last block's attention**: the fused ``qkv`` projection's output,
all heads concatenated in head order (exactly the tensor LOST reshapes), with the class token
and every register token removed, patch tokens kept in row-major order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lostreg.backbones import Backbone

FEATURE_KINDS = ("q", "k", "v")


def padded_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Smallest multiple of ``patch_size`` covering each side (an image smaller than one
    patch becomes one patch)."""
    return (max(1, math.ceil(height / patch_size)) * patch_size,
            max(1, math.ceil(width / patch_size)) * patch_size)


def preprocess(
    image: Image.Image,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    patch_size: int,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Return the padded, normalised ``(3, Hp, Wp)`` float32 tensor and the original ``(H, W)``."""
    array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    tensor = tensor.sub(mean_t).div(std_t)
    height, width = array.shape[:2]
    padded_h, padded_w = padded_size(height, width, patch_size)
    out = torch.zeros((3, padded_h, padded_w), dtype=torch.float32)
    out[:, :height, :width] = tensor
    return out, (height, width)


def tokens_before_last_block(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run a timm ViT up to the input of its last block (all tokens, prefix included)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block in model.blocks[:-1]:
        x = block(x)
    return x


def last_qkv(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's fused ``qkv`` output ``(B, T, 3*D)`` for all T tokens.

    Only the last block's first norm and ``qkv`` projection run: the rest of it is not needed.
    """
    last = model.blocks[-1]
    if not hasattr(last, "attn") or not hasattr(last.attn, "qkv"):
        raise TypeError("backbone's last block has no fused attn.qkv projection")
    return last.attn.qkv(last.norm1(tokens_before_last_block(model, images)))


def select_feature(qkv: torch.Tensor, kind: str, num_prefix_tokens: int) -> torch.Tensor:
    """Slice q, k or v (heads concatenated in head order) and drop class + register tokens.

    timm lays ``qkv`` out as ``(3, heads, head_dim)`` along the last axis, so ``k`` with its
    heads concatenated is the contiguous middle third, the tensor LOST builds by reshaping.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature must be one of {FEATURE_KINDS}, got {kind!r}")
    dim = qkv.shape[-1] // 3
    which = FEATURE_KINDS.index(kind)
    return qkv[:, num_prefix_tokens:, which * dim:(which + 1) * dim]


@torch.inference_mode()
def extract_feature_kinds(
    backbone: Backbone,
    images: torch.Tensor,
    kinds: Sequence[str],
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Patch features ``(B, rows*cols, D)`` of padded images ``(B, 3, Hp, Wp)`` for each kind
    in ``kinds`` (q, k and v come from one forward).

    With ``autocast_dtype`` (bf16/fp16) the forward runs under autocast; the returned
    features are float32 and contiguous either way, so LOST's similarities are float32 at
    least and cached features enter LOST exactly like fresh ones.
    """
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        qkv = last_qkv(backbone.model, images)
    return {kind: select_feature(qkv, kind, backbone.num_prefix_tokens).float().contiguous()
            for kind in kinds}


def extract_features(
    backbone: Backbone,
    images: torch.Tensor,
    kind: str = "k",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One kind of ``extract_feature_kinds``."""
    return extract_feature_kinds(backbone, images, [kind], autocast_dtype)[kind]

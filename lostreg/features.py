"""Image protocol and feature extraction: LOST's, to the pixel.

Images are RGB via PIL, ``ToTensor`` (``uint8 / 255``), normalised with the model's mean/std,
**not resized**, then zero-padded at the bottom and right (after normalisation) to a multiple
of the patch size. Padding patches are part of the feature map.

Features are q, k or v of a block's attention (the **last block** unless a run asks for another
``layer``): the fused ``qkv`` projection's output, all heads concatenated in head order
(exactly the tensor LOST reshapes), with the class token and every register token removed,
patch tokens kept in row-major order. ``attn`` is the class token's attention to the patches,
per head (DINO-seg's input). Each kind is one ``FEATURE_KINDS`` entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from lostreg.backbones import Backbone
from lostreg.errors import LostregError

VECTOR_KINDS = ("q", "k", "v")


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


def tokens_before_block(model: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Run a timm ViT up to the input of block ``layer`` (all tokens, prefix included)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block in model.blocks[:layer]:
        x = block(x)
    return x


def tokens_before_last_block(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run a timm ViT up to the input of its last block (all tokens, prefix included)."""
    return tokens_before_block(model, images, len(model.blocks) - 1)


def _block_qkv(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not hasattr(block, "attn") or not hasattr(block.attn, "qkv"):
        raise TypeError("backbone's block has no fused attn.qkv projection")
    return block.attn.qkv(block.norm1(x))


def last_qkv(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's fused ``qkv`` output ``(B, T, 3*D)`` for all T tokens.

    Only the last block's first norm and ``qkv`` projection run: the rest of it is not needed.
    """
    return _block_qkv(model.blocks[-1], tokens_before_last_block(model, images))


def layer_qkv(model: torch.nn.Module, images: torch.Tensor,
              layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Fused ``qkv`` outputs ``(B, T, 3*D)`` of several blocks from one forward, keyed by the
    layer index as given (negative counts from the end). The forward stops at the deepest
    requested block's ``qkv``: nothing after it runs."""
    depth = len(model.blocks)
    resolved = {layer: resolve_layer(layer, depth) for layer in layers}
    deepest = max(resolved.values())
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    out: dict[int, torch.Tensor] = {}
    for index, block in enumerate(model.blocks[:deepest + 1]):
        wanted = [layer for layer, r in resolved.items() if r == index]
        if wanted:
            qkv = _block_qkv(block, x)
            out.update({layer: qkv for layer in wanted})
        if index < deepest:
            x = block(x)
    return out


def resolve_layer(layer: int, depth: int) -> int:
    """A block index (negative counts from the end) as a non-negative index; one clear line for
    an index the model does not have."""
    if not -depth <= layer < depth:
        raise LostregError(f"--layer {layer}: the model has {depth} blocks "
                           f"(valid indices {-depth}..{depth - 1})")
    return layer % depth


def select_feature(qkv: torch.Tensor, kind: str, num_prefix_tokens: int) -> torch.Tensor:
    """Slice q, k or v (heads concatenated in head order) and drop class + register tokens.

    timm lays ``qkv`` out as ``(3, heads, head_dim)`` along the last axis, so ``k`` with its
    heads concatenated is the contiguous middle third, the tensor LOST builds by reshaping.
    """
    if kind not in VECTOR_KINDS:
        raise ValueError(f"feature must be one of {VECTOR_KINDS}, got {kind!r}")
    dim = qkv.shape[-1] // 3
    which = VECTOR_KINDS.index(kind)
    return qkv[:, num_prefix_tokens:, which * dim:(which + 1) * dim]


def cls_attention(qkv: torch.Tensor, attn: torch.nn.Module, num_prefix_tokens: int) -> torch.Tensor:
    """The class token's attention to the **patch** tokens, per head: ``(B, N, heads)`` float32.

    As DINO's ``get_last_selfattention``: ``softmax((q_cls . k^T) * scale)`` over *all* tokens
    (class, registers, patches), then the patch columns only: registers never appear as
    patches. ``q_norm``/``k_norm`` run as in the model's own attention.
    """
    batch, tokens, _ = qkv.shape
    heads = attn.num_heads
    parts = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(parts[0]).float(), attn.k_norm(parts[1]).float()
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    logits = (q[:, :, :1] @ k.transpose(-2, -1)) * scale  # (B, heads, 1, T)
    probs = logits.softmax(dim=-1)[:, :, 0, num_prefix_tokens:]
    return probs.transpose(1, 2)


@dataclass(frozen=True)
class FeatureKind:
    """One kind of per-patch feature a method can read, computed from one block's ``qkv``.

    ``compute(qkv, block, num_prefix_tokens)`` returns ``(B, N, D)`` for the N patch tokens
    (class and register tokens dropped). Adding a kind is one ``register_feature_kind`` call.
    """

    name: str
    compute: Callable[[torch.Tensor, torch.nn.Module, int], torch.Tensor]
    description: str = ""


FEATURE_KINDS: dict[str, FeatureKind] = {}


def register_feature_kind(kind: FeatureKind) -> FeatureKind:
    FEATURE_KINDS[kind.name] = kind
    return kind


for _name in VECTOR_KINDS:
    register_feature_kind(FeatureKind(
        _name, lambda qkv, block, prefix, n=_name: select_feature(qkv, n, prefix),
        f"{_name} of the block's attention, heads concatenated in head order"))
register_feature_kind(FeatureKind(
    "attn", lambda qkv, block, prefix: cls_attention(qkv, block.attn, prefix),
    "the class token's attention to each patch, per head (DINO-seg's input)"))


class FeatureRequest(NamedTuple):
    """One feature map a run reads: a kind (``FEATURE_KINDS``) of block ``layer``'s attention
    (-1: the last block, as LOST uses)."""

    kind: str
    layer: int = -1

    @property
    def label(self) -> str:
        return self.kind if self.layer == -1 else f"{self.kind}@{self.layer}"


@torch.inference_mode()
def extract(
    backbone: Backbone,
    images: torch.Tensor,
    requests: Sequence[FeatureRequest],
    autocast_dtype: torch.dtype | None = None,
) -> dict[FeatureRequest, torch.Tensor]:
    """Patch features ``(B, rows*cols, D)`` of padded images ``(B, 3, Hp, Wp)`` for every
    request, from one forward (q, k, v and attention of any layers).

    With ``autocast_dtype`` (bf16/fp16) the forward runs under autocast; the returned
    features are float32 and contiguous either way, so LOST's similarities are float32 at
    least and cached features enter a method exactly like fresh ones.
    """
    for request in requests:
        if request.kind not in FEATURE_KINDS:
            raise ValueError(f"feature must be one of {tuple(FEATURE_KINDS)}, got {request.kind!r}")
    model = backbone.model
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        by_layer = layer_qkv(model, images, sorted({r.layer for r in requests}))
        depth = len(model.blocks)
        return {r: FEATURE_KINDS[r.kind].compute(
                    by_layer[r.layer], model.blocks[resolve_layer(r.layer, depth)],
                    backbone.num_prefix_tokens).float().contiguous()
                for r in requests}


def extract_feature_kinds(
    backbone: Backbone,
    images: torch.Tensor,
    kinds: Sequence[str],
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``extract`` for several kinds of the last block."""
    out = extract(backbone, images, [FeatureRequest(kind) for kind in kinds], autocast_dtype)
    return {request.kind: feats for request, feats in out.items()}


def extract_features(
    backbone: Backbone,
    images: torch.Tensor,
    kind: str = "k",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One kind of ``extract_feature_kinds``."""
    return extract_feature_kinds(backbone, images, [kind], autocast_dtype)[kind]

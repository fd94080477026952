"""Image protocol and feature extraction: LOST's, to the pixel.

Images are RGB via PIL, ``ToTensor`` (``uint8 / 255``), normalised with the model's mean/std,
**not resized**, then zero-padded at the bottom and right (after normalisation) to a multiple
of the patch size. Padding patches are part of the feature map.

Features are q, k or v of a block's attention (the **last block** unless a run asks for another
``layer``): the attention's projection output (fused ``qkv``, or separate q/k/v projections
concatenated in the same layout), all heads concatenated in head order (exactly the tensor LOST
reshapes), with the class token, every register token and every test-time register removed,
patch tokens kept in row-major order. ``q``/``k`` are **as projected**, for every family;
``q_rope``/``k_rope`` are what a RoPE model's attention multiplies (after its q/k norms and the
rotation); ``attn`` is the class token's attention to the patches, per head, from the
attention's real logits (DINO-seg's input); ``own`` is what a plug-in model that returns its own
features gives (:mod:`lostreg.backbones.plugin`). Each kind is one ``FEATURE_KINDS`` entry.

Everything is read with forward hooks during the model's own forward
(:mod:`lostreg.backbones.families`), which stops as soon as the deepest requested block's
projection has run: later blocks, the final norm and the head never run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from lostreg.backbones import Backbone
from lostreg.backbones.families import Capture, Family, StopForward, family_of
from lostreg.backbones.plugin import OWN_KIND, OwnFeaturesBackbone
from lostreg.backbones.ttr import num_suffix_tokens
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


# --- one forward, hooks, early stop ------------------------------------------------------------


@dataclass
class Taps:
    """What one forward captured: per block, its attention's inputs (``qkv``), its output
    (``outputs``), its input (``inputs``), and the patch embedding (``embedded``)."""

    qkv: dict[int, Capture] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    embedded: torch.Tensor | None = None


def run_taps(model: torch.nn.Module, images: torch.Tensor, qkv: Iterable[int] = (),
             outputs: Iterable[int] = (), inputs: Iterable[int] = (), embedded: bool = False,
             family: Family | None = None) -> Taps:
    """Run the model's forward (``family.forward``) on ``images`` with hooks capturing what is
    asked for (non-negative block indices), stopping the forward as soon as the last of it is
    captured."""
    family = family or family_of(model)
    blocks = family.blocks(model)
    taps = Taps()
    pending = {("qkv", i) for i in qkv} | {("out", i) for i in outputs} | {("in", i) for i in inputs}
    if embedded:
        pending.add(("embed", -1))
    if not pending:
        return taps

    def done(item: tuple[str, int]) -> None:
        pending.discard(item)
        if not pending:
            raise StopForward

    def capture_ready(index: int) -> Callable[[], None]:
        def ready() -> None:
            if taps.qkv[index].qkv is not None:
                done(("qkv", index))
        return ready

    handles = []
    for index in sorted({i for kind, i in pending if kind == "qkv"}):
        taps.qkv[index] = Capture()
        handles += family.tap(blocks[index], taps.qkv[index], capture_ready(index))
    def keep(store: Callable[[torch.Tensor], None], item: tuple[str, int]) -> Callable:
        def hook(_module, args, output=None):  # forward hook or pre-hook: never replaces
            store(args[0] if output is None else output)
            done(item)
        return hook

    for index in sorted({i for kind, i in pending if kind == "out"}):
        handles.append(blocks[index].register_forward_hook(
            keep(lambda t, i=index: taps.outputs.__setitem__(i, t), ("out", index))))
    for index in sorted({i for kind, i in pending if kind == "in"}):
        handles.append(blocks[index].register_forward_pre_hook(
            keep(lambda t, i=index: taps.inputs.__setitem__(i, t), ("in", index))))
    if embedded:
        handles.append(family.patch_embedding(model).register_forward_hook(
            keep(lambda t: setattr(taps, "embedded", t), ("embed", -1))))
    try:
        family.forward(model, images)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if pending:
        raise RuntimeError(f"the forward finished without reaching {sorted(pending)}")
    return taps


def resolve_layer(layer: int, depth: int) -> int:
    """A block index (negative counts from the end) as a non-negative index; one clear line for
    an index the model does not have."""
    if not -depth <= layer < depth:
        raise LostregError(f"--layer {layer}: the model has {depth} blocks "
                           f"(valid indices {-depth}..{depth - 1})")
    return layer % depth


def tokens_before_block(model: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """The input of block ``layer`` (all tokens, prefix and suffix included), from the model's
    own forward stopped there."""
    family = family_of(model)
    index = resolve_layer(layer, len(family.blocks(model)))
    return run_taps(model, images, inputs=[index], family=family).inputs[index]


def tokens_before_last_block(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input of the model's last block (all tokens, prefix included)."""
    return tokens_before_block(model, images, -1)


def layer_qkv(model: torch.nn.Module, images: torch.Tensor,
              layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Fused ``qkv`` outputs ``(B, T, 3*D)`` of several blocks from one forward, keyed by the
    layer index as given (negative counts from the end). The forward stops at the deepest
    requested block's projection: nothing after it runs."""
    family = family_of(model)
    depth = len(family.blocks(model))
    resolved = {layer: resolve_layer(layer, depth) for layer in layers}
    taps = run_taps(model, images, qkv=set(resolved.values()), family=family)
    return {layer: taps.qkv[index].qkv for layer, index in resolved.items()}  # type: ignore[misc]


def last_qkv(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's fused ``qkv`` output ``(B, T, 3*D)`` for all T tokens."""
    return layer_qkv(model, images, [-1])[-1]


# --- feature kinds ---------------------------------------------------------------------------


def select_feature(qkv: torch.Tensor, kind: str, num_prefix_tokens: int,
                   num_suffix_tokens: int = 0) -> torch.Tensor:
    """Slice q, k or v (heads concatenated in head order) and drop class, register and
    test-time register tokens.

    timm lays ``qkv`` out as ``(3, heads, head_dim)`` along the last axis, so ``k`` with its
    heads concatenated is the contiguous middle third, the tensor LOST builds by reshaping.
    """
    if kind not in VECTOR_KINDS:
        raise ValueError(f"feature must be one of {VECTOR_KINDS}, got {kind!r}")
    dim = qkv.shape[-1] // 3
    which = VECTOR_KINDS.index(kind)
    return qkv[:, num_prefix_tokens:qkv.shape[1] - num_suffix_tokens, which * dim:(which + 1) * dim]


@dataclass
class LayerQKV:
    """One block's attention inputs as a feature kind sees them."""

    qkv: torch.Tensor  # (B, T, 3*D): projection output, all tokens
    block: torch.nn.Module
    rope: torch.Tensor | None
    family: Family
    num_prefix_tokens: int
    num_suffix_tokens: int = 0
    has_class_token: bool = True

    @property
    def attn(self) -> torch.nn.Module:
        return self.block.attn

    def heads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as projected, ``(B, heads, T, head_dim)``."""
        batch, tokens, _ = self.qkv.shape
        parts = self.qkv.reshape(batch, tokens, 3, self.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return parts[0], parts[1], parts[2]

    def attention_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k exactly as the attention multiplies them (q/k norms, RoPE), ``(B, H, T, hd)``."""
        q, k, v = self.heads()
        return self.family.rotate(self.attn, q, k, self.rope, v.dtype)

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens of ``(B, T, ...)``."""
        return tokens[:, self.num_prefix_tokens:tokens.shape[1] - self.num_suffix_tokens]


def _heads_concatenated(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, hd)`` -> ``(B, T, H*hd)``, heads in head order."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _rotated(layer: LayerQKV, which: int) -> torch.Tensor:
    if layer.rope is None:
        raise LostregError("feature q_rope/k_rope needs a model with rotary position embeddings "
                           "(EVA-02, DINOv3); this model has none: use q or k")
    return layer.patches(_heads_concatenated(layer.attention_qk()[which]))


def _class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int,
                     num_suffix_tokens: int) -> torch.Tensor:
    """``softmax((q_cls . k^T) * scale)`` over all tokens, patch columns kept: ``(B, N, heads)``."""
    logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * scale  # (B, heads, 1, T)
    probs = logits.softmax(dim=-1)[:, :, 0, num_prefix_tokens:k.shape[2] - num_suffix_tokens]
    return probs.transpose(1, 2)


def cls_attention(qkv: torch.Tensor, attn: torch.nn.Module, num_prefix_tokens: int,
                  num_suffix_tokens: int = 0) -> torch.Tensor:
    """The class token's attention to the **patch** tokens, per head: ``(B, N, heads)`` float32,
    for a model without RoPE (see the ``attn`` feature kind for any family).

    As DINO's ``get_last_selfattention``: ``softmax((q_cls . k^T) * scale)`` over *all* tokens
    (class, registers, patches, test-time registers), then the patch columns only: registers
    never appear as patches. ``q_norm``/``k_norm`` run as in the model's own attention.
    """
    batch, tokens, _ = qkv.shape
    parts = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(parts[0]), attn.k_norm(parts[1])
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    return _class_attention(q, k, scale, num_prefix_tokens, num_suffix_tokens)


def _attention_feature(layer: LayerQKV) -> torch.Tensor:
    if not layer.has_class_token:
        raise LostregError("feature attn is the class token's attention, and this model has no "
                           "class token")
    q, k = layer.attention_qk()
    scale = getattr(layer.attn, "scale", q.shape[-1] ** -0.5)
    return _class_attention(q, k, scale, layer.num_prefix_tokens, layer.num_suffix_tokens)


@dataclass(frozen=True)
class FeatureKind:
    """One kind of per-patch feature a method can read, computed from one block's attention
    inputs. ``compute(layer: LayerQKV)`` returns ``(B, N, D)`` for the N patch tokens (class,
    register and test-time register tokens dropped). Adding a kind is one
    ``register_feature_kind`` call.

    ``embedding``: each patch's row is an embedding vector (q, k, v, with or without RoPE), what
    a method that compares patches with each other (LOST, TokenCut) can read; False for a kind
    that is something else per patch (``attn``: one attention weight per head), which only a
    method that names it in ``MethodSpec.feature_kinds`` reads."""

    name: str
    compute: Callable[[LayerQKV], torch.Tensor]
    description: str = ""
    embedding: bool = True


FEATURE_KINDS: dict[str, FeatureKind] = {}


def register_feature_kind(kind: FeatureKind) -> FeatureKind:
    FEATURE_KINDS[kind.name] = kind
    return kind


for _name in VECTOR_KINDS:
    register_feature_kind(FeatureKind(
        _name, lambda layer, n=_name: select_feature(layer.qkv, n, layer.num_prefix_tokens,
                                                     layer.num_suffix_tokens),
        f"{_name} of the block's attention as projected (before any RoPE), heads concatenated"))
register_feature_kind(FeatureKind(
    "q_rope", lambda layer: _rotated(layer, 0),
    "q as the attention uses it: after the q norm and the rotary position embedding"))
register_feature_kind(FeatureKind(
    "k_rope", lambda layer: _rotated(layer, 1),
    "k as the attention uses it: after the k norm and the rotary position embedding"))
register_feature_kind(FeatureKind(
    "attn", _attention_feature,
    "the class token's attention to each patch, per head (DINO-seg's input)", embedding=False))


def _not_own(layer: LayerQKV) -> torch.Tensor:
    raise LostregError(f"--features {OWN_KIND}: the features a plug-in model returns itself; "
                       "this model's features are read from its attention (q, k, v, attn)")


register_feature_kind(FeatureKind(
    OWN_KIND, _not_own, "the patch features a plug-in model returns itself (its default)"))


class FeatureRequest(NamedTuple):
    """One feature map a run reads: a kind (``FEATURE_KINDS``) of block ``layer``'s attention
    (-1: the last block, as LOST uses)."""

    kind: str
    layer: int = -1

    @property
    def label(self) -> str:
        return self.kind if self.layer == -1 else f"{self.kind}@{self.layer}"


def layer_view(backbone: Backbone, qkv: torch.Tensor, index: int,
               rope: torch.Tensor | None = None) -> LayerQKV:
    """``LayerQKV`` of block ``index`` (non-negative) from its projection output ``qkv`` and the
    RoPE table its attention received (None without RoPE)."""
    model, family = backbone.model, backbone.family
    return LayerQKV(qkv, family.blocks(model)[index], rope, family, backbone.num_prefix_tokens,
                    backbone.num_suffix_tokens, family.has_class_token(model))


def layer_views(backbone: Backbone, taps: Taps, layers: dict[int, int]) -> dict[int, LayerQKV]:
    """``LayerQKV`` per requested layer (as given) from captured ``taps``."""
    return {layer: layer_view(backbone, taps.qkv[index].qkv, index,  # type: ignore[arg-type]
                              taps.qkv[index].rope) for layer, index in layers.items()}


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
            raise LostregError(f"--features {request.kind}: unknown feature kind (known: "
                               f"{', '.join(FEATURE_KINDS)})")
    if isinstance(backbone, OwnFeaturesBackbone):
        return own_features(backbone, images, requests, autocast_dtype)
    model = backbone.model
    layers = {r.layer: resolve_layer(r.layer, backbone.depth) for r in requests}
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        taps = run_taps(model, images, qkv=set(layers.values()), family=backbone.family)
        views = layer_views(backbone, taps, layers)
        return {r: FEATURE_KINDS[r.kind].compute(views[r.layer]).float().contiguous()
                for r in requests}


def own_features(backbone: OwnFeaturesBackbone, images: torch.Tensor,
                 requests: Sequence[FeatureRequest], autocast_dtype: torch.dtype | None = None
                 ) -> dict[FeatureRequest, torch.Tensor]:
    """The maps of a plug-in model that returns its own features (``own``, and ``attn`` when
    it returns the class token's attention), from one call; anything else is one line."""
    for request in requests:
        backbone.check_request(request.kind, request.layer)
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        out = backbone.patch_features(images)
    return {r: (out.feats if r.kind == OWN_KIND else out.attn).float().contiguous()  # type: ignore[union-attr]
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


__all__ = [
    "FEATURE_KINDS", "FeatureKind", "FeatureRequest", "LayerQKV", "Taps", "VECTOR_KINDS",
    "cls_attention", "extract", "extract_feature_kinds", "extract_features", "last_qkv",
    "layer_qkv", "layer_view", "layer_views", "num_suffix_tokens", "own_features", "padded_size",
    "preprocess",
    "register_feature_kind", "resolve_layer", "run_taps", "select_feature",
    "tokens_before_block", "tokens_before_last_block",
]

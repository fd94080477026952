"""What the analyses read out of a ViT: block outputs, the input patch embedding, and the last
block's attention of the prefix tokens (class, registers, test-time registers) to the patches.

All of it comes from the model's own forward with hooks (``lostreg.features.extract.run_taps``), so the
forward is exactly the benchmark's (same position-embedding interpolation, padding, RoPE,
test-time registers) for every supported family, and stops after the last block it needs.

Test-time registers sit after the patch tokens; the analyses see them where registers are:
:func:`block_outputs` drops them like the benchmark's features do, and :func:`panel_readout`
moves them into the prefix so the panels show their attention like a register's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lostreg.backbones import Backbone
from lostreg.backbones.families import family_of
from lostreg.backbones.ttr import num_suffix_tokens
from lostreg.errors import LostregError
from lostreg.features.extract import FEATURE_KINDS, layer_views, resolve_layer, run_taps


def resolve_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Block indices (negative counts from the end) -> sorted unique non-negative indices.

    ``None`` or empty means the last block. Raises ``LostregError`` for an index out of range.
    """
    if not layers:
        return [depth - 1]
    resolved = set()
    for layer in layers:
        if not -depth <= layer < depth:
            raise LostregError(f"--layers {layer}: the model has {depth} blocks "
                               f"(valid indices {-depth}..{depth - 1})")
        resolved.add(layer % depth)
    return sorted(resolved)


def _as_grid(embedded: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``patch_embed`` output as ``(B, R, C, D)`` whatever its layout (NHWC or flat NLC)."""
    if embedded.ndim == 4:
        return embedded
    batch, _, dim = embedded.shape
    return embedded.reshape(batch, grid[0], grid[1], dim)


def _without_suffix(tokens: torch.Tensor, suffix: int) -> torch.Tensor:
    return tokens[:, :tokens.shape[1] - suffix] if suffix else tokens


@torch.inference_mode()
def block_outputs(
    model: torch.nn.Module, images: torch.Tensor, layers: Sequence[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``model`` on padded ``images`` and return what the norm analysis needs.

    Returns the input patch embedding (output of ``model.patch_embed``, i.e. *before* position
    embeddings) as ``(B, R, C, D)`` and ``{layer: (B, T, D)}``, the output of each requested
    block (prefix first, then patches; test-time registers dropped) *before* the final
    ``model.norm``. ``layers`` are non-negative block indices (see :func:`resolve_layers`).
    """
    taps = run_taps(model, images, outputs=layers, embedded=True)
    patch = getattr(model.patch_embed, "patch_size", None)
    p_h, p_w = (int(patch[0]), int(patch[1])) if patch is not None else (1, 1)
    grid = (images.shape[-2] // p_h, images.shape[-1] // p_w)
    embedded = _as_grid(taps.embedded, grid)  # type: ignore[arg-type]
    suffix = num_suffix_tokens(model)
    return embedded, {layer: _without_suffix(taps.outputs[layer], suffix) for layer in layers}


def attention_from_qkv(attn: torch.nn.Module, qkv: torch.Tensor,
                       num_prefix_tokens: int) -> torch.Tensor:
    """Prefix-to-patch attention ``(B, P, N)`` from a block's fused ``qkv`` output ``(B, T, 3D)``
    of a model without RoPE or test-time registers (see :func:`panel_readout` for any).

    ``softmax(q_prefix . k_patches^T / sqrt(head_dim))`` per head (the softmax runs over the
    patch keys only, as in Darcet et al.'s Figure 9), then the mean over heads; float32.
    """
    batch, tokens, _ = qkv.shape
    parts = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return _prefix_attention(attn.q_norm(parts[0]), attn.k_norm(parts[1]),
                             num_prefix_tokens, tokens)


def _prefix_attention(q: torch.Tensor, k: torch.Tensor, num_prefix: int,
                      patch_end: int) -> torch.Tensor:
    """``softmax(q[:, :, :P] . k[:, :, P:patch_end]^T / sqrt(hd))`` averaged over heads."""
    head_dim = q.shape[-1]
    q_prefix = q[:, :, :num_prefix].float()
    k_patches = k[:, :, num_prefix:patch_end].float()
    logits = q_prefix @ k_patches.transpose(-1, -2) / head_dim ** 0.5
    return logits.softmax(dim=-1).mean(dim=1)


@torch.inference_mode()
def last_block_readout(model: torch.nn.Module, images: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward giving the last block's fused ``qkv`` ``(B, T, 3D)`` (exactly
    ``lostreg.features.extract.last_qkv``, all tokens) and the block's output ``(B, T, D)`` (before
    the final norm, all tokens)."""
    family = family_of(model)
    last = len(family.blocks(model)) - 1
    taps = run_taps(model, images, qkv=[last], outputs=[last], family=family)
    return taps.qkv[last].qkv, taps.outputs[last]  # type: ignore[return-value]


def token_names(backbone: Backbone) -> list[str]:
    """Names of the register-like tokens in panel order: class token, registers (trained),
    then test-time registers."""
    model = backbone.model
    names = ["CLS"] if getattr(model, "cls_token", None) is not None else []
    names += [f"register {i + 1}" for i in range(backbone.num_prefix_tokens - len(names))]
    names += ["test-time register" if backbone.num_suffix_tokens == 1 else
              f"test-time register {i + 1}" for i in range(backbone.num_suffix_tokens)]
    return names


@dataclass
class PanelReadout:
    """One forward's worth of what a panel shows, test-time registers moved into the prefix:
    ``features`` ``(B, N, D)`` (the run's feature), ``output`` ``(B, P+N, D)`` (last block's
    output, prefix first), ``attention`` ``(B, P, N)`` (each prefix token's attention to the
    patches, real logits incl. RoPE), ``names`` (P names), ``num_prefix_tokens`` (P)."""

    features: torch.Tensor
    output: torch.Tensor
    attention: torch.Tensor
    names: list[str]
    num_prefix_tokens: int


def _suffix_to_prefix(tokens: torch.Tensor, prefix: int, suffix: int, dim: int = 1) -> torch.Tensor:
    """``[prefix, patches, suffix]`` -> ``[prefix, suffix, patches]`` along ``dim``."""
    if not suffix:
        return tokens
    end = tokens.shape[dim] - suffix
    return torch.cat([tokens.narrow(dim, 0, prefix), tokens.narrow(dim, end, suffix),
                      tokens.narrow(dim, prefix, end - prefix)], dim=dim)


@torch.inference_mode()
def panel_readout(backbone: Backbone, images: torch.Tensor, feature: str = "k",
                  layer: int = -1) -> PanelReadout:
    """The run's feature (``feature`` of block ``layer``), the last block's output and its
    prefix attention, from one forward of ``backbone``."""
    if feature not in FEATURE_KINDS:
        raise LostregError(f"feature {feature!r} is not known to this lostreg (known: "
                           f"{', '.join(FEATURE_KINDS)})")
    model = backbone.model
    depth = backbone.depth
    last, index = depth - 1, resolve_layer(layer, depth)
    taps = run_taps(model, images, qkv={index, last}, outputs=[last], family=backbone.family)
    views = layer_views(backbone, taps, {layer: index, -1: last})
    features = FEATURE_KINDS[feature].compute(views[layer]).float()
    prefix, suffix = backbone.num_prefix_tokens, backbone.num_suffix_tokens
    q, k = views[-1].attention_qk()
    q, k = (_suffix_to_prefix(t, prefix, suffix, dim=2) for t in (q, k))
    total = prefix + suffix
    attention = (_prefix_attention(q, k, total, k.shape[2]) if total
                 else q.new_zeros((q.shape[0], 0, k.shape[2]), dtype=torch.float32))
    output = _suffix_to_prefix(taps.outputs[last], prefix, suffix)
    return PanelReadout(features, output, attention, token_names(backbone), total)

"""What the analyses read out of a timm ViT: block outputs, the input patch embedding, and the
last block's attention of the prefix tokens (class + registers) to the patches.

All of it reuses ``lostreg.features.tokens_before_last_block`` so the forward is exactly the
benchmark's (same position-embedding interpolation, same padding), with forward hooks to catch
intermediate outputs instead of a second copy of the forward loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lostreg.errors import LostregError
from lostreg.features import tokens_before_last_block


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


@torch.inference_mode()
def block_outputs(
    model: torch.nn.Module, images: torch.Tensor, layers: Sequence[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``model`` on padded ``images`` and return what the norm analysis needs.

    Returns the input patch embedding (output of ``model.patch_embed``, i.e. *before* position
    embeddings) as ``(B, R, C, D)`` and ``{layer: (B, T, D)}``, the output of each requested
    block (all tokens, prefix first) *before* the final ``model.norm``. ``layers`` are
    non-negative block indices (see :func:`resolve_layers`).
    """
    captured: dict[str, torch.Tensor] = {}
    handles = [model.patch_embed.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("patch_embed", out))]
    for layer in layers:
        handles.append(model.blocks[layer].register_forward_hook(
            lambda _m, _i, out, key=f"block{layer}": captured.__setitem__(key, out)))
    try:
        model.blocks[-1](tokens_before_last_block(model, images))
    finally:
        for handle in handles:
            handle.remove()
    patch = getattr(model.patch_embed, "patch_size", None)
    p_h, p_w = (int(patch[0]), int(patch[1])) if patch is not None else (1, 1)
    grid = (images.shape[-2] // p_h, images.shape[-1] // p_w)
    embedded = _as_grid(captured["patch_embed"], grid)
    return embedded, {layer: captured[f"block{layer}"] for layer in layers}


def attention_from_qkv(attn: torch.nn.Module, qkv: torch.Tensor,
                       num_prefix_tokens: int) -> torch.Tensor:
    """Prefix-to-patch attention ``(B, P, N)`` from a block's fused ``qkv`` output ``(B, T, 3D)``.

    ``softmax(q_prefix . k_patches^T / sqrt(head_dim))`` per head (the softmax runs over the
    patch keys only, as in Darcet et al.'s Figure 9), then the mean over heads; float32.
    """
    batch, tokens, _ = qkv.shape
    parts = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(parts[0]), attn.k_norm(parts[1])
    head_dim = q.shape[-1]
    q_prefix = q[:, :, :num_prefix_tokens].float()
    k_patches = k[:, :, num_prefix_tokens:].float()
    logits = q_prefix @ k_patches.transpose(-1, -2) / head_dim ** 0.5
    return logits.softmax(dim=-1).mean(dim=1)


@torch.inference_mode()
def last_block_readout(model: torch.nn.Module, images: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward giving the last block's fused ``qkv`` ``(B, T, 3D)`` (exactly
    ``lostreg.features.last_qkv``) and the block's output ``(B, T, D)`` (before the final norm)."""
    last = model.blocks[-1]
    if not hasattr(last, "attn") or not hasattr(last.attn, "qkv"):
        raise TypeError("backbone's last block has no fused attn.qkv projection")
    x = tokens_before_last_block(model, images)
    return last.attn.qkv(last.norm1(x)), last(x)

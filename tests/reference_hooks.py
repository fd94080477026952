"""The last block's keys and attention read the way the reference scripts (LOST, TokenCut)
read them: hooks on timm's own unfused forward, keys reshaped as LOST's ``main_lost.py`` does.
Shared by the tests that hold lostreg's feature path against that independent one."""

from __future__ import annotations

import torch


def last_block_tokens(backbone, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``(T, D)`` of every token (class and register tokens first) and the attention
    ``(heads, T, T)`` of the last block, for a batch of one normalised image."""
    attn = backbone.model.blocks[-1].attn
    store = {}
    hooks = [attn.qkv.register_forward_hook(lambda m, a, out: store.setdefault("qkv", out)),
             attn.attn_drop.register_forward_hook(lambda m, a, out: store.setdefault("attn", out))]
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            backbone.model.forward_features(batch)
    finally:
        attn.fused_attn = fused
        for hook in hooks:
            hook.remove()
    qkv = store["qkv"]
    b, t, _ = qkv.shape
    keys = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[1]
    return keys.transpose(1, 2).reshape(b, t, -1)[0], store["attn"][0]

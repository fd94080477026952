"""Model families: where a timm model's attention projections, RoPE and MLP neurons live.

Features are read with forward hooks during the model's **own** forward, never with a copy of
it: a copy silently diverges when a family adds a step (EVA's RoPE, DINOv3's storage tokens,
patch dropout). A family tells :mod:`lostreg.features.extract` three things:

* ``tap``: hooks that hand over one block's q/k/v projection output (fused layout
  ``(B, T, 3*D)``: q heads, then k heads, then v heads, each in head order) and the RoPE table
  the block's attention receives;
* ``rotate``: the attention's own q/k transform after projection (q/k norms, RoPE), so ``attn``,
  ``q_rope`` and ``k_rope`` are what the attention really multiplies;
* ``neuron_module``: the module whose output is the MLP's hidden activation (test-time
  registers write there), and ``append_tokens`` (where a test-time register enters).

The family also owns the model's layout (``blocks``, ``num_prefix_tokens``,
``has_class_token``, ``patch_embedding``, ``forward``): timm's by default, so a family of models
without ``.blocks`` or a class token overrides those and nothing else in lostreg changes.
Adding a family is one ``register_family`` call in this module (or in a module of one's own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from lostreg.errors import LostregError


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook once everything a caller asked for is captured: the rest of the
    forward (later blocks, the final norm, the head) never runs."""


@dataclass
class Capture:
    """What one block's attention received: its projection outputs and its RoPE table."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    rope: torch.Tensor | None = None

    @property
    def qkv(self) -> torch.Tensor | None:
        """Fused ``(B, T, 3*D)`` q/k/v, or None while the projections have not all run."""
        if "qkv" in self.parts:
            return self.parts["qkv"]
        if all(name in self.parts for name in ("q", "k", "v")):
            return torch.cat([self.parts["q"], self.parts["k"], self.parts["v"]], dim=-1)
        return None


class Family:
    """How lostreg reads one family of timm models. Subclasses override what differs."""

    name = ""
    description = ""

    def model_class(self) -> type | None:
        """The timm class this family reads. Imported when first asked, not when lostreg is
        imported: timm takes seconds to import, and the run imports it in a background thread
        while it reads the dataset (``pipeline.warm_start``)."""
        return None

    def matches(self, model: nn.Module) -> bool:
        model_class = self.model_class()
        return model_class is not None and isinstance(model, model_class)

    def unsupported(self, model: nn.Module) -> str | None:
        """Why this model cannot be read (one clause), or None."""
        return None

    # The model's layout. timm's ViTs hold their blocks in ``model.blocks``, their class and
    # register tokens in front of the patches (``num_prefix_tokens``) and embed patches in
    # ``model.patch_embed``; a family of models laid out otherwise overrides these, and the
    # rest of lostreg asks the family, never the model.

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order (``--layer`` indexes them)."""
        return model.blocks

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches (class, registers, storage tokens): never features."""
        return int(model.num_prefix_tokens)

    def has_class_token(self, model: nn.Module) -> bool:
        """Whether token 0 is a class token (the ``attn`` feature kind needs one)."""
        return getattr(model, "cls_token", None) is not None

    def patch_embedding(self, model: nn.Module) -> nn.Module:
        """The module whose output is the embedded patches (analyses hook it)."""
        return model.patch_embed

    def forward(self, model: nn.Module, images: torch.Tensor) -> None:
        """Run the model up to its last block; hooks capture what is read and stop it early."""
        model.forward_features(images)

    def tap(self, block: nn.Module, capture: Capture,
            ready: Callable[[], None]) -> list[RemovableHandle]:
        raise NotImplementedError

    def rotate(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
               rope: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k ``(B, H, T, hd)`` after the attention's own norms (and RoPE where it has it)."""
        return attn.q_norm(q), attn.k_norm(k)

    def checkpoint_filter(self) -> Callable:
        raise NotImplementedError

    def append_tokens(self, model: nn.Module, count: int) -> None:
        raise NotImplementedError

    def neuron_module(self, block: nn.Module) -> nn.Module:
        """The module whose output is the MLP's hidden activation ``(B, T, hidden)``: the GELU
        of a plain MLP (as the test-time-registers code hooks ``mlp.act``), the gated product
        of a GLU MLP (their ``hidden_identity``)."""
        from timm.layers import Mlp

        mlp = block.mlp
        if isinstance(mlp, Mlp):
            return mlp.act
        if hasattr(mlp, "drop1") and hasattr(mlp, "fc2"):
            return mlp.drop1
        raise LostregError(f"MLP {type(mlp).__name__} has no hidden activation lostreg can hook")

    def num_registers(self, model: nn.Module) -> int:
        reg = getattr(model, "reg_token", None)
        return int(reg.shape[1]) if reg is not None else 0


def _zeros_after(x: torch.Tensor, count: int) -> torch.Tensor:
    """``x`` ``(B, T, D)`` with ``count`` zero tokens appended (the test-time register)."""
    return torch.cat([x, x.new_zeros(x.shape[0], count, x.shape[-1])], dim=1)


def _wrap_pos_embed(model: nn.Module, after: Callable) -> None:
    """Wrap the model's ``_pos_embed`` (timm's, or lostreg's resampling replacement)."""
    inner = model._pos_embed
    model._pos_embed = lambda x: after(inner(x))  # type: ignore[method-assign]


class ViTFamily(Family):
    name = "vit"
    description = "timm VisionTransformer (ViT, DeiT/DeiT-III, CLIP, SigLIP, DINO, DINOv2)"

    def model_class(self) -> type:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer

    def unsupported(self, model: nn.Module) -> str | None:
        for index, block in enumerate(self.blocks(model)):
            attn = getattr(block, "attn", None)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear):
                return f"block {index} has no fused attn.qkv projection ({type(block).__name__})"
        return None

    def tap(self, block: nn.Module, capture: Capture,
            ready: Callable[[], None]) -> list[RemovableHandle]:
        def on_qkv(_module, _inputs, output):
            capture.parts["qkv"] = output
            ready()

        return [block.attn.qkv.register_forward_hook(on_qkv)]

    def checkpoint_filter(self) -> Callable:
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn

    def append_tokens(self, model: nn.Module, count: int) -> None:
        _wrap_pos_embed(model, lambda x: _zeros_after(x, count))


def extend_rope(rope: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """The RoPE table (``[..., tokens, 2*d]``, sin then cos) with ``count`` identity rows
    (sin 0, cos 1) appended: a test-time register gets no rotation, like a prefix token."""
    if rope is None:
        return None
    half = rope.shape[-1] // 2
    shape = (*rope.shape[:-2], count, half)
    identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
    return torch.cat([rope, identity], dim=-2)


class EvaFamily(Family):
    name = "eva"
    description = "timm Eva (EVA-02, DINOv3, timm's RoPE ViTs)"

    def model_class(self) -> type:
        from timm.models.eva import Eva

        return Eva

    def unsupported(self, model: nn.Module) -> str | None:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention

        for index, block in enumerate(self.blocks(model)):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, (EvaAttention, AttentionRope)):
                return f"block {index} has attention {type(attn).__name__}"
            if getattr(attn, "num_kv_groups", 1) != 1:
                return f"block {index} uses grouped-query attention (fewer k/v heads than q heads)"
        return None

    def tap(self, block: nn.Module, capture: Capture,
            ready: Callable[[], None]) -> list[RemovableHandle]:
        attn = block.attn
        fused_bias = attn.qkv is not None and getattr(attn, "q_bias", None) is not None

        def on_attention_input(_module, args, kwargs):
            capture.rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
            if fused_bias:  # EvaAttention adds its q/k/v bias in F.linear: qkv is never called
                x = args[0]
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                if attn.qkv_bias_separate:
                    capture.parts["qkv"] = attn.qkv(x) + bias
                else:
                    capture.parts["qkv"] = F.linear(x, weight=attn.qkv.weight, bias=bias)
                ready()

        def store(name: str):
            def hook(_module, _inputs, output):
                capture.parts[name] = output
                ready()
            return hook

        handles = [attn.register_forward_pre_hook(on_attention_input, with_kwargs=True)]
        if fused_bias:
            return handles
        if attn.qkv is not None:
            return handles + [attn.qkv.register_forward_hook(store("qkv"))]
        return handles + [getattr(attn, f"{n}_proj").register_forward_hook(store(n))
                          for n in ("q", "k", "v")]

    def rotate(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
               rope: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``EvaAttention``/``AttentionRope``: q/k norms, then RoPE on every token after the
        attention's ``num_prefix_tokens`` (class and storage tokens are not rotated)."""
        from timm.layers import apply_rot_embed_cat

        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is None:
            return q, k
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        return q.to(dtype), k.to(dtype)

    def checkpoint_filter(self) -> Callable:
        from timm.models.eva import checkpoint_filter_fn

        return checkpoint_filter_fn

    def append_tokens(self, model: nn.Module, count: int) -> None:
        _wrap_pos_embed(model, lambda out: (_zeros_after(out[0], count), extend_rope(out[1], count)))


FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    FAMILIES.append(family)
    return family


register_family(ViTFamily())
register_family(EvaFamily())


def supported_families() -> str:
    return "; ".join(f.description for f in FAMILIES)


def family_of(model: nn.Module, label: str | None = None) -> Family:
    """The family that reads ``model``; one ``LostregError`` line saying why when none can."""
    label = label or type(model).__name__
    for family in FAMILIES:
        if family.matches(model):
            reason = family.unsupported(model)
            if reason is not None:
                raise LostregError(f"{label}: not supported ({reason}); lostreg reads q/k/v from "
                                   f"{supported_families()}")
            return family
    raise LostregError(f"{label}: {type(model).__name__} models are not supported; lostreg reads "
                       f"q/k/v from {supported_families()}")

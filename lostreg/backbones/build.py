"""Build a ready backbone: the timm model, its weights, and the family-specific set-up
(position-embedding resampling, DINOv3's RoPE periods, test-time registers)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lostreg.backbones.families import Family, family_of
from lostreg.backbones.pos_embed import install_pos_embed
from lostreg.backbones.registry import (
    BackboneSpec,
    get_backbone_spec,
    with_pos_interp,
    with_test_time_registers,
)
from lostreg.backbones.ttr import install_test_time_registers
from lostreg.backbones.weights import WeightsInfo, load_checkpoint, normalisation, resolve_weights
from lostreg.errors import LostregError


@dataclass
class Backbone:
    """A ready model with what preprocessing and feature extraction need.

    Tokens are laid out ``[prefix (class, registers), patches (row-major), suffix]``: the
    ``num_suffix_tokens`` test-time registers come last and, like registers, are never
    features. ``reader``: the family that reads a plug-in module of the usual attention layout
    (``lostreg.backbones.plugin``), which no timm family claims; None finds the timm family."""

    spec: BackboneSpec
    model: torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsInfo
    num_prefix_tokens: int
    num_suffix_tokens: int = 0
    reader: Family | None = None

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def depth(self) -> int:
        """Number of transformer blocks (valid ``--layer`` values: -depth..depth-1)."""
        return len(self.family.blocks(self.model))

    @property
    def family(self) -> Family:
        return self.reader if self.reader is not None else family_of(self.model, self.spec.name)


def build_model(spec: BackboneSpec, meta: bool = False) -> torch.nn.Module:
    """The timm model of ``spec`` (untrained; ``meta``: shapes only, no memory), running at
    each image's own resolution (``dynamic_img_size``)."""
    import timm

    kwargs = dict(spec.model_kwargs)
    kwargs.setdefault("dynamic_img_size", True)
    try:
        if meta and "weight_init" not in kwargs:
            try:  # shapes only: skip the weight init (a third of a cached rerun's time)
                with torch.device("meta"):
                    return timm.create_model(spec.timm_name, pretrained=False,
                                             weight_init="skip", **kwargs)
            except TypeError:  # a model without timm's weight_init switch
                pass
        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, AssertionError, ValueError) as exc:
        raise LostregError(f"cannot create timm model {spec.timm_name!r}: {exc}") from None


def _round_rope_periods(model: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Released DINOv3 checkpoints store the RoPE periods in bfloat16 and the official model
    runs with those values; timm regenerates them in float32. Use the file's own periods when
    it has them (an official checkpoint), else round timm's to bfloat16 as the release did."""
    rope = getattr(model, "rope", None)
    periods = getattr(rope, "periods", None)
    if periods is None:
        return
    released = (state or {}).get("rope_embed.periods")
    with torch.no_grad():
        if released is not None and released.shape == periods.shape:
            periods.copy_(released.to(periods.dtype))
        else:
            periods.copy_(periods.to(torch.bfloat16).to(periods.dtype))


def create_backbone(
    name: str | BackboneSpec,
    weights: str = "hub",
    device: str | torch.device = "cpu",
    seed: int = 0,
    pos_interp: str | None = None,
    ttr_neurons: str | Path | None = None,
) -> Backbone:
    """Build the model for ``name`` with ``weights`` = ``hub`` | a checkpoint path | ``random``.

    ``pos_interp`` (``original`` | ``timm``; None keeps the spec's) and ``ttr_neurons`` (a
    ``--ttr-neurons`` file for a ``+ttr`` name or spec) modify the spec before anything is
    built; ``backbone.spec`` is the spec actually run. ``random`` initialises with a fixed
    seed: for smoke runs only, never a result. A plug-in model (``py:...``) is built by its
    own factory (``lostreg.backbones.plugin_source``).
    """
    if isinstance(name, BackboneSpec) and name.plugin is not None:
        return _build_plugin(name, weights, device, pos_interp)
    if isinstance(name, BackboneSpec):
        spec = name if ttr_neurons is None else with_test_time_registers(name, ttr_neurons)
    else:
        spec = get_backbone_spec(name, ttr_neurons)
    if spec.plugin is not None:
        return _build_plugin(spec, weights, device, pos_interp)
    if pos_interp is not None:
        spec = with_pos_interp(spec, pos_interp)
    info, path = resolve_weights(spec, weights)
    torch.manual_seed(seed)
    model = build_model(spec)
    family = family_of(model, spec.name)
    state = load_checkpoint(model, path, family) if path is not None else None
    if spec.rope_periods == "bf16":
        _round_rope_periods(model, state)
    install_pos_embed(model, spec.pos_embed, spec.pos_interp)
    if spec.ttr is not None:
        install_test_time_registers(model, family, spec.ttr)
    mean, std = normalisation(spec)
    model.eval().requires_grad_(False).to(device)
    return Backbone(spec, model, mean, std, info, family.num_prefix_tokens(model),  # type: ignore[arg-type]
                    spec.test_time_registers)


def _build_plugin(spec: BackboneSpec, weights: str, device: str | torch.device,
                  pos_interp: str | None) -> Backbone:
    """A plug-in model, built by the loader its spec carries (``Plugin.build``)."""
    if pos_interp is not None:
        spec = with_pos_interp(spec, pos_interp)
    if spec.plugin is None or spec.plugin.build is None:
        raise LostregError(f"model {spec.name}: a plug-in model given as an object cannot be "
                           "rebuilt by name; pass the object again (lostreg.evaluate)")
    return spec.plugin.build(spec, weights, torch.device(device))

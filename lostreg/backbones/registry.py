"""Backbone registry: one entry maps a short name to a timm model and how to use it.

Adding a backbone is one ``register_backbone`` call. Each entry records what the benchmark
needs to be exact: the timm name with its pretrained tag, patch size, number of register
tokens, the feature LOST uses by default, and how the model's original code resamples its
position embeddings for a new image size (timm's own default differs for some families).
Normalisation (mean/std) comes from timm's pretrained config, so CLIP models get CLIP's.

A name takes modifiers after ``+``: ``dinov2_vitl14+ttr`` adds a test-time register
(:mod:`lostreg.backbones.ttr`). ``timm:<name>`` passes any timm ViT of a supported family;
``py:package.module:factory`` (or ``py:path/to/file.py:factory``) a plug-in model, the user's
own module or function (:mod:`lostreg.backbones.plugin`).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lostreg.backbones.pos_embed import POS_EMBED_MODES, effective_pos_embed_mode
from lostreg.backbones.ttr import TestTimeRegisters, load_neuron_file, shipped_neurons
from lostreg.errors import LostregError

ROPE_PERIODS = ("model", "bf16")
MODIFIERS = ("ttr",)


class PluginModel(Protocol):
    """What a spec holds of a plug-in model (``lostreg.backbones.plugin.Plugin``): what
    identifies it in the run folder, and for a ``py:`` model the loader that builds it. Named
    here as a protocol so that the registry, which the plug-in code builds on, does not import
    it back."""

    build: Callable[..., Any] | None

    def identity(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BackboneSpec:
    """What the benchmark knows about one backbone.

    ``pos_interp`` (``original`` | ``timm``) picks the position-embedding resampling,
    ``ttr`` the test-time registers, ``rope_periods="bf16"`` rounds RoPE periods to bfloat16
    as the released DINOv3 checkpoints store them. Defaults change nothing, so the run ids of
    existing backbones stay as they were (see ``identity_extras``).
    """

    name: str
    timm_name: str
    family: str
    patch_size: int
    num_registers: int
    default_feature: str = "k"
    pos_embed: str = "timm"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    pos_interp: str = "original"
    ttr: TestTimeRegisters | None = None
    rope_periods: str = "model"
    plugin: PluginModel | None = None  # a plug-in model (the user's own): what identifies it

    @property
    def arch(self) -> str:
        """timm architecture without the pretrained tag."""
        return self.timm_name.split(".")[0]

    @property
    def pos_embed_mode(self) -> str:
        """The resampling this backbone runs with (``pos_embed``, or ``timm`` under
        ``pos_interp="timm"``); ``model`` for a plug-in model, which runs as its own code does."""
        if self.plugin is not None:
            return "model"
        return effective_pos_embed_mode(self.pos_embed, self.pos_interp)

    @property
    def test_time_registers(self) -> int:
        return self.ttr.count if self.ttr is not None else 0

    def describe(self) -> dict:
        """What ``config.json`` records about the backbone's modifiers (always every key; a
        plug-in model adds ``plugin``: its source, hashes and adapter)."""
        described = {"pos_interp": self.pos_interp, "test_time_registers": self.test_time_registers,
                     "ttr_neurons": self.ttr.describe() if self.ttr is not None else None}
        if self.plugin is not None:
            described["plugin"] = self.plugin.identity()
        return described

    def identity_extras(self) -> dict:
        """Run-identity fields for non-default modifiers only, so default runs keep their ids:
        ``pos_interp`` when ``timm``; the neuron list's sha256 and write mode with ``+ttr``; a
        plug-in model's source and state hashes (``Plugin.identity``)."""
        extras: dict[str, Any] = {}
        if self.plugin is not None:
            extras["plugin"] = self.plugin.identity()
        if self.pos_interp != "original":
            extras["pos_interp"] = self.pos_interp
        if self.ttr is not None:
            extras["test_time_registers"] = self.ttr.count
            extras["ttr_neurons_sha256"] = self.ttr.sha256
            extras["ttr_write"] = self.ttr.write
        return extras


BACKBONES: dict[str, BackboneSpec] = {}
ALIASES: dict[str, str] = {}
#: Name prefixes resolved by a function rather than an entry (``timm:<name>``, and ``py:`` for
#: plug-in models, registered by ``lostreg.backbones.plugin_source``): name -> spec.
NAME_PREFIXES: dict[str, Callable[[str], BackboneSpec]] = {}


def register_name_prefix(prefix: str, resolve: Callable[[str], BackboneSpec]) -> None:
    """Resolve every model name starting with ``prefix`` with ``resolve(name)``."""
    NAME_PREFIXES[prefix] = resolve


def register_backbone(spec: BackboneSpec, *aliases: str) -> BackboneSpec:
    if spec.pos_embed not in POS_EMBED_MODES:
        raise ValueError(f"unknown pos_embed mode {spec.pos_embed!r}")
    if spec.rope_periods not in ROPE_PERIODS:
        raise ValueError(f"unknown rope_periods {spec.rope_periods!r}")
    BACKBONES[spec.name] = spec
    for alias in aliases:
        ALIASES[alias] = spec.name
    return spec


def _register_defaults() -> None:
    for size, arch in (("s", "small"), ("b", "base")):
        for patch in (16, 8):
            register_backbone(BackboneSpec(
                f"dino_vit{size}{patch}", f"vit_{arch}_patch{patch}_224.dino", "dino", patch, 0,
                pos_embed="dino", description=f"DINO ViT-{size.upper()}/{patch} (Caron et al. 2021)",
            ))
    for size, arch in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        register_backbone(BackboneSpec(
            f"dinov2_vit{size}14", f"vit_{arch}_patch14_dinov2.lvd142m", "dinov2", 14, 0,
            pos_embed="dinov2", description=f"DINOv2 ViT-{size.upper()}/14, LVD-142M",
        ), *(("dinov2",) if size == "l" else ()))
        register_backbone(BackboneSpec(
            f"dinov2_vit{size}14_reg4", f"vit_{arch}_patch14_reg4_dinov2.lvd142m", "dinov2", 14,
            4, pos_embed="dinov2_reg",
            description=f"DINOv2 ViT-{size.upper()}/14 with 4 registers, LVD-142M",
        ), *(("dinov2_reg4",) if size == "l" else ()))
    register_backbone(BackboneSpec(
        "deit3_vitb16", "deit3_base_patch16_224.fb_in22k_ft_in1k", "deit3", 16, 0,
        default_feature="v", description="DeiT-III ViT-B/16, IN-22k then IN-1k",
    ))
    register_backbone(BackboneSpec(
        "openclip_vitb16", "vit_base_patch16_clip_224.laion2b", "openclip", 16, 0,
        default_feature="v", description="OpenCLIP ViT-B/16, LAION-2B (image tower)",
    ))
    # DINOv3 (Simeoni et al. 2025): RoPE, 4 storage tokens (registers), LVD-1689M.
    for short, arch, title in (("s", "small", "S"), ("sp", "small_plus", "S+"),
                               ("b", "base", "B"), ("l", "large", "L"),
                               ("h", "huge_plus", "H+"), ("7b", "7b", "7B")):
        name = f"dinov3_vit{short}16" + ("p" if short == "h" else "")
        register_backbone(BackboneSpec(
            name, f"vit_{arch}_patch16_dinov3.lvd1689m", "dinov3", 16, 4, rope_periods="bf16",
            description=f"DINOv3 ViT-{title}/16 with 4 storage tokens, LVD-1689M",
        ))


_register_defaults()


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def split_modifiers(name: str) -> tuple[str, list[str]]:
    """``"dinov2_vitl14+ttr"`` -> ``("dinov2_vitl14", ["ttr"])``; unknown modifiers are one line."""
    base, *modifiers = name.split("+")
    for modifier in modifiers:
        if modifier not in MODIFIERS:
            raise LostregError(f"--model {name}: unknown modifier +{modifier} "
                               f"(known: {', '.join('+' + m for m in MODIFIERS)})")
    return base, modifiers


def get_backbone_spec(name: str, ttr_neurons: str | Path | None = None) -> BackboneSpec:
    """Resolve a short name, an alias, or ``timm:<timm model name>``, with modifiers
    (``+ttr``; ``ttr_neurons`` is the ``--ttr-neurons`` file)."""
    base, modifiers = split_modifiers(name)
    spec = _base_spec(base)
    if spec.plugin is not None and (modifiers or ttr_neurons is not None):
        raise LostregError(f"--model {name}: test-time registers (+ttr, --ttr-neurons) need a "
                           "named or timm: model; a plug-in model runs as its own code does")
    if "ttr" in modifiers:
        return with_test_time_registers(spec, ttr_neurons)
    if ttr_neurons is not None:
        raise LostregError(f"--ttr-neurons is given but --model {name} has no +ttr "
                           f"(write {name}+ttr)")
    return spec


def _base_spec(name: str) -> BackboneSpec:
    for prefix, resolve in NAME_PREFIXES.items():
        if name.startswith(prefix):
            return resolve(name)
    key = ALIASES.get(name, name)
    if key in BACKBONES:
        return BACKBONES[key]
    choices = list(BACKBONES) + list(ALIASES)
    close = difflib.get_close_matches(name, choices, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(choices))}"
    raise LostregError(f"unknown model {name!r}; {hint} (or timm:<timm model name>, or "
                       "py:package.module:factory for your own model)")


def with_test_time_registers(spec: BackboneSpec, ttr_neurons: str | Path | None = None
                             ) -> BackboneSpec:
    """``spec`` with a test-time register: the neurons of ``ttr_neurons``, else the list shipped
    for its timm model; one line saying how to find neurons when there is neither."""
    base = spec.name.split("+")[0]
    if ttr_neurons is not None:
        ttr = load_neuron_file(ttr_neurons)
        if ttr.found_on is not None and ttr.found_on != spec.timm_name:
            print(f"warning: {ttr.source} lists the register neurons of {ttr.found_on}, "
                  f"applied here to {spec.timm_name}", file=sys.stderr)
    else:
        ttr = shipped_neurons(spec.timm_name) if not spec.model_kwargs else None
        if ttr is None:
            raise LostregError(
                f"--model {base}+ttr: no register-neuron list is shipped for {spec.timm_name}; "
                f"find them with `python -m lostreg.analyze register-neurons --model {base} "
                "--output neurons.json` and pass --ttr-neurons neurons.json")
    return dataclasses.replace(spec, name=f"{base}+ttr", ttr=ttr)


def with_pos_interp(spec: BackboneSpec, pos_interp: str) -> BackboneSpec:
    """``spec`` resampling position embeddings as its family's original code (``original``) or
    as timm does (``timm``)."""
    effective_pos_embed_mode(spec.pos_embed, pos_interp)  # validates
    return dataclasses.replace(spec, pos_interp=pos_interp)


def _timm_passthrough_spec(name: str, timm_name: str) -> BackboneSpec:
    import timm

    from lostreg.backbones.families import family_of

    arch = timm_name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models("vit*") + timm.list_models("eva*"),
                                          n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LostregError(f"unknown timm model {timm_name!r}{hint}")
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - any failure to build is one line
        raise LostregError(f"timm model {timm_name!r} cannot be built ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(model, "blocks"):
        raise LostregError(f"timm model {timm_name!r} is not a ViT with patch tokens")
    family = family_of(model, f"timm model {timm_name!r}")
    if int(patch[0]) != int(patch[1]):
        raise LostregError(f"timm model {timm_name!r} has non-square patches {tuple(patch)}")
    return BackboneSpec(
        name, timm_name, "timm", int(patch[0]), family.num_registers(model),
        description=f"timm passthrough {timm_name}",
    )


register_name_prefix("timm:", lambda name: _timm_passthrough_spec(name, name[len("timm:"):]))

"""Backbones: the registry of named models, their weights, and how lostreg reads each family.

* :mod:`~lostreg.backbones.registry`: ``BackboneSpec``, ``register_backbone`` (adding a backbone
  is one entry), short names, aliases, ``timm:<name>`` and ``+ttr`` modifiers;
* :mod:`~lostreg.backbones.families`: one adapter per timm model family (ViT, EVA): where q/k/v,
  RoPE and MLP neurons live, read with hooks during the model's own forward;
* :mod:`~lostreg.backbones.pos_embed`: position-embedding resampling (``--pos-interp``);
* :mod:`~lostreg.backbones.ttr`: test-time registers and their neuron lists;
* :mod:`~lostreg.backbones.weights`: hub / file / random weights, hashed, and checkpoint reading;
* :mod:`~lostreg.backbones.build`: ``create_backbone`` puts them together;
* :mod:`~lostreg.backbones.plugin` and :mod:`~lostreg.backbones.plugin_source`: the user's own
  model (``py:`` names, resolved through the registry's ``register_name_prefix``).

Adding a backbone family touches this folder only: an adapter in ``families.py`` (and, for
named entries, ``register_backbone`` calls in ``registry.py``).
"""

from lostreg.backbones.build import Backbone, build_model, create_backbone
from lostreg.backbones.families import FAMILIES, Family, family_of, register_family
from lostreg.backbones.plugin_source import plugin_spec  # registers the py: model names
from lostreg.backbones.pos_embed import (
    POS_EMBED_MODES,
    POS_INTERP_CHOICES,
    install_pos_embed,
    resample_patch_pos_embed,
)
from lostreg.backbones.registry import (
    ALIASES,
    BACKBONES,
    BackboneSpec,
    get_backbone_spec,
    list_backbones,
    register_backbone,
    with_pos_interp,
    with_test_time_registers,
)
from lostreg.backbones.ttr import TestTimeRegisters, load_neuron_file, shipped_neurons
from lostreg.backbones.weights import (
    WeightsInfo,
    hub_reachable,
    load_checkpoint,
    normalisation,
    resolve_hub_file,
    resolve_weights,
    sha256_weights,
)

__all__ = [
    "ALIASES", "BACKBONES", "FAMILIES", "POS_EMBED_MODES", "POS_INTERP_CHOICES", "Backbone",
    "BackboneSpec", "Family", "TestTimeRegisters", "WeightsInfo", "build_model",
    "create_backbone", "family_of", "get_backbone_spec", "hub_reachable", "install_pos_embed",
    "list_backbones", "load_checkpoint", "load_neuron_file", "normalisation", "plugin_spec",
    "register_backbone",
    "register_family", "resample_patch_pos_embed", "resolve_hub_file", "resolve_weights",
    "sha256_weights", "shipped_neurons", "with_pos_interp", "with_test_time_registers",
]

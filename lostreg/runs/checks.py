"""A ``RunConfig`` checked against the registries, and what it resolves to.

``RunConfig`` is plain data; these are the checks that need the subsystems (the method registry,
the feature kinds, the cache dtypes, position-embedding choices), run before any work so a bad
setting is one clear line, not a failure hours later.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lostreg.backbones import POS_INTERP_CHOICES
from lostreg.datasets import DATASETS, default_data_root
from lostreg.errors import LostregError
from lostreg.features.cache import storage_dtype
from lostreg.features.extract import FEATURE_KINDS, FeatureRequest
from lostreg.methods import MethodSpec, get_method
from lostreg.runs.config import NORMALIZATIONS, PRECISIONS, REFINES, RunConfig


def with_defaults(config: RunConfig) -> RunConfig:
    """``config`` with the defaults that depend on the environment filled in (the data root:
    ``$LOSTREG_DATA`` or ``datasets/``), as ``config.json`` records them."""
    if config.data_root is None:
        return dataclasses.replace(config, data_root=default_data_root())
    return config


def method_of(config: RunConfig) -> MethodSpec:
    return get_method(config.method)


def method_params(config: RunConfig) -> dict[str, Any]:
    """The method's full, validated parameter set for ``config`` (defaults filled in)."""
    spec = method_of(config)
    values = dict(config.method_params)
    for param in spec.params:
        if param.on_config:
            values[param.name] = getattr(config, param.name)
    return spec.resolve(values)


def accepted_features(spec: MethodSpec) -> tuple[str, ...]:
    """The feature kinds a method reads: those its entry names (``feature_kinds``: DINO-seg,
    ``attn``), else every embedding kind (q, k, v and their RoPE forms) and never ``attn``,
    which is an attention weight per head, not a vector to compare patches by."""
    if spec.feature_kinds is not None:
        return tuple(spec.feature_kinds)
    return tuple(name for name, kind in FEATURE_KINDS.items() if kind.embedding)


def check_feature(spec: MethodSpec, kind: str) -> None:
    """One line when ``spec`` cannot read feature ``kind`` (LOST on ``attn`` would score
    attention weights as if they were keys: CorLoc near 0, and no word of why)."""
    accepted = accepted_features(spec)
    if kind not in accepted:
        raise LostregError(f"--method {spec.name} reads {'/'.join(accepted)}, not --features "
                           f"{kind}; drop --features (each method then reads its own default) "
                           "or pick one of those")


def feature_request(config: RunConfig, backbone_default: str) -> FeatureRequest:
    """The feature map ``config``'s method reads (its kind resolved against the backbone)."""
    spec = method_of(config)
    kind = spec.feature_for(config.features, backbone_default)
    check_feature(spec, kind)
    return FeatureRequest(kind, config.layer)


def is_mask_dataset(dataset: str) -> bool:
    """Whether ``dataset`` is scored on masks (a saliency set), by its registry entry."""
    spec = DATASETS.get(dataset)
    return spec is not None and spec.target == "mask"


def check_refine(refine: str, dataset: str) -> None:
    """``--refine`` post-processes a predicted mask: one line for a dataset scored on boxes."""
    if refine != "none" and not is_mask_dataset(dataset):
        masks = ", ".join(name for name in DATASETS if is_mask_dataset(name))
        raise LostregError(f"--refine {refine}: only for the saliency datasets ({masks}); "
                           f"{dataset} is scored on boxes (CorLoc), drop --refine for it")


def check_config(config: RunConfig) -> None:
    """One clear line for any setting that cannot run."""
    if config.precision not in PRECISIONS:
        raise LostregError(f"--precision {config.precision!r}: expected fp32, bf16 or fp16")
    if config.batch_size < 1:
        raise LostregError("--batch-size must be at least 1")
    if config.max_pixels < 1:
        raise LostregError(f"--max-pixels {config.max_pixels}: must be at least 1")
    if config.max_nonfinite < 0:
        raise LostregError(f"--max-nonfinite {config.max_nonfinite}: must be 0 or more (a "
                           "number of images)")
    if config.limit is not None and config.limit < 1:
        raise LostregError(f"--limit {config.limit}: must be at least 1 (leave it out for all images)")
    if not math.isfinite(float(config.gram_bias)):
        raise LostregError(f"--gram-bias {config.gram_bias}: must be a finite number")
    if config.features is not None and config.features not in FEATURE_KINDS:
        raise LostregError(f"--features {config.features!r}: expected one of "
                           f"{', '.join(FEATURE_KINDS)}")
    if config.pos_interp not in POS_INTERP_CHOICES:
        raise LostregError(f"--pos-interp {config.pos_interp!r}: expected one of "
                           f"{', '.join(POS_INTERP_CHOICES)}")
    if config.normalize not in NORMALIZATIONS:
        raise LostregError(f"--normalize {config.normalize!r}: expected none or l2")
    if config.refine not in REFINES:
        raise LostregError(f"--refine {config.refine!r}: expected one of {', '.join(REFINES)}")
    method_params(config)  # validates --method and its parameters
    if config.features is not None:
        check_feature(method_of(config), config.features)
    storage_dtype(config.cache_dtype, config.precision)  # validates --cache-dtype

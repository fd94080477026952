"""What one run is: ``RunConfig``, its validation, and the method parameters it resolves to.

A run is one backbone on one dataset with one method and one setting of everything that changes
a result. Settings that only change how fast it goes (device, batch size, workers, cache) are
here too, but never enter the run id (see ``lostreg.runs.folder.run_identity``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lostreg.backbones import POS_INTERP_CHOICES
from lostreg.datasets import default_data_root
from lostreg.errors import LostregError
from lostreg.features.cache import storage_dtype
from lostreg.features.extract import FEATURE_KINDS, FeatureRequest
from lostreg.features.pipeline import DEFAULT_MAX_PIXELS
from lostreg.methods import DEFAULT_METHOD, MethodSpec, get_method

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMALIZATIONS = ("none", "l2")
SMOKE_NOTE = "SMOKE RUN (weights: random): not a result, never enters the leaderboard"


@dataclass
class RunConfig:
    """Every setting of one run; the ones that change results define its run id.

    ``method`` names a ``lostreg.methods`` entry; its parameters are ``method_params`` (names as
    in the method's ``params``), except LOST's ``k_patches`` and ``gram_bias``, which are fields
    here because they predate the registry. ``layer`` picks the block whose attention gives the
    features (-1: the last), ``normalize`` L2-normalises them before the method.
    ``cache_features`` (a folder) turns the feature cache on; ``cache_dtype`` is how features
    are stored there (``auto``: exactly as the backbone produced them, see ``lostreg.features.cache``).
    """

    model: str = "dinov2_reg4"
    dataset: str = "voc07"
    data_root: Path = field(default_factory=default_data_root)
    weights: str = "hub"
    features: str | None = None
    k_patches: int = 100
    gram_bias: float = 0.0
    no_hard: bool = False
    device: str = "auto"
    batch_size: int = 16
    limit: int | None = None
    output: Path = Path("results/runs")
    precision: str = "fp32"
    download: bool = True
    num_workers: int | None = None  # None: decode_workers(device)
    progress: bool = True
    cache_features: Path | None = None
    cache_dtype: str = "auto"
    allow_partial_dataset: bool = False
    method: str = DEFAULT_METHOD
    method_params: dict[str, Any] = field(default_factory=dict)
    layer: int = -1
    normalize: str = "none"
    wait: bool = False  # wait for another process holding a run folder instead of exiting
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (none is resized)
    pos_interp: str = "original"  # position-embedding resampling: the family's own, or timm's
    ttr_neurons: Path | None = None  # register-neuron list of a +ttr model (None: shipped)


# settings that may differ between the runs of one pass (everything else is shared): one
# forward serves every feature kind and layer, and the methods run on its output
SWEPT = ("features", "k_patches", "gram_bias", "method", "method_params", "layer", "normalize")


def pass_key(config: RunConfig) -> dict:
    """The settings every run of one pass shares."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in SWEPT}


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


def feature_request(config: RunConfig, backbone_default: str) -> FeatureRequest:
    """The feature map ``config``'s method reads (its kind resolved against the backbone)."""
    return FeatureRequest(method_of(config).feature_for(config.features, backbone_default),
                          config.layer)


def check_config(config: RunConfig) -> None:
    """One clear line for any setting that cannot run."""
    if config.precision not in PRECISIONS:
        raise LostregError(f"--precision {config.precision!r}: expected fp32, bf16 or fp16")
    if config.batch_size < 1:
        raise LostregError("--batch-size must be at least 1")
    if config.max_pixels < 1:
        raise LostregError(f"--max-pixels {config.max_pixels}: must be at least 1")
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
    method_params(config)  # validates --method and its parameters
    if config.features is not None:
        method_of(config).feature_for(config.features, "k")
    storage_dtype(config.cache_dtype, config.precision)  # validates --cache-dtype

"""What one run is: ``RunConfig``, plain data.

A run is one backbone on one dataset with one method and one setting of everything that changes
a result. Settings that only change how fast it goes (device, batch size, workers, cache) are
here too, but never enter the run id (see ``lostreg.runs.folder.run_identity``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Plain data: this module imports no subsystem. Its defaults equal the subsystems' own (the
# method registry's DEFAULT_METHOD, the pipeline's DEFAULT_MAX_PIXELS, the autocast dtypes of
# PRECISIONS), which tests/test_config.py holds together; the checks that need the registries
# live with the runner (``lostreg.runs.checks``).

PRECISIONS = ("fp32", "bf16", "fp16")
NORMALIZATIONS = ("none", "l2")
# a saliency run's post-processing: none, TokenCut's bilateral solver scored as its figures
# were (the soft output), or the corrected variant (the solver's binary mask)
REFINES = ("none", "bilateral", "bilateral-binary")
DEFAULT_MAX_PIXELS = 4_000_000
SMOKE_NOTE = "SMOKE RUN (weights: random): not a result, never enters the leaderboard"
SCRATCH_NOTE = "SCRATCH RUN (a look during training): never enters the leaderboard"


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
    data_root: Path | None = None  # None: $LOSTREG_DATA or datasets/, resolved when it runs
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
    method: str = "lost"
    method_params: dict[str, Any] = field(default_factory=dict)
    layer: int = -1
    normalize: str = "none"
    wait: bool = False  # wait for another process holding a run folder instead of exiting
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (none is resized)
    pos_interp: str = "original"  # position-embedding resampling: the family's own, or timm's
    ttr_neurons: Path | None = None  # register-neuron list of a +ttr model (None: shipped)
    scratch: bool = False  # a training-loop look (lostreg.evaluate): never on the leaderboard
    refine: str = "none"  # saliency datasets only: one of REFINES
    max_nonfinite: int = 0  # images with non-finite features a run may score as failures
    allow_version_mix: bool = False  # resume lines of another RESULT_VERSION (recorded)


# settings that may differ between the runs of one pass (everything else is shared): one
# forward serves every feature kind and layer, and the methods run on its output
SWEPT = ("features", "k_patches", "gram_bias", "method", "method_params", "layer", "normalize",
         "refine")


def pass_key(config: RunConfig) -> dict:
    """The settings every run of one pass shares."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in SWEPT}

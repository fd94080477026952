"""The protocol grid: which LOST settings a protocol study runs, and running them in one pass.

A grid point is one LOST setting: the feature kind (q, k, v), the block it comes from
(``layer``), the normalisation, the Gram bias and the position-embedding interpolation. All
points that share a model run in **one pass** over the images (``lostreg.runs.grid.run_grid`` with an
explicit sweep): each batch goes through the backbone once, and every point's LOST runs on that
batch's features. The features are not kept in a feature cache (4 layers x 3 kinds of ViT-L/14
maps of VOC07 would be about 120 GB). Each point is an ordinary run folder, so the leaderboard
sees it and a rerun resumes it.

The position-embedding interpolation (``RunConfig.pos_interp``: each family's ``original``
resampling, or ``timm``'s) changes the model itself, so each of its values is a pass of its own
(``ProtocolGrid.pos_interps``, run by ``lostreg.runs.grid.run_grid``'s ``pos_interps``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from lostreg.backbones import Backbone
from lostreg.backbones.pos_embed import POS_INTERP_CHOICES
from lostreg.datasets.base import DatasetIndex
from lostreg.errors import LostregError
from lostreg.runs.config import NORMALIZATIONS, RunConfig
from lostreg.runs.folder import RunResult

POS_INTERPS = POS_INTERP_CHOICES  # ("original", "timm")
DEFAULT_POS_INTERP = "original"
# the grid of the test-time-registers protocol: 0, -0.1, ..., -1.0 in cosine units
L2_BIASES = tuple(0.0 - i / 10 for i in range(11))
DEFAULT_FEATURES = ("q", "k", "v")
DEFAULT_LAYERS = (-1, -2, -3, -4)
FEATURE_ORDER = {"q": 0, "k": 1, "v": 2}


def clean_bias(value: float) -> float:
    """A bias as stored in a run id: ``-0.0`` becomes ``0.0`` (they would hash apart)."""
    return float(value) + 0.0


@dataclass(frozen=True, order=True)
class GridPoint:
    """One LOST setting of the grid (``k_patches`` is the grid's, the same for all points)."""

    pos_interp: str
    normalize: str
    feature: str
    layer: int
    gram_bias: float

    def label(self) -> str:
        """``k L-2 l2 b-0.3`` (with ``pos timm`` when not the default interpolation)."""
        text = f"{self.feature} L{self.layer} {self.normalize} b{self.gram_bias:g}"
        return text if self.pos_interp == DEFAULT_POS_INTERP else f"{text} pos {self.pos_interp}"


@dataclass(frozen=True)
class ProtocolGrid:
    """Features x layers x (normalisation, its biases) x interpolations, LOST with ``k_patches``.

    The default is the issue's grid: q/k/v x the last four blocks x (none: bias 0; l2: bias
    0, -0.1, ..., -1.0) = 3 x 4 x 12 = 144 settings. ``biases`` pairs each normalisation with
    its own bias list: without normalisation the Gram's scale is the features' (a fixed
    cosine-unit sweep means nothing there), with ``l2`` the bias is in cosine units.
    """

    features: tuple[str, ...] = DEFAULT_FEATURES
    layers: tuple[int, ...] = DEFAULT_LAYERS
    biases: tuple[tuple[str, tuple[float, ...]], ...] = (("none", (0.0,)), ("l2", L2_BIASES))
    k_patches: int = 100
    pos_interps: tuple[str, ...] = (DEFAULT_POS_INTERP,)

    def __post_init__(self) -> None:
        for name, values in (("--features", self.features), ("--layers", self.layers),
                             ("--normalize", [n for n, _ in self.biases]),
                             ("--pos-interp", self.pos_interps)):
            if not values:
                raise LostregError(f"{name}: the grid needs at least one value")
            if len(set(values)) != len(values):
                raise LostregError(f"{name}: a value is listed twice")
        for normalize, biases in self.biases:
            if normalize not in NORMALIZATIONS:
                raise LostregError(f"--normalize {normalize!r}: expected none or l2")
            if not biases or len({clean_bias(b) for b in biases}) != len(biases):
                raise LostregError(f"Gram biases of {normalize}: need distinct values, "
                                   f"got {list(biases)}")
        for value in self.pos_interps:
            if value not in POS_INTERPS:
                raise LostregError(f"--pos-interp {value!r}: expected one of "
                                   f"{', '.join(POS_INTERPS)}")
        if self.k_patches < 1:
            raise LostregError(f"--k-patches {self.k_patches}: must be at least 1")

    def points(self) -> list[GridPoint]:
        """Every point in grid order: interpolation, normalisation (as listed), feature,
        layer, bias. Selection ties go to the first point in this order."""
        return [GridPoint(pos, normalize, feature, layer, clean_bias(bias))
                for pos in self.pos_interps for normalize, biases in self.biases
                for feature in self.features for layer in self.layers for bias in biases]

    def size(self) -> int:
        return len(self.points())

    def tag(self) -> str:
        """``""`` for the default grid, else ``grid<hash>`` of its points and k: a study of
        another grid gets a folder of its own instead of replacing the default study."""
        if self == ProtocolGrid():
            return ""
        text = repr((self.k_patches, [point.label() for point in self.points()]))
        return "grid" + hashlib.sha256(text.encode()).hexdigest()[:8]


def pass_configs(base: RunConfig, grid: ProtocolGrid) -> list[RunConfig]:
    """The run configs of the grid for one interpolation (``base.pos_interp``): every
    feature, layer, normalisation and bias, built exactly as ``lostreg.run`` builds a sweep."""
    from lostreg.runs.grid import expand_sweep

    lost = dataclasses.replace(base, method="lost", method_params={}, k_patches=grid.k_patches)
    configs: list[RunConfig] = []
    for normalize, biases in grid.biases:
        configs += expand_sweep(lost, methods=["lost"], features=list(grid.features),
                                layers=list(grid.layers), normalizations=[normalize],
                                values={"gram_bias": [clean_bias(b) for b in biases],
                                        "k_patches": [grid.k_patches]})
    return configs


def run_passes(base: RunConfig, grid: ProtocolGrid,
               on_result: Callable[[RunResult], None] | None = None, *,
               backbone: Backbone | None = None, index: DatasetIndex | None = None
               ) -> list[RunResult]:
    """Run (or resume) every point of ``grid`` for ``base.model`` on ``base.dataset``: one pass
    per interpolation (``lostreg.runs.grid.run_grid``'s ``pos_interps``: it changes the model), each
    one forward per batch for all the pass's points. ``backbone`` and ``index`` (a built
    model, an indexed dataset: benchmarks pass them) serve one interpolation only."""
    from lostreg.runs.grid import run_grid

    if backbone is not None and len(grid.pos_interps) > 1:
        raise ValueError("a built backbone has one position-embedding interpolation")
    first = dataclasses.replace(base, pos_interp=grid.pos_interps[0])
    configs = pass_configs(first, grid)
    return run_grid(configs[0], pairs=[(base.model, base.dataset)], sweep=configs,
                    pos_interps=list(grid.pos_interps), on_result=on_result,
                    backbone=backbone, index=index)


def parse_biases(text: str, flag: str) -> tuple[float, ...]:
    """A comma list of finite Gram biases (``-0.0`` read as ``0.0``)."""
    values = []
    for part in text.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise LostregError(f"{flag} {text!r}: {part.strip()!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise LostregError(f"{flag} {text!r}: {part.strip()!r} is not a finite number")
        values.append(clean_bias(value))
    return tuple(values)

"""Named grids (``--suite NAME``): which backbones, datasets and methods a study runs.

A suite is data: ``(model, dataset)`` pairs, optionally the methods and method values it sets.
Adding one is one ``register_suite`` entry here; ``lostreg.run --suite NAME`` runs it and then
rebuilds the leaderboard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lostreg.errors import LostregError

PAPER_DATASETS = ("voc07", "voc12", "coco20k")
# the registers paper's Table 3 backbones (DINO ViT-S/16 as the LOST anchor)
PAPER_MODELS = ("dino_vits16", "dinov2_vitl14", "dinov2_vitl14_reg4", "deit3_vitb16",
                "openclip_vitb16")
PAPER_SUITE: list[tuple[str, str]] = [(m, d) for m in PAPER_MODELS for d in PAPER_DATASETS]

METHODS_SUITE_MODELS = ("dino_vits16", "dinov2_vitl14", "dinov2_vitl14_reg4")
METHODS_SUITE_DATASETS = PAPER_DATASETS

SALIENCY_DATASETS = ("ecssd", "duts_te", "dut_omron")
# DINO ViT-S/16 is the anchor (every published saliency figure is on it); DINOv2 ViT-L/14
# without registers, with trained registers and with a test-time register; DINOv3 ViT-S/16
SALIENCY_MODELS = ("dino_vits16", "dinov2_vitl14", "dinov2_vitl14_reg4", "dinov2_vitl14+ttr",
                   "dinov3_vits16")


@dataclass(frozen=True)
class Suite:
    """A named grid. ``methods`` None: the command's ``--method`` (default LOST) applies;
    otherwise the suite chooses them and ``--method`` is refused. ``method_values``: parameter
    values the suite sweeps (a flag given on the command line wins); ``refine``: the
    saliency post-processings per method."""

    name: str
    description: str
    pairs: tuple[tuple[str, str], ...]
    methods: tuple[str, ...] | None = None
    method_values: dict[str, list[Any]] = field(default_factory=dict)
    # the saliency post-processings a method runs with (``--refine``); methods not named run
    # with the command's (``none`` by default); a ``--refine`` flag wins
    refine: dict[str, tuple[str, ...]] = field(default_factory=dict)


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise LostregError(f"--suite {name!r}: unknown suite; known: {', '.join(SUITES)}")
    return SUITES[name]


register_suite(Suite(
    "paper", "the runs of the comparison table (the registers paper's backbones x VOC07, VOC12, "
    "COCO 20k)", tuple(PAPER_SUITE)))
register_suite(Suite(
    # DINO-seg runs both variants (the reference's quirks and the corrected one): what the
    # quirks cost is a finding of its own
    "methods", "DINO ViT-S/16 and DINOv2 ViT-L/14 with and without registers x every method, "
    "DINO-seg in both variants, x VOC07/VOC12/COCO20k",
    tuple((m, d) for m in METHODS_SUITE_MODELS for d in METHODS_SUITE_DATASETS),
    methods=("lost", "tokencut", "dinoseg"),
    method_values={"dinoseg_variant": ["reference", "corrected"]}))
register_suite(Suite(
    # one pass per backbone and dataset serves every method and refinement (LOST and TokenCut
    # read the keys, DINO-seg the attention: both from one forward); with --cache-features
    # each backbone and dataset gets its one cache
    "saliency", "unsupervised saliency (masks): DINO ViT-S/16, DINOv2 ViT-L/14 without and "
    "with registers and with a test-time register, DINOv3 ViT-S/16 x LOST, TokenCut (without "
    "and with the bilateral solver) and DINO-seg x ECSSD/DUTS-TE/DUT-OMRON",
    tuple((m, d) for m in SALIENCY_MODELS for d in SALIENCY_DATASETS),
    methods=("lost", "tokencut", "dinoseg"),
    refine={"tokencut": ("none", "bilateral")}))

"""The dataset registry: one name -> how to find, fetch and index it, and what it annotates.

A ``DatasetSpec`` says where a dataset's files are expected, how to index them into records,
how to fetch them, and the ground-truth ``target`` kind its records carry with the ``metrics``
that score it (``lostreg.evaluation``): the run writes that target and those scores in every
predictions line. Adding a dataset is its adapter module with one ``register_dataset`` call,
imported in ``lostreg/datasets/__init__.py``.

``load_dataset(name, data_root)`` is the entry point: it downloads (or, for ``demo``,
generates) missing data when allowed, and otherwise fails with a message saying how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lostreg.datasets.base import DatasetIndex
from lostreg.errors import LostregError, did_you_mean


@dataclass(frozen=True)
class DatasetSpec:
    """How to index, detect and fetch one benchmark dataset (``layout`` is for messages), and
    what its records annotate (``target``) and which metrics score it."""

    name: str
    title: str
    split: str
    expected_images: int | None
    load: Callable[[Path, bool], DatasetIndex]
    is_present: Callable[[Path], bool]
    download: Callable[[Path], None] | None
    layout: str = ""
    target: str = "boxes"  # a ``lostreg.evaluation.targets`` kind
    metrics: tuple[str, ...] = ("corloc",)  # ``lostreg.evaluation`` metrics that score it
    # how images become model inputs: ``pad`` (LOST's: never resized, zero-padded to a patch
    # multiple) or ``resize`` (TokenCut's saliency protocol: LANCZOS to the nearest multiple)
    image_protocol: str = "pad"


DATASETS: dict[str, DatasetSpec] = {}
IMAGE_PROTOCOLS = ("pad", "resize")


def image_protocol(name: str) -> str:
    """The image protocol of dataset ``name`` (``pad`` for a name the registry lacks)."""
    spec = DATASETS.get(name)
    return spec.image_protocol if spec is not None else "pad"


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    from lostreg.evaluation import get_metric
    from lostreg.evaluation.targets import TARGET_KINDS

    if spec.image_protocol not in IMAGE_PROTOCOLS:
        raise ValueError(f"dataset {spec.name}: image_protocol must be one of {IMAGE_PROTOCOLS}")
    if spec.target not in TARGET_KINDS:
        raise ValueError(f"dataset {spec.name}: unknown target kind {spec.target!r}")
    for name in spec.metrics:
        if get_metric(name).target != spec.target:
            raise ValueError(f"dataset {spec.name}: metric {name} scores "
                             f"{get_metric(name).target}, not {spec.target}")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up by name; an unknown name lists the close matches or all names."""
    spec = DATASETS.get(name)
    if spec is not None:
        return spec
    raise LostregError(f"unknown dataset {name!r}; {did_you_mean(name, DATASETS)}")


def default_data_root() -> Path:
    """``$LOSTREG_DATA`` if set, else ``datasets`` (relative to the working directory)."""
    env = os.environ.get("LOSTREG_DATA", "").strip()
    return Path(env).expanduser() if env else Path("datasets")


def load_dataset(
    name: str, data_root: Path | str, no_hard: bool = False, download: bool = True,
    download_hint: str = "or drop --no-download",
) -> DatasetIndex:
    """Index dataset ``name`` under ``data_root``, fetching it first if allowed and missing;
    ``download_hint`` ends the message for missing data (how this command would download)."""
    spec = get_dataset(name)
    root = Path(data_root).expanduser()
    if root.exists() and not root.is_dir():  # no download can fix that: no "offline?" hint
        raise LostregError(f"{root}: is a file, not a folder; --data-root (or LOSTREG_DATA) "
                           "names the folder that holds the datasets")
    if not spec.is_present(root):
        if not download or spec.download is None:
            if not root.exists():
                raise LostregError(
                    f"{root}: data root does not exist (set --data-root or LOSTREG_DATA, or "
                    f"run `python -m lostreg.datasets download {name} --data-root {root}`)"
                )
            raise LostregError(
                f"{root}: {spec.title} ({name}) not found, expected {spec.layout}; run "
                f"`python -m lostreg.datasets download {name} --data-root {root}` "
                f"{download_hint}"
            )
        try:
            spec.download(root)
        except LostregError as exc:
            raise LostregError(
                f"{spec.title} ({name}) is not under {root} (expected {spec.layout}) and "
                f"downloading it failed: {exc}; offline? put the data there, or pass "
                "--data-root to where it is"
            ) from None
        if not spec.is_present(root):
            raise LostregError(
                f"{root}: {spec.title} ({name}) still incomplete after download, "
                f"expected {spec.layout}"
            )
    return spec.load(root, no_hard)

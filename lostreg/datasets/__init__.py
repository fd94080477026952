"""Dataset registry: one name (``voc07``, ``voc12``, ``coco20k``, ``demo``) -> how to find,
fetch and index it, so the runner never needs to know a dataset's layout.

``load_dataset(name, data_root)`` is the entry point: it downloads (or, for ``demo``,
generates) missing data when allowed, and otherwise fails with a message saying how to get it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lostreg.datasets.base import CHECK_NAMES, DataChecks, DatasetIndex, ImageRecord, load_rgb
from lostreg.datasets.coco import COCO20K_LIST_SHA256, coco20k_is_present, load_coco20k
from lostreg.datasets.demo import demo_is_present, generate_demo, load_demo
from lostreg.datasets.voc import load_voc, voc_is_present
from lostreg.errors import LostregError


@dataclass(frozen=True)
class DatasetSpec:
    """How to index, detect and fetch one benchmark dataset (``layout`` is for messages)."""

    name: str
    title: str
    split: str
    expected_images: int | None
    load: Callable[[Path, bool], DatasetIndex]
    is_present: Callable[[Path], bool]
    download: Callable[[Path], None] | None
    layout: str = ""


def _load_voc07(root: Path, no_hard: bool) -> DatasetIndex:
    return load_voc(root, 2007, no_hard=no_hard, name="voc07")


def _load_voc12(root: Path, no_hard: bool) -> DatasetIndex:
    return load_voc(root, 2012, no_hard=no_hard, name="voc12")


def _load_coco20k(root: Path, no_hard: bool) -> DatasetIndex:
    # Pin the published list: a different list would silently be a different benchmark.
    return load_coco20k(root, no_hard=no_hard, list_sha256=COCO20K_LIST_SHA256)


def _download_voc07(root: Path) -> None:
    from lostreg.datasets.download import prepare_voc

    prepare_voc(root, 2007)


def _download_voc12(root: Path) -> None:
    from lostreg.datasets.download import prepare_voc

    prepare_voc(root, 2012)


def _download_coco20k(root: Path) -> None:
    from lostreg.datasets.download import prepare_coco20k

    prepare_coco20k(root)


def _generate_demo(root: Path) -> None:
    generate_demo(root)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="voc07",
            title="PASCAL VOC 2007",
            split="trainval",
            expected_images=5011,
            load=_load_voc07,
            is_present=lambda root: voc_is_present(root, 2007),
            download=_download_voc07,
            layout="VOC2007/{JPEGImages,Annotations,ImageSets/Main/trainval.txt} "
            "(or VOCdevkit/VOC2007/...)",
        ),
        DatasetSpec(
            name="voc12",
            title="PASCAL VOC 2012",
            split="trainval",
            expected_images=11540,
            load=_load_voc12,
            is_present=lambda root: voc_is_present(root, 2012),
            download=_download_voc12,
            layout="VOC2012/{JPEGImages,Annotations,ImageSets/Main/trainval.txt} "
            "(or VOCdevkit/VOC2012/...)",
        ),
        DatasetSpec(
            name="coco20k",
            title="COCO 20k",
            split="train2014-20k",
            expected_images=19817,
            load=_load_coco20k,
            is_present=coco20k_is_present,
            download=_download_coco20k,
            layout="COCO/{images/train2014/,annotations/instances_train2014.json,"
            "coco_20k_filenames.txt}",
        ),
        DatasetSpec(
            name="demo",
            title="Generated demo scenes",
            split="trainval",
            expected_images=None,
            load=load_demo,
            is_present=demo_is_present,
            download=_generate_demo,
            layout="demo/{JPEGImages,Annotations,ImageSets/Main/trainval.txt} (generated)",
        ),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up by name; an unknown name lists the close matches or all names."""
    spec = DATASETS.get(name)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(str(name), list(DATASETS), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(DATASETS)}"
    raise LostregError(f"unknown dataset {name!r}; {hint}")


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


__all__ = [
    "CHECK_NAMES",
    "DATASETS",
    "DataChecks",
    "DatasetIndex",
    "DatasetSpec",
    "ImageRecord",
    "default_data_root",
    "get_dataset",
    "load_dataset",
    "load_rgb",
]

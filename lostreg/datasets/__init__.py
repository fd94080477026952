"""Datasets: ``voc07``, ``voc12``, ``coco20k`` and ``demo`` (boxes), ``ecssd``, ``duts_te`` and
``dut_omron`` (saliency masks, ``saliency_sets``), registered in ``lostreg.datasets.registry``
so the runner never needs to know a dataset's layout.

``load_dataset(name, data_root)`` is the entry point: it downloads (or, for ``demo``,
generates) missing data when allowed, and otherwise fails with a message saying how to get it.
Records (``lostreg.datasets.base.ImageRecord``) carry each image's path, size and ground truth.
"""

from __future__ import annotations

from pathlib import Path

from lostreg.datasets.base import CHECK_NAMES, DataChecks, DatasetIndex, ImageRecord, load_rgb
from lostreg.datasets.coco import COCO20K_LIST_SHA256, coco20k_is_present, load_coco20k
from lostreg.datasets.demo import demo_is_present, generate_demo, load_demo
from lostreg.datasets.registry import (
    DATASETS,
    DatasetSpec,
    default_data_root,
    get_dataset,
    load_dataset,
    register_dataset,
)
from lostreg.datasets.voc import load_voc, voc_is_present


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


# the benchmark's datasets: every one annotates boxes, scored by CorLoc (the registry's default)
for _spec in (
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
    ):
    register_dataset(_spec)

# the saliency sets (masks, scored by the saliency metric) register themselves
from lostreg.datasets import saliency_sets  # noqa: E402, F401, I001


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
    "register_dataset",
]

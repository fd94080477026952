"""Unsupervised saliency detection sets: ECSSD, DUTS-TE and DUT-OMRON, scored on masks.

Each is a folder of ``.jpg`` images and a folder of ``.png`` ground-truth masks with the same
stems, laid out as the official archives unpack (what TokenCut's ``datasets/*/download_data.sh``
fetch, before its script renames the folders):

* ``ECSSD/images/*.jpg`` with ``ECSSD/ground_truth_mask/*.png`` (1000 images);
* ``DUTS-TE/DUTS-TE-Image/*.jpg`` with ``DUTS-TE/DUTS-TE-Mask/*.png`` (5019);
* ``DUT-OMRON/DUT-OMRON-image/*.jpg`` with ``DUT-OMRON/pixelwiseGT-new-PNG/*.png`` (5168).

TokenCut's renamed folders (``ECSSD/{img,gt}``, ``DUTS_Test/{img,gt}``, ``DUT_OMRON/{img,gt}``)
are read too. Images are taken in sorted file-name order, as TokenCut's ``get_saliency.py``
(``sorted(os.listdir(img_dir))``), each with its GT ``name.replace('.jpg', '.png')``; the GT
is read as it reads it, ``Image.open(gt).convert('L')`` (``lostreg.evaluation.mask_gt``).

Bad input is one line naming the file: a GT that is missing, or whose size is not its
image's (both found when indexing, from the file headers); a tree with another number of
images than the benchmark's runs only with ``--allow-partial-dataset``. GT pixels that are
neither 0 nor 255 are legal (anti-aliased borders) but the published definitions disagree on
them: they are counted per image (``gt_grey_pixels``) and in ``metrics.json``'s data checks.

Records carry no boxes and a ``MaskTarget``; every run on these sets uses TokenCut's saliency
image protocol (``image_protocol="resize"``, see ``lostreg.evaluation.saliency_protocol``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.datasets.registry import DatasetSpec, register_dataset
from lostreg.errors import LostregError

IMAGE_SUFFIX, MASK_SUFFIX = ".jpg", ".png"


@dataclass(frozen=True)
class SaliencySet:
    """One saliency set: its layouts (``(images, masks)`` folders under the data root, the
    official one first) and the archives that install the official one (manifest role ->
    the folder inside the archive -> where it goes under the data root)."""

    name: str
    title: str
    expected_images: int
    layouts: tuple[tuple[str, str], ...]
    installs: tuple[tuple[str, str, str], ...]

    @property
    def layout(self) -> str:
        images, masks = self.layouts[0]
        return f"{images}/*{IMAGE_SUFFIX} with {masks}/*{MASK_SUFFIX}"


SETS = (
    SaliencySet("ecssd", "ECSSD", 1000,
                (("ECSSD/images", "ECSSD/ground_truth_mask"), ("ECSSD/img", "ECSSD/gt")),
                (("images", "images", "ECSSD/images"),
                 ("masks", "ground_truth_mask", "ECSSD/ground_truth_mask"))),
    SaliencySet("duts_te", "DUTS-TE", 5019,
                (("DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask"),
                 ("DUTS_Test/img", "DUTS_Test/gt")),
                (("archive", "DUTS-TE", "DUTS-TE"),)),
    SaliencySet("dut_omron", "DUT-OMRON", 5168,
                (("DUT-OMRON/DUT-OMRON-image", "DUT-OMRON/pixelwiseGT-new-PNG"),
                 ("DUT_OMRON/img", "DUT_OMRON/gt")),
                (("images", "DUT-OMRON-image", "DUT-OMRON/DUT-OMRON-image"),
                 ("masks", "pixelwiseGT-new-PNG", "DUT-OMRON/pixelwiseGT-new-PNG"))),
)


def present_layout(saliency_set: SaliencySet, root: Path) -> tuple[Path, Path] | None:
    """The first layout whose image and mask folders both exist under ``root``."""
    for images, masks in saliency_set.layouts:
        if (root / images).is_dir() and (root / masks).is_dir():
            return root / images, root / masks
    return None


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file's header (no decode); one line when unreadable, or
    when the header declares a decompression bomb (PIL refuses to open it: not an OSError)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise LostregError(f"{path}: cannot read the image header ({exc})") from None


def mask_record(image: Path, masks: Path, root: Path) -> ImageRecord:
    """One image with its GT mask, both sizes read from the headers and compared."""
    gt = masks / (image.stem + MASK_SUFFIX)
    if not gt.is_file():
        raise LostregError(f"{gt}: ground-truth mask of {image} is missing")
    width, height = image_size(image)
    gt_width, gt_height = image_size(gt)
    if (gt_width, gt_height) != (width, height):
        raise LostregError(f"{gt}: ground-truth mask is {gt_width}x{gt_height}, its image "
                           f"{image} is {width}x{height}")
    return ImageRecord(image.stem, image, width, height, (),
                       {"file": str(image.relative_to(root)), "annotation": str(gt)}, gt_mask=gt)


def load_saliency_set(saliency_set: SaliencySet, root: Path) -> DatasetIndex:
    """Index a saliency set under ``root`` (see the module docstring)."""
    found = present_layout(saliency_set, root)
    if found is None:
        raise LostregError(f"{root}: {saliency_set.title} not found, expected "
                           f"{saliency_set.layout}")
    images, masks = found
    files = sorted(p for p in images.iterdir() if p.name.endswith(IMAGE_SUFFIX) and p.is_file())
    if not files:
        raise LostregError(f"{images}: no {IMAGE_SUFFIX} images")
    records = tuple(mask_record(path, masks, root) for path in files)
    return DatasetIndex(saliency_set.name, "test", records, images.parent)


def prepare_saliency_set(saliency_set: SaliencySet, root: Path, progress: bool = True,
                         keep_archive: bool = False) -> None:
    """Download the set's official archives (TokenCut's sources) and install them in the
    official layout under ``root``; checksums pinned on first use (``fetch_pinned``)."""
    from lostreg.datasets.download import (
        DOWNLOADS_FOLDER,
        _a_folder,
        _install,
        _item,
        fetch_pinned,
        manifest_files,
        note_created_root,
        removed_if_failed,
    )

    root = Path(root).expanduser()
    files = manifest_files(saliency_set.name)
    downloads = root / DOWNLOADS_FOLDER
    targets = [root / target for _, _, target in saliency_set.installs]
    with removed_if_failed(downloads, *(t.parent for t in targets)) as created:
        for (role, inner, _), target in zip(saliency_set.installs, targets, strict=True):
            if target.exists():
                continue
            archive = fetch_pinned(_item(files, role), downloads, progress)
            _install(archive, inner, target, _a_folder)
            if not keep_archive:
                archive.unlink(missing_ok=True)
    note_created_root(root, created, saliency_set.title)


def _loader(saliency_set: SaliencySet) -> Callable[[Path, bool], DatasetIndex]:
    def load(root: Path, no_hard: bool) -> DatasetIndex:  # no hard objects in masks
        return load_saliency_set(saliency_set, Path(root))
    return load


for _set in SETS:
    register_dataset(DatasetSpec(
        name=_set.name, title=_set.title, split="test", expected_images=_set.expected_images,
        load=_loader(_set),
        is_present=lambda root, s=_set: present_layout(s, Path(root)) is not None,
        download=lambda root, s=_set: prepare_saliency_set(s, Path(root)),
        layout=_set.layout, target="mask", metrics=("saliency",), image_protocol="resize"))

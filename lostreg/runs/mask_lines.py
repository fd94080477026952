"""What a saliency run writes for one image: from the method's patch mask to the line's
``pred_mask_rle`` and ``sal_counts``, by the published protocol.

The pass (``lostreg.runs.sweep``) runs the method batched on the device, on images resized as
TokenCut's saliency code resizes them (``image_protocol="resize"``); the method gives a patch
mask per image (``MethodSpec.mask_for_saliency``: TokenCut's and LOST's seed component,
DINO-seg's thresholded attention). Per image, on the line writer's thread:

1. the patch mask is upsampled to the image's **original** size with torch's ``'nearest'``
   rule (``saliency_protocol.upsample_patch_mask``: float64 0/1, as TokenCut's
   ``F.interpolate`` gives it);
2. ``--refine bilateral`` runs TokenCut's bilateral solver on it (``methods.bilateral``) with
   the original RGB image as reference and scores the solver's **soft** output, as TokenCut's
   "+ bilateral solver" figures did; ``bilateral-binary`` (the corrected variant) scores the
   solver's binary mask (holes filled, then the largest component by the corrected rule: the
   reference's ``argsort(sizes)[-2]`` picks the background whenever the object is larger than
   it);
3. the GT is read as TokenCut reads it (``mask_gt.read_gt``) and the prediction reduced to the
   per-image counts every definition needs (``saliency.image_counts``);
4. the binary prediction (the soft output's ``> 0.5``) is stored as compressed RLE, and the
   line's ``box`` is the box around it (``[0, 0, 0, 0]`` when empty).

This per-image work runs on the CPU. With the model on a GPU the cores are otherwise idle, so
a batch's images are spread over ``mask_threads`` threads (the solver's sparse products,
decoding and most array operations release the GIL); with the model on the CPU one thread
does it, since the forward already keeps every core busy.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lostreg.datasets.base import ImageRecord, load_rgb
from lostreg.errors import LostregError
from lostreg.evaluation.mask_gt import read_gt
from lostreg.evaluation.rle import encode, mask_box
from lostreg.evaluation.saliency import image_counts
from lostreg.evaluation.saliency_protocol import upsample_patch_mask


def mask_threads(device_type: str) -> int:
    """Threads for the per-image mask work: 1 when the model runs on the CPU, else up to 8."""
    return 1 if device_type == "cpu" else min(8, os.cpu_count() or 1)


def refined(record: ImageRecord, upsampled: np.ndarray, refine: str,
            max_pixels: int) -> np.ndarray:
    """The map a saliency metric scores: the upsampled mask, or its bilateral refinement."""
    if refine == "none":
        return upsampled
    if refine not in ("bilateral", "bilateral-binary"):
        raise LostregError(f"--refine {refine!r}: expected none, bilateral or bilateral-binary")
    image = np.asarray(load_rgb(record.path, max_pixels))
    if image.shape[:2] != upsampled.shape:
        raise LostregError(f"{record.path}: decodes to {image.shape[1]}x{image.shape[0]}, its "
                           f"mask was upsampled to {upsampled.shape[1]}x{upsampled.shape[0]}")
    # imported on first use: the solver needs SciPy, which ``import lostreg.run`` must not wait for
    from lostreg.methods.bilateral import bilateral_refine, refined_prediction

    if refine == "bilateral":
        return refined_prediction(bilateral_refine(image, upsampled), "soft")
    return refined_prediction(bilateral_refine(image, upsampled, component_rule="largest"),
                              "binary")


def mask_prediction(record: ImageRecord, patch_mask: np.ndarray, size: tuple[int, int],
                    refine: str, max_pixels: int) -> tuple[list[int], dict[str, Any]]:
    """``(box, line fields)`` of one image: its patch mask ``(rows, cols)`` upsampled to
    ``size = (H, W)`` (the decoded original size), refined, counted against the GT."""
    if record.gt_mask is None:
        raise LostregError(f"{record.path}: no ground-truth mask (not a saliency record)")
    height, width = size
    prediction = refined(record, upsample_patch_mask(np.asarray(patch_mask), (height, width)),
                         refine, max_pixels)
    counts = image_counts(prediction, read_gt(record.gt_mask, (width, height)))
    binary = prediction > 0.5
    return mask_box(binary), {"pred_mask_rle": encode(binary), "sal_counts": counts.as_json()}

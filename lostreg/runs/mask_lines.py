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

The pass writes a batch image by image, every saliency run of an image together
(``sweep.Pass._write_masks``), so the refined runs of one image share one
``ImageRefinement``: the original is decoded and the solver's image half (grid,
bistochastization, system matrix: everything but the target) built once, and runs with the
same target (``bilateral`` and ``bilateral-binary`` of one method) share one solve. It lives
while that image's lines are made, on the thread making them.
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


class ImageRefinement:
    """What the refined runs of one image share while its lines are written: the decoded
    original image and the solver's image half (``bilateral.prepare_solver``: grid,
    bistochastization, system matrix), built on the first refined run that asks, and the soft
    output of each distinct target (``bilateral`` and ``bilateral-binary`` of one method
    solve the same system). One object per image, used by the one thread writing that image
    and dropped with it: memory is bounded by the images being written now, never the
    dataset. Every run gets the arrays a fresh solve would give (the same arithmetic)."""

    def __init__(self, record: ImageRecord, max_pixels: int) -> None:
        self.record, self.max_pixels = record, max_pixels
        self._solver: Any = None
        self._solved: list[tuple[np.ndarray, np.ndarray]] = []

    def solver(self, shape: tuple[int, int]) -> Any:
        """The prepared solver of this image, which must decode to ``shape`` (H, W)."""
        if self._solver is None:
            image = np.asarray(load_rgb(self.record.path, self.max_pixels))
            if image.shape[:2] != tuple(shape):
                raise LostregError(
                    f"{self.record.path}: decodes to {image.shape[1]}x{image.shape[0]}, its "
                    f"mask was upsampled to {shape[1]}x{shape[0]}")
            # imported on first use: the solver needs SciPy, which ``import lostreg.run`` must
            # not wait for
            from lostreg.methods.bilateral import prepare_solver

            self._solver = prepare_solver(image)
        elif self._solver.shape != tuple(shape):
            raise LostregError(f"{self.record.path}: masks of {shape[1]}x{shape[0]} and "
                               f"{self._solver.shape[1]}x{self._solver.shape[0]} for one image")
        return self._solver

    def soft(self, target: np.ndarray) -> np.ndarray:
        """The solver's soft output for ``target`` (read-only: runs may share it)."""
        for solved_target, soft in self._solved:
            if np.array_equal(solved_target, target):
                return soft
        from lostreg.methods.bilateral import solve

        soft, _ = solve(self.solver(target.shape), target)
        soft.setflags(write=False)
        self._solved.append((target, soft))
        return soft


def refined(record: ImageRecord, upsampled: np.ndarray, refine: str,
            max_pixels: int, shared: ImageRefinement | None = None) -> np.ndarray:
    """The map a saliency metric scores: the upsampled mask, or its bilateral refinement
    (``shared``: the image's refinement state, when other runs of the image use it too)."""
    if refine == "none":
        return upsampled
    if refine not in ("bilateral", "bilateral-binary"):
        raise LostregError(f"--refine {refine!r}: expected none, bilateral or bilateral-binary")
    soft = (shared or ImageRefinement(record, max_pixels)).soft(upsampled)
    if refine == "bilateral":
        return soft
    from lostreg.methods.bilateral import post_process

    return post_process(soft, component_rule="largest").astype(np.float64)


def mask_prediction(record: ImageRecord, patch_mask: np.ndarray, size: tuple[int, int],
                    refine: str, max_pixels: int, shared: ImageRefinement | None = None
                    ) -> tuple[list[int], dict[str, Any]]:
    """``(box, line fields)`` of one image: its patch mask ``(rows, cols)`` upsampled to
    ``size = (H, W)`` (the decoded original size), refined (``shared``: the image's
    ``ImageRefinement``, shared by the runs written with it), counted against the GT."""
    if record.gt_mask is None:
        raise LostregError(f"{record.path}: no ground-truth mask (not a saliency record)")
    height, width = size
    prediction = refined(record, upsample_patch_mask(np.asarray(patch_mask), (height, width)),
                         refine, max_pixels, shared)
    counts = image_counts(prediction, read_gt(record.gt_mask, (width, height)))
    binary = prediction > 0.5
    return mask_box(binary), {"pred_mask_rle": encode(binary), "sal_counts": counts.as_json()}

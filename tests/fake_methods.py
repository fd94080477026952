"""A tiny seedless discovery method for the analysis tests, registered only while a test needs
it, plus an independent numpy computation of what it must return.

``fake_top``: the mask is every patch whose first feature channel exceeds ``fake_level``; the
box covers the whole mask (all components), in LOST's box convention; no seed (like DINO-seg).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from lostreg.methods import METHODS, MethodOutput, MethodSpec, Param, register_method
from lostreg.methods.geometry import grid_boxes_to_pixels

NAME = "fake_top"


def _run(feats: torch.Tensor, grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
         params: dict) -> MethodOutput:
    rows, cols = grid
    mask = (feats[..., 0] > params["fake_level"]).view(-1, rows, cols)
    empty = ~mask.flatten(1).any(dim=1)
    mask = mask | empty.view(-1, 1, 1)  # nothing above the level: the whole grid
    row_any, col_any = mask.any(dim=2), mask.any(dim=1)
    index_r = torch.arange(rows, device=feats.device)
    index_c = torch.arange(cols, device=feats.device)
    grid_box = torch.stack([
        torch.where(row_any, index_r, rows).min(dim=1).values,
        torch.where(col_any, index_c, cols).min(dim=1).values,
        torch.where(row_any, index_r, -1).max(dim=1).values,
        torch.where(col_any, index_c, -1).max(dim=1).values,
    ], dim=1)
    boxes = grid_boxes_to_pixels(grid_box, patch_size, sizes)
    return MethodOutput(boxes, torch.full((feats.shape[0],), -1, dtype=torch.long), mask)


def _reference(feats: torch.Tensor, grid: tuple[int, int], patch_size: int,
               size: tuple[int, int], params: dict) -> MethodOutput:
    out = _run(feats[None], grid, patch_size, torch.tensor([list(size)]), params)
    return MethodOutput(out.box[0], out.seed[0], out.mask[0])


SPEC = MethodSpec(NAME, _run, _reference,
                  params=(Param("fake_level", float, 0.0, "mask level of the fake method"),),
                  title="FakeTop", description="test-only method without a seed")


def expected(feats: np.ndarray, grid: tuple[int, int], patch_size: int,
             size: tuple[int, int], level: float = 0.0) -> tuple[list[int], np.ndarray]:
    """What ``fake_top`` must return for one image's ``(N, D)`` features, in plain numpy:
    the pixel box and the ``(rows, cols)`` mask."""
    mask = np.asarray(feats)[:, 0].reshape(grid) > level
    if not mask.any():
        mask[:] = True
    rows, cols = np.nonzero(mask)
    height, width = size
    box = [int(cols.min()) * patch_size, int(rows.min()) * patch_size,
           min((int(cols.max()) + 1) * patch_size, width),
           min((int(rows.max()) + 1) * patch_size, height)]
    return box, mask


@contextmanager
def fake_method_registered() -> Iterator[MethodSpec]:
    """``fake_top`` in the method registry for the duration, removed afterwards."""
    assert NAME not in METHODS
    register_method(SPEC)
    try:
        yield SPEC
    finally:
        METHODS.pop(NAME, None)

"""LOST seed expansion (Simeoni et al., BMVC 2021), exact and batched on any device.

Semantics, identical to the reference implementation:

* ``A = F F^T + gram_bias`` (float32 at least);
* degree of a patch = number of *other* patches ``j`` with ``A[i, j] > 0``;
* seed = the lowest-degree patch (ties: lowest index);
* potentials = the ``k_patches`` lowest-degree patches (stable order, ties by index);
* similars = potentials ``p`` with ``A[seed, p] > 0``;
* ``M`` = sum of the rows of ``A`` over similars, ``mask = M > 0`` on the patch grid;
* the 4-connected component of ``mask`` holding the seed gives the box
  ``[col_min*p, row_min*p, (col_max+1)*p, (row_max+1)*p]`` clipped to the unpadded ``(W, H)``.

If the seed itself is outside the mask (only possible with a negative ``gram_bias``; the
reference raises there), the box is the seed's own patch.

``lost`` runs the whole batch as tensor ops (on a GPU the connected component is grown by
4-neighbour propagation inside the mask, so there is no host round trip per image; on a CPU one
``scipy.ndimage.label`` call labels the whole batch).
``lost_reference`` is the plain per-image path (torch + ``scipy.ndimage.label``) that tests
compare it with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from lostreg.methods import MethodOutput, MethodSpec, Param, register_method

ImageSize = tuple[int, int]


class LostOutput(NamedTuple):
    """``box`` ``[x1, y1, x2, y2]`` in pixels, ``seed`` patch index (row-major), ``degrees``.

    Unbatched input gives ``box: list[int]``, ``seed: int``, ``degrees: Tensor (N,)``;
    batched input gives ``box: LongTensor (B, 4)``, ``seed: LongTensor (B,)``,
    ``degrees: Tensor (B, N)``. (The boxed patches come with ``lost_with_mask``.)
    """

    box: list[int] | torch.Tensor
    seed: int | torch.Tensor
    degrees: torch.Tensor


def _image_sizes(image_size: ImageSize | Sequence[ImageSize] | torch.Tensor, batch: int,
                 device: torch.device) -> torch.Tensor:
    sizes = torch.as_tensor(image_size, dtype=torch.long, device=device)
    if sizes.ndim == 1:
        sizes = sizes.expand(batch, 2)
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_size must be (H, W) or one (H, W) per image, got {tuple(sizes.shape)}")
    return sizes


def seed_component(mask: torch.Tensor, seed_rc: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """The 4-connected component of ``mask`` (B, R, C) that contains each seed (B, 2).

    Grows the seed by 4-neighbour dilation restricted to the mask until nothing changes;
    convergence is checked every ``check_every`` steps to keep device syncs rare. A seed
    outside the mask gives an empty component.
    """
    batch, rows, cols = mask.shape
    index = torch.arange(batch, device=mask.device)
    component = torch.zeros_like(mask)
    component[index, seed_rc[:, 0], seed_rc[:, 1]] = True
    component &= mask
    kernel = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32,
                          device=mask.device).view(1, 1, 3, 3)
    mask_f = mask.unsqueeze(1).float()
    current = component.unsqueeze(1).float()
    while True:
        previous = current
        for _ in range(check_every):
            current = (F.conv2d(current, kernel, padding=1) > 0).float() * mask_f
        if torch.equal(current, previous):
            return current.squeeze(1).bool()


def _component_boxes(component: torch.Tensor, seed_rc: torch.Tensor) -> torch.Tensor:
    """Patch-grid boxes ``(row_min, col_min, row_max, col_max)`` of each component (B, 4).

    An empty component (seed outside the mask) falls back to the seed's own patch.
    """
    batch, rows, cols = component.shape
    row_any = component.any(dim=2)
    col_any = component.any(dim=1)
    row_idx = torch.arange(rows, device=component.device).expand(batch, rows)
    col_idx = torch.arange(cols, device=component.device).expand(batch, cols)
    big = rows + cols
    row_min = torch.where(row_any, row_idx, big).amin(dim=1)
    row_max = torch.where(row_any, row_idx, -1).amax(dim=1)
    col_min = torch.where(col_any, col_idx, big).amin(dim=1)
    col_max = torch.where(col_any, col_idx, -1).amax(dim=1)
    empty = ~row_any.any(dim=1)
    row_min = torch.where(empty, seed_rc[:, 0], row_min)
    row_max = torch.where(empty, seed_rc[:, 0], row_max)
    col_min = torch.where(empty, seed_rc[:, 1], col_min)
    col_max = torch.where(empty, seed_rc[:, 1], col_max)
    return torch.stack([row_min, col_min, row_max, col_max], dim=1)


# Bytes of float32 similarities built at once. On a CPU a few images, so the block stays in
# cache instead of streaming ``(B, N, N)`` temporaries; on a GPU as many as fit a budget that
# leaves room for the backbone (``(N, N)`` float32 plus its boolean and gathered copies is
# ~2.5x this): ViT-S/14 on VOC (N ~ 1000) runs 256 images at once, a ViT/8 on COCO (N ~ 4800)
# 11, instead of one ``(B, N, N)`` block of ~6 GiB at batch 64.
CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 1 << 30}


def _chunk_size(batch: int, num_patches: int, device: torch.device) -> int:
    """Images whose ``(N, N)`` similarities are built at once (see ``CHUNK_BYTES``)."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, min(batch, budget // max(1, num_patches * num_patches * 4)))


def _seed_expansion(feats: torch.Tensor, gram_bias: float, k_patches: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degrees, seeds and ``M`` (the sum of the similar potentials' rows) for ``(b, N, d)``."""
    batch, num_patches, _ = feats.shape
    similarity = torch.bmm(feats, feats.transpose(1, 2))
    if gram_bias != 0.0:
        similarity.add_(gram_bias)
    positive = similarity > 0
    degrees = positive.sum(dim=-1, dtype=torch.int32)
    degrees -= torch.diagonal(positive, dim1=-2, dim2=-1).to(torch.int32)
    order = torch.sort(degrees, dim=1, stable=True).indices
    seed = order[:, 0]
    potentials = order[:, : min(k_patches, num_patches)]
    index = torch.arange(batch, device=feats.device)
    is_similar = torch.gather(similarity[index, seed], 1, potentials) > 0  # (b, k)
    rows = torch.gather(similarity, 1, potentials.unsqueeze(-1).expand(-1, -1, num_patches))
    summed = torch.bmm(is_similar.unsqueeze(1).double(), rows.double()).squeeze(1)  # (b, N)
    return degrees, seed, summed


def _seed_component_scipy(mask: torch.Tensor, seed_rc: torch.Tensor) -> torch.Tensor:
    """CPU path of ``seed_component``: one ``scipy.ndimage.label`` call for the whole stack
    (a 3-D structure without links across images), cheaper there than many dilations."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    labels = torch.from_numpy(scipy.ndimage.label(mask.numpy(), structure=structure)[0])
    batch = mask.shape[0]
    seed_label = labels[torch.arange(batch), seed_rc[:, 0], seed_rc[:, 1]]
    return (labels == seed_label.view(-1, 1, 1)) & (seed_label > 0).view(-1, 1, 1)


def grid_boxes_to_pixels(grid_box: torch.Tensor, patch_size: int,
                         sizes: torch.Tensor) -> torch.Tensor:
    """Patch-grid boxes ``(row_min, col_min, row_max, col_max)`` (B, 4) as pixel boxes
    ``[col_min*p, row_min*p, (col_max+1)*p, (row_max+1)*p]`` clipped to the unpadded ``sizes``
    (B, 2) = (H, W): LOST's box convention, which every method here shares."""
    return torch.stack(
        [
            grid_box[:, 1] * patch_size,
            grid_box[:, 0] * patch_size,
            torch.minimum((grid_box[:, 3] + 1) * patch_size, sizes[:, 1]),
            torch.minimum((grid_box[:, 2] + 1) * patch_size, sizes[:, 0]),
        ],
        dim=1,
    )


def seed_components(mask: torch.Tensor, seed: torch.Tensor, patch_size: int,
                    sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(B, 4)`` in pixels and the boxed patches ``(B, R, C)``: the 4-connected
    component of ``mask`` (B, R, C) holding each seed (flat patch index), or the seed's own
    patch when the seed is outside the mask; boxes clipped to the unpadded ``sizes``."""
    cols = mask.shape[2]
    seed_rc = torch.stack([seed // cols, seed % cols], dim=1)
    if mask.device.type == "cpu":
        component = _seed_component_scipy(mask, seed_rc)
    else:
        component = seed_component(mask, seed_rc)
    grid_box = _component_boxes(component, seed_rc)
    # an empty component becomes the seed's own patch (no host sync: a masked one-hot)
    empty = ~component.flatten(1).any(dim=1)
    seed_patch = torch.zeros_like(component).flatten(1)
    seed_patch[torch.arange(mask.shape[0], device=mask.device), seed] = True
    component = component | (seed_patch.view_as(component) & empty.view(-1, 1, 1))
    return grid_boxes_to_pixels(grid_box, patch_size, sizes), component


def seed_boxes(mask: torch.Tensor, seed: torch.Tensor, patch_size: int,
               sizes: torch.Tensor) -> torch.Tensor:
    """LOST's boxes ``(B, 4)`` in pixels (see ``seed_components``)."""
    return seed_components(mask, seed, patch_size, sizes)[0]


def lost(
    feats: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    image_size: ImageSize | Sequence[ImageSize] | torch.Tensor,
    k_patches: int = 100,
    gram_bias: float = 0.0,
) -> LostOutput:
    """Run LOST on patch features ``(N, d)`` or ``(B, N, d)`` laid out row-major on ``grid``.

    ``grid = (rows, cols)`` of the padded image, ``image_size = (H, W)`` of the unpadded
    image (or one per batch item). See the module docstring for the exact semantics.
    """
    return lost_with_mask(feats, grid, patch_size, image_size, k_patches, gram_bias)[0]


def lost_with_mask(
    feats: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    image_size: ImageSize | Sequence[ImageSize] | torch.Tensor,
    k_patches: int = 100,
    gram_bias: float = 0.0,
) -> tuple[LostOutput, torch.Tensor]:
    """``lost`` plus the boxed patches: the seed's component, or the seed's own patch when the
    seed is outside the mask (``(rows, cols)`` or ``(B, rows, cols)`` bool)."""
    unbatched = feats.ndim == 2
    if unbatched:
        feats = feats.unsqueeze(0)
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.float()
    batch, num_patches, _ = feats.shape
    rows, cols = grid
    if rows * cols != num_patches:
        raise ValueError(f"grid {grid} has {rows * cols} patches but feats have {num_patches}")
    device = feats.device
    sizes = _image_sizes(image_size, batch, device)

    chunk = _chunk_size(batch, num_patches, device)
    parts = [_seed_expansion(feats[i:i + chunk], gram_bias, k_patches)
             for i in range(0, batch, chunk)]
    degrees = torch.cat([p[0] for p in parts]).long()
    seed = torch.cat([p[1] for p in parts])
    mask = (torch.cat([p[2] for p in parts]) > 0).view(batch, rows, cols)

    boxes, component = seed_components(mask, seed, patch_size, sizes)
    if unbatched:
        return (LostOutput([int(v) for v in boxes[0].tolist()], int(seed[0]), degrees[0]),
                component[0])
    return LostOutput(boxes, seed, degrees), component


def lost_reference(
    feats: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    image_size: ImageSize,
    k_patches: int = 100,
    gram_bias: float = 0.0,
) -> LostOutput:
    """Plain per-image LOST, written step by step like the reference code (scipy labelling).

    Kept as the yardstick for ``lost``: tests and ``benchmarks/`` compare the two.
    """
    return lost_reference_with_mask(feats, grid, patch_size, image_size, k_patches, gram_bias)[0]


def lost_reference_with_mask(
    feats: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    image_size: ImageSize,
    k_patches: int = 100,
    gram_bias: float = 0.0,
) -> tuple[LostOutput, torch.Tensor]:
    """``lost_reference`` plus the boxed patches ``(rows, cols)`` bool."""
    feats = feats.float() if feats.dtype not in (torch.float32, torch.float64) else feats
    similarity = feats @ feats.T + gram_bias
    scoring = similarity.clone()
    scoring.fill_diagonal_(0)
    degrees = (scoring > 0).sum(dim=1)
    order = torch.sort(degrees, stable=True).indices
    seed = int(order[0])
    potentials = order[:k_patches]
    similars = potentials[similarity[seed, potentials] > 0]
    summed = similarity[similars, :].double().sum(dim=0)
    rows, cols = grid
    labels, _ = scipy.ndimage.label(summed.reshape(rows, cols).cpu().numpy() > 0)
    seed_r, seed_c = divmod(seed, cols)
    label = labels[seed_r, seed_c]
    if label == 0:
        r_min = r_max = seed_r
        c_min = c_max = seed_c
        component = np.zeros((rows, cols), dtype=bool)
        component[seed_r, seed_c] = True
    else:
        component = labels == label
        where = np.nonzero(component)
        r_min, r_max = int(where[0].min()), int(where[0].max())
        c_min, c_max = int(where[1].min()), int(where[1].max())
    height, width = image_size
    box = [
        c_min * patch_size,
        r_min * patch_size,
        min((c_max + 1) * patch_size, width),
        min((r_max + 1) * patch_size, height),
    ]
    return LostOutput(box, seed, degrees), torch.from_numpy(component)


# --- registry entry ------------------------------------------------------------------------


def _run(feats: torch.Tensor, grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
         params: dict) -> MethodOutput:
    out, mask = lost_with_mask(feats, grid, patch_size, sizes, params["k_patches"],
                               params["gram_bias"])
    return MethodOutput(out.box, out.seed, mask)


def _reference(feats: torch.Tensor, grid: tuple[int, int], patch_size: int, size: ImageSize,
               params: dict) -> MethodOutput:
    out, mask = lost_reference_with_mask(feats, grid, patch_size, size, params["k_patches"],
                                         params["gram_bias"])
    return MethodOutput(torch.tensor(out.box), torch.tensor(out.seed), mask)


def _check(params: dict) -> str | None:
    if params["k_patches"] < 1:
        return f"--k-patches {params['k_patches']}: must be at least 1"
    if not math.isfinite(params["gram_bias"]):
        return f"--gram-bias {params['gram_bias']}: must be a finite number"
    return None


register_method(MethodSpec(
    "lost", _run, _reference,
    params=(
        Param("k_patches", int, 100, "LOST's k (seed expansion); a comma list sweeps it",
              on_config=True),
        Param("gram_bias", float, 0.0, "added to F F^T; a comma list sweeps it in one pass "
              "(write --gram-bias=-0.1,0 when the list starts with a minus)", on_config=True),
    ),
    legacy_identity=True,
    title="LOST",
    description="Siméoni et al., BMVC 2021: the lowest-degree patch seeds a box",
    check=_check,
))

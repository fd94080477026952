"""DINO-seg, LOST's baseline (``object_discovery.py:dino_seg`` of ``valeoai/LOST``), batched.

Input: the ``attn`` feature kind, the class token's attention to the *patch* tokens per head
``(B, N, heads)`` (softmax over all tokens, so registers take mass but are never patches).

* take head ``dinoseg_head``; sort its ``N`` values ascending (ties: lower patch index first,
  a stable sort; the reference's unstable ``torch.sort`` leaves their order to the device),
  divide by their sum, and keep the patches whose cumulative mass is ``> 1 - dinoseg_mass``
  (float32 throughout, as the reference), back in patch order;
* label the 4-connected components of the kept patches (``scipy.ndimage.label``'s default
  structure; labels numbered in raster order of each component's first patch);
* box a component: ``[col_min*p, row_min*p, (col_max+1)*p, (row_max+1)*p]``.

``dinoseg_variant="reference"`` (default) reproduces the published code's two quirks, with
which its published figures were computed:

* component sizes are listed for ``range(max(label))``, i.e. labels ``0..max-1``: the
  *highest-numbered* component is never a candidate. The box is the largest of labels
  ``1..max-1`` (ties: the lowest label); with a single component the list is ``[background]``
  and the box is drawn around the *background* (label 0, all patches not kept, connected or
  not);
* the box is not clipped to the image: padding patches can widen it to the padded size.

``dinoseg_variant="corrected"``: the largest component over all labels (ties: the lowest
label), clipped to the unpadded image as LOST's box.

Degenerate cases (the reference raises on an empty ``np.where``): when every patch is kept and
the reference variant boxes the empty background, or when no patch is kept at all (an
attention row of zeros or NaNs), the box is the whole grid (every patch in the mask), clipped
or not as the variant says. DINO-seg has no seed: ``seed = -1``.

``dinoseg`` labels the whole batch at once: on a CPU with one ``scipy.ndimage.label`` call
(a 3-D structure without links across images); on a GPU by propagating the smallest patch
index through each component (4-neighbour minimum plus pointer jumping), checked every few
steps for the whole batch, so no host round trip per image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lostreg.errors import LostregError
from lostreg.methods.geometry import grid_boxes_to_pixels
from lostreg.methods.registry import MethodOutput, MethodSpec, Param, register_method

VARIANTS = ("reference", "corrected")


def _head_error(head: int, heads: int) -> LostregError:
    return LostregError(f"--dinoseg-head {head}: the attention has {heads} heads "
                        f"(valid heads 0..{heads - 1})")


def kept_patches(attn: torch.Tensor, head: int, mass: float) -> torch.Tensor:
    """The patches DINO-seg keeps, ``(B, N)`` bool, from ``attn`` ``(B, N, heads)``."""
    if not 0 <= head < attn.shape[-1]:
        raise _head_error(head, attn.shape[-1])
    values, order = torch.sort(attn[..., head].float(), dim=1, stable=True)
    values = values / values.sum(dim=1, keepdim=True)
    kept_sorted = torch.cumsum(values, dim=1) > (1 - mass)
    return torch.empty_like(kept_sorted).scatter_(1, order, kept_sorted)


# --- connected components ----------------------------------------------------------------------


def _roots_scipy(mask: torch.Tensor) -> torch.Tensor:
    """``component_roots`` with one ``scipy.ndimage.label`` call for the whole stack."""
    import scipy.ndimage  # where used: a GPU run never loads scipy
    batch, rows, cols = mask.shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    labels, count = scipy.ndimage.label(mask.cpu().numpy(), structure=structure)
    labels = torch.from_numpy(labels.astype(np.int64)).view(batch, rows * cols)
    flat = torch.arange(rows * cols).expand(batch, -1)
    first = torch.full((count + 1,), rows * cols, dtype=torch.long)
    first.scatter_reduce_(0, labels.flatten(), flat.flatten(), reduce="amin")
    return torch.where(labels > 0, first[labels], -1).to(mask.device)


def _roots_propagate(mask: torch.Tensor, check_every: int = 4) -> torch.Tensor:
    """``component_roots`` by tensor ops (any device): each kept patch takes the smallest
    index among itself and its 4 neighbours, then the label of the patch it points to
    (pointer jumping), until nothing changes (checked every ``check_every`` rounds)."""
    batch, rows, cols = mask.shape
    n = rows * cols
    outside = torch.full_like(mask, n, dtype=torch.long)
    flat = torch.arange(n, device=mask.device).view(1, rows, cols).expand(batch, -1, -1)
    label = torch.where(mask, flat, outside)
    while True:
        previous = label
        for _ in range(check_every):
            smallest = label.clone()
            smallest[:, 1:] = torch.minimum(smallest[:, 1:], label[:, :-1])
            smallest[:, :-1] = torch.minimum(smallest[:, :-1], label[:, 1:])
            smallest[:, :, 1:] = torch.minimum(smallest[:, :, 1:], label[:, :, :-1])
            smallest[:, :, :-1] = torch.minimum(smallest[:, :, :-1], label[:, :, 1:])
            pointed = smallest.view(batch, n).clamp(max=n - 1)
            jumped = torch.gather(smallest.view(batch, n), 1, pointed).view_as(label)
            label = torch.where(mask, torch.minimum(smallest, jumped), outside)
        if torch.equal(label, previous):
            return torch.where(mask, label, -1).view(batch, n)


def component_roots(mask: torch.Tensor) -> torch.Tensor:
    """For every patch of ``mask`` (B, R, C), the smallest flat index in its 4-connected
    component (its *root*), ``-1`` outside the mask: ``(B, R*C)`` long. Roots ordered by value
    are scipy's label order (raster order of each component's first patch)."""
    if mask.device.type == "cpu":
        return _roots_scipy(mask)
    return _roots_propagate(mask)


def select_component(kept: torch.Tensor, roots: torch.Tensor, variant: str) -> torch.Tensor:
    """The patches DINO-seg boxes, ``(B, N)`` bool (module docstring: quirks, conventions)."""
    n = kept.shape[1]
    index = torch.arange(n, device=kept.device)
    is_root = roots == index
    sizes = torch.zeros_like(roots).scatter_add_(1, roots.clamp(min=0), kept.long())
    count = is_root.sum(dim=1)
    if variant == "reference":
        last = torch.where(is_root, index, -1).amax(dim=1, keepdim=True)
        candidate = is_root & (index != last)
        background = count <= 1
    else:
        candidate = is_root
        background = count == 0
    key = torch.where(candidate, sizes * (n + 1) + (n - index), -1)  # largest, then first
    chosen = roots == key.argmax(dim=1, keepdim=True)
    chosen = torch.where(background.unsqueeze(1), ~kept, chosen)
    nothing = ~chosen.any(dim=1, keepdim=True)  # empty background (all kept) or none kept
    return chosen | nothing


def mask_grid_boxes(mask: torch.Tensor) -> torch.Tensor:
    """``(row_min, col_min, row_max, col_max)`` (B, 4) of non-empty masks (B, R, C)."""
    batch, rows, cols = mask.shape
    row_any, col_any = mask.any(dim=2), mask.any(dim=1)
    row_idx = torch.arange(rows, device=mask.device).expand(batch, rows)
    col_idx = torch.arange(cols, device=mask.device).expand(batch, cols)
    return torch.stack([
        torch.where(row_any, row_idx, rows).amin(dim=1),
        torch.where(col_any, col_idx, cols).amin(dim=1),
        torch.where(row_any, row_idx, -1).amax(dim=1),
        torch.where(col_any, col_idx, -1).amax(dim=1),
    ], dim=1)


def _box_limits(variant: str, grid: tuple[int, int], patch_size: int,
                sizes: torch.Tensor) -> torch.Tensor:
    """What the box is clipped to: the image (corrected) or the padded grid (reference)."""
    if variant == "corrected":
        return sizes
    padded = torch.tensor([grid[0] * patch_size, grid[1] * patch_size], device=sizes.device)
    return padded.expand_as(sizes)


def dinoseg(attn: torch.Tensor, grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
            head: int = 4, mass: float = 0.6, variant: str = "reference") -> MethodOutput:
    """DINO-seg on a batch of attention maps ``(B, N, heads)`` of one ``grid``."""
    batch, n, _ = attn.shape
    rows, cols = grid
    if rows * cols != n:
        raise ValueError(f"grid {grid} has {rows * cols} patches but attn has {n}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    kept = kept_patches(attn, head, mass)
    roots = component_roots(kept.view(batch, rows, cols))
    mask = select_component(kept, roots, variant).view(batch, rows, cols)
    sizes = sizes.to(attn.device)
    boxes = grid_boxes_to_pixels(mask_grid_boxes(mask), patch_size,
                                 _box_limits(variant, grid, patch_size, sizes))
    seed = torch.full((batch,), -1, dtype=torch.long, device=attn.device)
    return MethodOutput(boxes, seed, mask, {"kept": kept.view(batch, rows, cols)})


# --- the per-image reference -------------------------------------------------------------------


def dinoseg_reference(attn: torch.Tensor, grid: tuple[int, int], patch_size: int,
                      image_size: tuple[int, int], head: int = 4, mass: float = 0.6,
                      variant: str = "reference") -> MethodOutput:
    """Plain per-image DINO-seg on ``(N, heads)``, step by step like the published code
    (every head thresholded, then one labelled), plus the conventions of the module docstring.
    """
    import scipy.ndimage  # where used: a GPU run never loads scipy
    rows, cols = grid
    heads = attn.shape[1]
    if not 0 <= head < heads:
        raise _head_error(head, heads)
    attentions = attn.float().transpose(0, 1).reshape(heads, -1)
    val, idx = torch.sort(attentions, stable=True)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - mass)
    idx2 = torch.argsort(idx)
    for h in range(heads):
        th_attn[h] = th_attn[h][idx2[h]]
    th_attn = th_attn.reshape(heads, rows, cols).float()
    labeled_array, num_features = scipy.ndimage.label(th_attn[head].cpu().numpy())
    if variant == "reference":
        size_components = [np.sum(labeled_array == c) for c in range(np.max(labeled_array))]
        if len(size_components) > 1:
            biggest_component = int(np.argmax(size_components[1:])) + 1
        else:
            biggest_component = 0
    else:
        sizes = [np.sum(labeled_array == c) for c in range(1, num_features + 1)]
        biggest_component = int(np.argmax(sizes)) + 1 if sizes else 0
    component = labeled_array == biggest_component
    if not component.any():
        component = np.ones_like(component)
    where = np.nonzero(component)
    box = [int(where[1].min()) * patch_size, int(where[0].min()) * patch_size,
           (int(where[1].max()) + 1) * patch_size, (int(where[0].max()) + 1) * patch_size]
    if variant == "corrected":
        box[2] = min(box[2], image_size[1])
        box[3] = min(box[3], image_size[0])
    return MethodOutput(torch.tensor(box), torch.tensor(-1), torch.from_numpy(component))


# --- registry entry ------------------------------------------------------------------------


def _run(attn: torch.Tensor, grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
         params: dict) -> MethodOutput:
    return dinoseg(attn, grid, patch_size, sizes, params["dinoseg_head"],
                   params["dinoseg_mass"], params["dinoseg_variant"])


def _reference(attn: torch.Tensor, grid: tuple[int, int], patch_size: int,
               size: tuple[int, int], params: dict) -> MethodOutput:
    return dinoseg_reference(attn, grid, patch_size, size, params["dinoseg_head"],
                             params["dinoseg_mass"], params["dinoseg_variant"])


def _check(params: dict) -> str | None:
    head, mass = params["dinoseg_head"], params["dinoseg_mass"]
    if isinstance(head, bool) or not isinstance(head, int) or head < 0:
        return f"--dinoseg-head {head}: must be a head index >= 0"
    if not isinstance(mass, (int, float)) or not math.isfinite(mass) or not 0 < mass <= 1:
        return f"--dinoseg-mass {mass}: must be in (0, 1] (the share of attention mass kept)"
    return None


register_method(MethodSpec(
    "dinoseg", _run, _reference,
    params=(
        Param("dinoseg_head", int, 4, "DINO-seg: the attention head whose map is thresholded"),
        Param("dinoseg_mass", float, 0.6, "DINO-seg: the share of attention mass kept"),
        Param("dinoseg_variant", str, "reference", "DINO-seg: 'reference' reproduces the "
              "published code's quirks (highest label never chosen, a single component boxes "
              "the background, box not clipped); 'corrected' boxes the largest component, "
              "clipped", choices=VARIANTS),
    ),
    feature_kinds=("attn",),
    default_feature="attn",
    # saliency: the thresholded attention itself (every kept patch, DINO's
    # visualize_attention masks), not the one component the box is drawn around
    saliency_mask=lambda output: output.maps["kept"],
    title="DINO-seg",
    description="LOST's baseline after DINO's attention maps: the largest component of the "
                "patches holding 60% of one head's class-token attention",
    check=_check,
))

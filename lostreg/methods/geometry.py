"""Patch-grid geometry the methods share: 4-connected components and LOST's box convention.

Every method here ends the same way: a patch mask on the ``rows x cols`` grid -> the
component holding a seed (or a chosen component) -> its bounding box in pixels
``[col_min*p, row_min*p, (col_max+1)*p, (row_max+1)*p]`` clipped to the unpadded image. On the
CPU components come from one ``scipy.ndimage.label`` call per batch; on a GPU from label
propagation with pointer jumping, with no host sync.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Pointer jumps per propagation round: a round then shortens every label chain 16-fold.
_JUMPS_PER_ROUND = 4


def _run_starts(mask: torch.Tensor) -> torch.Tensor:
    """Initial labels ``(B, R, C)``: the flat index of the start of each pixel's horizontal
    run inside the mask (one ``cummax``, so a row's run is labelled before any round), ``R*C``
    for pixels outside the mask."""
    batch, rows, cols = mask.shape
    starts = mask.clone()
    starts[:, :, 1:] &= ~mask[:, :, :-1]
    index = torch.arange(rows * cols, device=mask.device).view(1, rows, cols)
    first = torch.where(starts, index, -1).cummax(dim=2).values
    return torch.where(mask, first, rows * cols)


def _propagation_round(labels: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor,
                       jumps: int) -> torch.Tensor:
    """One round on ``labels (B, R*C + 1)`` (slot ``R*C`` of each image is a sentinel that
    points to itself): the pixel each label points to takes the lowest label among the pixel
    and its 4-neighbours inside the mask (so whole trees hook onto each other, not just the
    pixel), the pixel too, then ``jumps`` pointer jumps (``label = label[label]``). Returns new
    labels (input untouched)."""
    batch, rows, cols = mask.shape
    n = rows * cols
    grid = labels[:, :n].view(batch, rows, cols)
    padded = F.pad(grid, (1, 1, 1, 1), value=n)
    neighbours = torch.minimum(torch.minimum(padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]),
                               torch.minimum(padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]))
    lowest = torch.where(mask, torch.minimum(grid, neighbours), n).reshape(batch, n)
    roots = (labels[:, :n] + offsets).reshape(-1)
    hooked = labels.reshape(-1).scatter_reduce(0, roots, lowest.reshape(-1), reduce="amin")
    hooked = hooked.view(batch, n + 1)
    hooked[:, :n] = torch.minimum(hooked[:, :n], lowest)
    for _ in range(jumps):
        hooked = torch.gather(hooked, 1, hooked)
    return hooked


def component_labels(mask: torch.Tensor, check_every: int = 4) -> torch.Tensor:
    """4-connected component labels of each mask in ``(B, R, C)``, tensor ops on any device.

    Returns ``(B, R*C)`` long: for a pixel inside the mask, the flat index of one pixel of its
    component (the same for the whole component, so different for different components);
    ``R*C`` outside the mask.

    Why it is exact: every label is a pointer to a pixel of the same component with an index
    no larger than the pixel's own (true of the run starts, and kept by each round, which only
    takes minima of such pointers and follows them), so labels only decrease and the loop
    ends. It ends at a round that changed nothing; there each pixel's label is at most every
    4-neighbour's label inside the mask and vice versa, so labels are constant on a component,
    and as pointers into their own component they differ between components.
    Convergence is checked (one host sync) after every ``check_every`` rounds, comparing the
    last round's input and output, so correctness never rests on a round count.

    Rounds needed (the last one, which changes nothing, included): 2-4 on LOST's masks
    (``benchmarks/bench_lost.py``), 5 on dense random masks, at most 5 on spirals and
    serpentines up to 250x250 whose single path a dilation walks pixel by pixel (31k steps;
    ``tests/test_lost_components.py``). No round bound is claimed: the scheme belongs to the
    simple labeling algorithms of Liu and Tarjan (arXiv:1812.06177: parent-connect and
    shortcut steps), for some of which they prove O(log n) or O(log^2 n) steps; this variant
    (a fixed 4 jumps a round) is not shown to be one of them. ``check_every = 4`` makes one
    sync the usual cost.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    batch, rows, cols = mask.shape
    n = rows * cols
    labels = torch.full((batch, n + 1), n, dtype=torch.long, device=mask.device)
    labels[:, :n] = _run_starts(mask).view(batch, n)
    offsets = torch.arange(batch, device=mask.device).unsqueeze(1) * (n + 1)
    while True:
        for _ in range(check_every):
            before = labels
            labels = _propagation_round(labels, mask, offsets, _JUMPS_PER_ROUND)
        if torch.equal(labels, before):
            return labels[:, :n]


def seed_component(mask: torch.Tensor, seed_rc: torch.Tensor, check_every: int = 4
                   ) -> torch.Tensor:
    """The 4-connected component of ``mask`` (B, R, C) that contains each seed (B, 2) as
    ``(row, col)``; a seed outside the mask gives an empty component.

    Tensor ops on any device (``component_labels``), the GPU path of ``seed_components``; one
    host sync per ``check_every`` propagation rounds.
    """
    batch, rows, cols = mask.shape
    labels = component_labels(mask, check_every)
    seed_flat = (seed_rc[:, 0] * cols + seed_rc[:, 1]).unsqueeze(1)
    seed_label = torch.gather(labels, 1, seed_flat)  # R*C for a seed outside the mask
    return ((labels == seed_label) & mask.reshape(batch, -1)).view(batch, rows, cols)


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
# 11, instead of one ``(B, N, N)`` block of ~6 GiB at batch 64. An image whose own ``(N, N)``
# exceeds the budget is built in row blocks of about the budget (``_row_block``).
def _seed_component_scipy(mask: torch.Tensor, seed_rc: torch.Tensor) -> torch.Tensor:
    """CPU path of ``seed_component``: one ``scipy.ndimage.label`` call for the whole stack
    (a 3-D structure without links across images), cheaper there than many dilations."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    import scipy.ndimage  # where used: a GPU run never loads scipy

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
    seed_patch = torch.zeros_like(component).flatten(1).scatter_(1, seed.unsqueeze(1), True)
    component = component | (seed_patch.view_as(component) & empty.view(-1, 1, 1))
    return grid_boxes_to_pixels(grid_box, patch_size, sizes), component


def seed_boxes(mask: torch.Tensor, seed: torch.Tensor, patch_size: int,
               sizes: torch.Tensor) -> torch.Tensor:
    """LOST's boxes ``(B, 4)`` in pixels (see ``seed_components``)."""
    return seed_components(mask, seed, patch_size, sizes)[0]

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

``lost`` runs the whole batch as tensor ops; ``lost_reference`` is the plain per-image path
(torch + ``scipy.ndimage.label``) that tests compare it with.

Bounded memory. Similarities are built a few images at a time under ``CHUNK_BYTES``; an image
whose ``(N, N)`` block alone exceeds the budget (a 4000x3000 image at patch 14 has N ~ 61k, a
15 GB block) is built in row blocks instead: each block gives its rows' degrees (positive
entries minus the diagonal one), the degrees give the seed and the ``k`` potentials, and only
those ``k`` rows are recomputed for ``M``. Memory is one block plus ``k x N``, never ``N x N``.

Why the row blocks give the unblocked path's bits. Entry ``(i, j)`` of a float32 matmul is a
sum of ``d`` products whose rounding depends on the order the BLAS kernel sums them in; two
orders differ by up to ``gamma_d * sum_k |f_ik f_jk|`` (``gamma_d ~ d * 2^-24``), so an entry
that close to 0 *can* change sign between two kernels, and with it a degree or ``M``. (The
same is true between this module's ``bmm`` and the reference's ``mm``, or a CPU and a GPU.)
Blocking is exact when a block's product sums each entry in the same order as the full one,
which GEMM kernels that tile only the output and walk ``d`` alike for every tile do; it is not
guaranteed in general (split-``d`` kernels, other kernels for short products). Measured on
this project's CPU BLAS (MKL, ``torch.__config__``): products of 12 to 699 rows at any offset
are bit-identical to the full product's rows; 1-11-row products are not (the rows past the
last multiple of 4 differ). So blocks have at least ``MIN_BLOCK_ROWS`` (64) rows, evened out
so that no short tail block is left, and the ``k`` potential rows are computed padded to
``MIN_BLOCK_ROWS`` rows. ``tests/test_lost_blocked.py`` checks that BLAS property wherever it
runs (and, on a GPU, the blocked path against the unblocked one under cuBLAS), and checks the
blocking logic with integer-valued features, whose float32 products and sums are exact in any
order. Where a BLAS broke the property, the blocked path would still be a float32 LOST, one
that differs from the unblocked one only on entries within rounding error of 0.

Connected components. On a CPU one ``scipy.ndimage.label`` call labels the whole batch (a 3-D
structure without links between images). Elsewhere ``seed_component`` labels with tensor ops
only (min-label hooking with pointer jumping, see ``component_labels``): a few rounds and one
host sync per batch, where a 4-neighbour dilation needed one step per pixel of the longest path
inside the component.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from lostreg.methods.geometry import seed_components
from lostreg.methods.registry import MethodOutput, MethodSpec, Param, register_method

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
    # built on the host, copied to an accelerator without blocking: a plain
    # ``as_tensor(..., device=cuda)`` waits for every kernel queued before it (a host sync per
    # batch); a copy to the host stays blocking (it must be complete when read)
    sizes = torch.as_tensor(image_size, dtype=torch.long)
    if sizes.device != device:
        sizes = sizes.to(device, non_blocking=device.type != "cpu")
    if sizes.ndim == 1:
        sizes = sizes.expand(batch, 2)
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_size must be (H, W) or one (H, W) per image, got {tuple(sizes.shape)}")
    return sizes


CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 1 << 30}

# Fewest rows in one similarity block and in the potential rows' product: shorter products
# may take another BLAS kernel that rounds differently (see the module docstring).
MIN_BLOCK_ROWS = 64


def _chunk_size(batch: int, num_patches: int, device: torch.device) -> int:
    """Images whose ``(N, N)`` similarities are built at once (see ``CHUNK_BYTES``)."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, min(batch, budget // max(1, num_patches * num_patches * 4)))


def _row_block(num_patches: int, device: torch.device) -> int:
    """Rows of one image's similarity built at once: ``N`` when its ``(N, N)`` fits the
    budget (the unblocked path), else about the budget's worth but at least
    ``MIN_BLOCK_ROWS``, evened out over the blocks so that no short tail block is left."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    fit = budget // max(1, num_patches * 4)
    if fit >= num_patches:
        return num_patches
    rows = min(num_patches, max(MIN_BLOCK_ROWS, fit))
    blocks = -(-num_patches // rows)
    return -(-num_patches // blocks)


def _float32(value: float) -> float:
    """``value`` as float32 rounds it (an exact Python float): what ``add_`` on a float32
    tensor adds."""
    return float(torch.tensor(value, dtype=torch.float32))


def _seed_expansion(feats: torch.Tensor, gram_bias: float, k_patches: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degrees, seeds and ``M`` (the sum of the similar potentials' rows) for ``(b, N, d)``."""
    return _seed_expansion_many(feats, [(gram_bias, k_patches)])[0]


def _seed_expansion_many(feats: torch.Tensor, settings: Sequence[tuple[float, int]]
                         ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``_seed_expansion`` for several ``(gram_bias, k_patches)`` settings of the same features
    from one ``F F^T``: settings differ only in where ``A = F F^T + bias`` is cut at 0.

    Exactly the single-setting result: with ``b`` the bias rounded to float32 (as ``add_``
    rounds it), ``fl(a + b) > 0`` holds exactly when ``a > -b`` (rounding to nearest never
    changes a sign, and a sum is 0 only when it is exactly 0), so degrees are counted on the
    shared Gram against ``-b``; the potential rows are the shared rows plus ``b`` in float32,
    the same values the biased matrix holds. Settings with the same bias share the degrees
    and their sort.
    """
    batch, num_patches, _ = feats.shape
    similarity = torch.bmm(feats, feats.transpose(1, 2))
    diagonal = torch.diagonal(similarity, dim1=-2, dim2=-1)
    orders: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for gram_bias, k_patches in settings:
        bias = _float32(gram_bias)
        if bias not in orders:
            degrees = (similarity > -bias).sum(dim=-1, dtype=torch.int32)
            degrees -= (diagonal > -bias).to(torch.int32)
            orders[bias] = degrees, torch.sort(degrees, dim=1, stable=True).indices
        degrees, order = orders[bias]
        seed = order[:, 0]
        potentials = order[:, : min(k_patches, num_patches)]
        rows = torch.gather(similarity, 1, potentials.unsqueeze(-1).expand(-1, -1, num_patches))
        if gram_bias != 0.0:
            rows = rows + bias
        is_similar = torch.gather(rows[:, 0], 1, potentials) > 0  # rows[:, 0]: the seed's row
        summed = torch.bmm(is_similar.unsqueeze(1).double(), rows.double()).squeeze(1)  # (b, N)
        out.append((degrees, seed, summed))
    return out


def _blocked_degrees(feats: torch.Tensor, gram_bias: float, block_rows: int) -> torch.Tensor:
    """LOST's degrees ``(1, N)`` int32 of one image ``(1, N, d)``, its similarity built
    ``block_rows`` rows at a time into one reused block (no ``(N, N)`` allocation)."""
    _, num_patches, _ = feats.shape
    feats_t = feats.transpose(1, 2)
    degrees = torch.empty(1, num_patches, dtype=torch.int32, device=feats.device)
    block = torch.empty(1, block_rows, num_patches, dtype=feats.dtype, device=feats.device)
    positive = torch.empty(block.shape, dtype=torch.bool, device=feats.device)
    for start in range(0, num_patches, block_rows):
        stop = min(num_patches, start + block_rows)
        rows, rows_positive = block[:, : stop - start], positive[:, : stop - start]
        torch.bmm(feats[:, start:stop], feats_t, out=rows)
        if gram_bias != 0.0:
            rows.add_(gram_bias)
        torch.gt(rows, 0, out=rows_positive)
        count = rows_positive.sum(dim=-1, dtype=torch.int32)
        # the block's own diagonal entries: (i, start + i)
        count -= torch.diagonal(rows_positive, offset=start, dim1=-2, dim2=-1).to(torch.int32)
        degrees[:, start:stop] = count
    return degrees


def _seed_expansion_blocked(feats: torch.Tensor, gram_bias: float, k_patches: int,
                            block_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_seed_expansion`` of one image ``(1, N, d)`` in ``O(block_rows * N + k * N)`` memory:
    degrees from row blocks, then only the ``k`` potential rows of the similarity."""
    _, num_patches, dim = feats.shape
    degrees = _blocked_degrees(feats, gram_bias, block_rows)
    order = torch.sort(degrees, dim=1, stable=True).indices
    seed = order[:, 0]
    potentials = order[:, : min(k_patches, num_patches)]
    count = potentials.shape[1]
    padded = potentials  # at least MIN_BLOCK_ROWS rows, so the product takes the blocks' kernel
    if count < MIN_BLOCK_ROWS:
        padded = torch.cat([potentials, potentials[:, :1].expand(1, MIN_BLOCK_ROWS - count)], 1)
    chosen = torch.gather(feats, 1, padded.unsqueeze(-1).expand(-1, -1, dim))
    rows = torch.bmm(chosen, feats.transpose(1, 2))
    if gram_bias != 0.0:
        rows.add_(gram_bias)
    rows = rows[:, :count]  # rows[:, 0] is the seed's row: potentials start with the seed
    is_similar = torch.gather(rows[:, 0], 1, potentials) > 0  # (1, k)
    summed = torch.bmm(is_similar.unsqueeze(1).double(), rows.double()).squeeze(1)  # (1, N)
    return degrees, seed, summed


def _seed_expansions(feats: torch.Tensor, gram_bias: float, k_patches: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degrees ``(B, N)`` long, seeds ``(B,)`` and ``M`` ``(B, N)`` float64 of a batch for one
    setting (see ``_seed_expansions_many``)."""
    return _seed_expansions_many(feats, [(gram_bias, k_patches)])[0]


def _seed_expansions_many(feats: torch.Tensor, settings: Sequence[tuple[float, int]]
                          ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per ``(gram_bias, k_patches)`` setting: degrees ``(B, N)`` long, seeds ``(B,)`` and ``M``
    ``(B, N)`` float64 of a batch, under the byte budget: chunks of images whose similarities
    fit (one Gram per chunk for every setting), else row blocks image by image."""
    batch, num_patches, _ = feats.shape
    block_rows = _row_block(num_patches, feats.device)
    if block_rows < num_patches:
        parts = [[_seed_expansion_blocked(feats[i:i + 1], bias, k, block_rows)
                  for bias, k in settings] for i in range(batch)]
    else:
        chunk = _chunk_size(batch, num_patches, feats.device)
        parts = [_seed_expansion_many(feats[i:i + chunk], settings)
                 for i in range(0, batch, chunk)]
    return [(torch.cat([p[s][0] for p in parts]).long(), torch.cat([p[s][1] for p in parts]),
             torch.cat([p[s][2] for p in parts])) for s in range(len(settings))]


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
    (out, component), = lost_many(feats, grid, patch_size, image_size,
                                  [(gram_bias, k_patches)])
    if unbatched:
        return (LostOutput([int(v) for v in out.box[0].tolist()], int(out.seed[0]),
                           out.degrees[0]), component[0])
    return out, component


def lost_many(
    feats: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    image_size: ImageSize | Sequence[ImageSize] | torch.Tensor,
    settings: Sequence[tuple[float, int]],
) -> list[tuple[LostOutput, torch.Tensor]]:
    """``lost_with_mask`` of a batch ``(B, N, d)`` for several ``(gram_bias, k_patches)``
    settings at once: one ``F F^T`` per chunk of images serves every setting (see
    ``_seed_expansion_many``), and one labelling call covers every setting's masks. Each
    result equals the single-setting call's."""
    return [(out, component) for out, component, _ in
            _lost_many_expanded(feats, grid, patch_size, image_size, settings)]


def _lost_many_expanded(
    feats: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    image_size: ImageSize | Sequence[ImageSize] | torch.Tensor,
    settings: Sequence[tuple[float, int]],
) -> list[tuple[LostOutput, torch.Tensor, torch.Tensor]]:
    """``lost_many`` plus each setting's seed expansion ``(B, rows, cols)`` bool."""
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.float()
    batch, num_patches, _ = feats.shape
    rows, cols = grid
    if rows * cols != num_patches:
        raise ValueError(f"grid {grid} has {rows * cols} patches but feats have {num_patches}")
    sizes = _image_sizes(image_size, batch, feats.device)
    expansions = _seed_expansions_many(feats, settings)
    masks = torch.cat([(summed > 0).view(batch, rows, cols) for _, _, summed in expansions])
    seeds = torch.cat([seed for _, seed, _ in expansions])
    boxes, components = seed_components(masks, seeds, patch_size, sizes.repeat(len(settings), 1))
    return [(LostOutput(boxes[i * batch:(i + 1) * batch], seed, degrees),
             components[i * batch:(i + 1) * batch], masks[i * batch:(i + 1) * batch])
            for i, (degrees, seed, _) in enumerate(expansions)]


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
    import scipy.ndimage  # where used: a GPU run never loads scipy

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
    return _run_many(feats, grid, patch_size, sizes, [params])[0]


def _maps(out: LostOutput, expansion: torch.Tensor, grid: tuple[int, int]
          ) -> dict[str, torch.Tensor]:
    """LOST's per-patch maps: each patch's degree (its count of positively correlated
    patches; the seed has the lowest) and the seed expansion (the patches whose summed
    correlation with the seed's k most similar low-degree patches is positive)."""
    return {"degree": out.degrees.view(-1, *grid), "expansion": expansion}


def _run_many(feats: torch.Tensor, grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
              params: Sequence[dict]) -> list[MethodOutput]:
    """Several parameter sets on the same features: one Gram matrix for all of them."""
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.float()
    outputs = _lost_many_expanded(feats, grid, patch_size, sizes,
                                  [(p["gram_bias"], p["k_patches"]) for p in params])
    return [MethodOutput(out.box, out.seed, mask, _maps(out, expansion, grid))
            for out, mask, expansion in outputs]


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
              "(e.g. -0.1,0)", on_config=True),
    ),
    legacy_identity=True,
    run_many=_run_many,
    title="LOST",
    description="Siméoni et al., BMVC 2021: the lowest-degree patch seeds a box",
    check=_check,
))

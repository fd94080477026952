"""TokenCut (Wang et al., CVPR 2022): a normalized cut of the patch graph, exact and batched.

Semantics, identical to the reference implementation (``object_discovery.py:ncut`` of
``YangtaoWANG95/TokenCut``):

* patch features (class and register tokens already dropped) are L2-normalised, ``A = F F^T``
  in float32, the diagonal included (a patch's similarity to itself, 1, is an edge like any);
* binary graph (default): ``W = 1 where A > tau, eps elsewhere`` (float64); with
  ``--no-binary-graph``: ``W = A where A >= tau, eps where A < tau`` (the reference's
  ``A[A < tau] = eps``, so a similarity equal to ``tau`` keeps its value). Both comparisons
  are made in float32, as the reference's numpy does;
* ``D = diag(row sums of W)``; ``v`` = the eigenvector of the second-smallest eigenvalue of
  ``(D - W) v = lambda D v``, normalised ``v^T D v = 1``;
* bipartition ``v > mean(v)``, seed ``argmax |v|``; if the seed is outside the bipartition the
  bipartition is reversed (``v <= mean(v)``);
* the box is the seed's 4-connected component, ``[col_min*p, row_min*p, (col_max+1)*p,
  (row_max+1)*p]`` clipped to the unpadded image, as LOST's.

The sign of an eigenvector is arbitrary (LAPACK returns either). The reference's seed/flip
rule makes the answer sign-free except for patches *exactly* at the mean: the reversed
bipartition ``v <= mean`` takes them, the plain one ``v > mean`` does not, so which side they
fall on depends on the sign LAPACK happened to return. ``tokencut`` takes the sign-free
reading: the partition is the patches strictly on the seed's side of the mean (the seed itself
is never at the mean: ``|v_seed|`` is the largest entry, and ``v`` is not constant). Near-
degenerate eigenvalues (``lambda_2 ~ lambda_3``) leave the eigenvector itself undefined; any
solver's answer is then as good as another's, and tests skip such images.

Ties for the seed: patches with identical rows of ``W`` (in a binary graph, e.g. patches similar
to nothing but themselves) have equal ``v`` in exact arithmetic, and the published code's
``np.argmax`` picks among them by rounding noise. ``tokencut`` treats entries within
``SEED_TIE`` (1e-9, relative) of the largest ``|v|`` as tied and takes the lowest patch index, so
its answer does not depend on the solver or device. The box differs from the reference's only
when the tied patches lie in different components.

Fewer than 3 patches (an image no larger than two patches): the reference raises
(``subset_by_index=[1, 2]`` needs three eigenvalues). Here the box is the whole image: every
patch is the object, the seed is patch 0.

``tokencut`` runs a batch of same-grid images. Its eigen-solve works on the symmetric
normalised matrix ``M = D^-1/2 W D^-1/2`` (``D^-1/2 (D - W) D^-1/2 = I - M`` has the same
eigenvalues as the generalised problem, and ``v = D^-1/2 u``), in float64:

* ``subset`` (the CPU default): LAPACK's ``dsyevr`` for that one eigenpair
  (``scipy.linalg.eigh(M, subset_by_index=[N-2, N-2])``) per image: on a CPU LAPACK works
  matrix by matrix anyway, and computing one eigenvector is ~2x cheaper than the reference's
  generalised solve and ~4x cheaper than ``torch.linalg.eigh``'s full decomposition on the
  CPU measured in ``benchmarks/README.md``;
* ``dense``: ``torch.linalg.eigh`` of the whole batch, on its device;
* ``squaring`` (the GPU default): the top eigenvector ``u_1 = D^1/2 1 / |.|`` of ``M`` is known
  exactly (eigenvalue 1), so ``T = M + I - 2 u_1 u_1^T`` has ``u_2`` as its dominant
  eigenvector (all its eigenvalues are in ``[0, 2]``). Squaring ``T`` repeatedly (with its trace
  renormalised to 1) is a power method of order ``2^k`` made only of batched matrix products,
  which a GPU runs at full speed; it stops per image once ``T`` is rank one to working precision
  (``1 - |T|_F^2 <= 1e-12``), takes the dominant column, and certifies the result by its
  residual ``|M u - rho u|``. Images that fail the certificate or stay unconverged after
  ``MAX_SQUARINGS`` (eigenvalues of ``T`` within a ratio of about 1 - 4e-5: near-degenerate)
  are solved by ``dense``.
  No step synchronises with the host per image: only one convergence check per squaring and
  one for the certificate, for the whole batch.

``tokencut_reference`` is the per-image path written like the published code (numpy +
``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])`` + ``scipy.ndimage.label``). Note the
published code's ``--no-binary-graph`` keeps ``A`` in float32, so scipy solves it in single
precision there; the reference path does the same, the batched path solves in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lostreg.methods.geometry import grid_boxes_to_pixels, seed_components
from lostreg.methods.registry import MethodOutput, MethodSpec, Param, register_method

SOLVERS = ("subset", "dense", "squaring")

# Squarings before an image falls back to the dense solver: T^(2^20) separates eigenvalues
# whose ratio is below 1 - 4e-5 to double precision.
MAX_SQUARINGS = 20
FIRST_CHECK = 4  # squarings before the first convergence check (none converges sooner)
RANK_ONE_TOL = 1e-12  # 1 - |T|_F^2 (trace 1): the weight of everything but u_2, twice over
RESIDUAL_TOL = 1e-11  # |M u - rho u| of the unit vector found, |M| <= 1

# Entries of |v| within this relative distance of the largest are a tie, which goes to the
# lowest patch index. Patches with identical graph rows (e.g. several patches similar to
# nothing but themselves) have equal v in exact arithmetic; a solver separates them only by
# rounding (~1e-14), which is how the published code picks among them. The tie rule makes the
# batched answer the same whatever the solver or device.
SEED_TIE = 1e-9

# Bytes of float64 graph matrices handled at once (each image holds ~5 N x N copies: the
# similarity, W, M and the two squaring buffers). A GPU runs ~50 VOC images (N ~ 1000) per
# chunk; a CPU solves one or two at a time (LAPACK works per matrix anyway).
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30}


class Eigenpair(NamedTuple):
    """The reference's two eigenvalues ``(lambda_2, lambda_3)`` and ``v`` (``v^T D v = 1``)."""

    eigenvalues: np.ndarray
    vector: np.ndarray


# --- the per-image reference -------------------------------------------------------------------


def reference_eigenpair(feats: torch.Tensor, tau: float, eps: float,
                        binary_graph: bool) -> Eigenpair:
    """The graph and generalised eigen-solve of one image ``(N, D)``, as the reference spells
    them (N >= 3)."""
    import scipy.linalg  # where used: a GPU run never loads scipy
    feats = F.normalize(feats.float(), p=2)
    similarity = (feats @ feats.transpose(1, 0)).cpu().numpy()
    if not binary_graph:
        similarity[similarity < tau] = eps  # float32 stays float32: scipy solves in single
        weights = similarity
    else:
        above = similarity > tau
        weights = np.where(above.astype(float) == 0, eps, above)  # 1.0 or eps, float64
    degrees = np.sum(weights, axis=1)
    degree_matrix = np.diag(degrees)
    eigenvalues, eigenvectors = scipy.linalg.eigh(degree_matrix - weights, degree_matrix,
                                                  subset_by_index=[1, 2])
    return Eigenpair(eigenvalues, eigenvectors[:, 0])


def reference_robustness(feats: torch.Tensor, boxed: torch.Tensor, tau: float = 0.2,
                         eps: float = 1e-5, binary_graph: bool = True) -> tuple[bool, bool]:
    """Whether the reference's box and its seed for ``(N, D)`` features (N >= 3) are defined
    to well beyond any solver's accuracy, so that another exact solver must reproduce them.

    Box: a clear gap (``lambda_3 - lambda_2 > 1e-3 lambda_3``), no entry of ``v`` within a
    margin of its mean, and every patch whose ``|v|`` is within the margin of the largest
    inside the reference's boxed component ``boxed`` (patches with identical graph rows have
    equal ``v`` up to rounding, so which of them is the seed is rounding noise, in the
    published code too). Seed: also a unique largest ``|v|``. The margin is ``1e-6`` relative,
    ``1e-3`` for ``--no-binary-graph`` (solved in float32 by the reference).
    """
    pair = reference_eigenpair(feats, tau, eps, binary_graph)
    (second, third), vector = pair.eigenvalues, pair.vector.astype(np.float64)
    margin = 1e-6 if binary_graph else 1e-3
    centred = np.abs(vector - vector.mean())
    magnitude = np.abs(vector)
    near_top = magnitude >= magnitude.max() * (1 - margin)
    box_ok = bool(third - second > 1e-3 * abs(third) and centred.min() > margin * centred.max()
                  and np.asarray(boxed).reshape(-1)[near_top].all())
    return box_ok, box_ok and int(near_top.sum()) == 1


def tokencut_reference(feats: torch.Tensor, grid: tuple[int, int], patch_size: int,
                       image_size: tuple[int, int], tau: float = 0.2, eps: float = 1e-5,
                       binary_graph: bool = True) -> MethodOutput:
    """Plain per-image TokenCut on ``(N, D)`` features, step by step like the published code.

    Kept as the yardstick for ``tokencut``: tests and ``benchmarks/`` compare the two.
    """
    import scipy.ndimage  # where used: a GPU run never loads scipy
    rows, cols = grid
    if feats.shape[0] != rows * cols:
        raise ValueError(f"grid {grid} has {rows * cols} patches but feats have {feats.shape[0]}")
    if rows * cols < 3:
        return _whole_image(grid, patch_size, torch.tensor([image_size]), unbatched=True)
    second_smallest = reference_eigenpair(feats, tau, eps, binary_graph).vector
    average = np.sum(second_smallest) / len(second_smallest)
    bipartition = second_smallest > average
    seed = int(np.argmax(np.abs(second_smallest)))
    if bipartition[seed] != 1:
        bipartition = np.logical_not(bipartition)
    labels, _ = scipy.ndimage.label(bipartition.reshape(rows, cols))
    component = labels == labels[np.unravel_index(seed, (rows, cols))]
    where = np.nonzero(component)
    height, width = image_size
    box = [int(where[1].min()) * patch_size, int(where[0].min()) * patch_size,
           min((int(where[1].max()) + 1) * patch_size, width),
           min((int(where[0].max()) + 1) * patch_size, height)]
    return MethodOutput(torch.tensor(box), torch.tensor(seed), torch.from_numpy(component))


def _whole_image(grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
                 unbatched: bool = False) -> MethodOutput:
    """The convention for fewer than 3 patches: every patch is the object, seed 0."""
    rows, cols = grid
    batch = sizes.shape[0]
    grid_box = torch.tensor([[0, 0, rows - 1, cols - 1]], device=sizes.device).expand(batch, 4)
    boxes = grid_boxes_to_pixels(grid_box, patch_size, sizes)
    seed = torch.zeros(batch, dtype=torch.long, device=sizes.device)
    mask = torch.ones(batch, rows, cols, dtype=torch.bool, device=sizes.device)
    if unbatched:
        return MethodOutput(boxes[0], seed[0], mask[0])
    return MethodOutput(boxes, seed, mask)


# --- the batched path --------------------------------------------------------------------------


def tokencut_weights(feats: torch.Tensor, tau: float, eps: float,
                     binary_graph: bool) -> torch.Tensor:
    """TokenCut's graph ``W`` (b, N, N) float64 for features ``(b, N, D)`` (see the module
    docstring). A non-finite similarity counts as below ``tau`` (the reference would fail)."""
    unit = F.normalize(feats.float(), p=2, dim=-1)
    similarity = torch.bmm(unit, unit.transpose(1, 2))
    threshold = torch.tensor(tau, dtype=torch.float32, device=feats.device)  # float32, as numpy
    if binary_graph:
        one = torch.ones((), dtype=torch.float64, device=feats.device)
        return torch.where(similarity > threshold, one, torch.full_like(one, eps))
    small = torch.tensor(eps, dtype=torch.float32, device=feats.device)
    return torch.where(similarity >= threshold, similarity, small).double()


def _dense_second(normalized: torch.Tensor) -> torch.Tensor:
    """Unit eigenvectors (b, N) of the second-largest eigenvalue of symmetric ``M``."""
    return torch.linalg.eigh(normalized).eigenvectors[..., -2]


def _subset_second(normalized: torch.Tensor) -> torch.Tensor:
    """``_dense_second`` by LAPACK's ``dsyevr`` for that eigenpair alone, matrix by matrix."""
    import scipy.linalg  # where used: a GPU run never loads scipy
    n = normalized.shape[-1]
    vectors = [scipy.linalg.eigh(matrix, subset_by_index=[n - 2, n - 2], driver="evr",
                                 check_finite=False)[1][:, 0]
               for matrix in normalized.cpu().numpy()]
    return torch.from_numpy(np.stack(vectors)).to(normalized.device)


def _trace(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.diagonal(dim1=1, dim2=2).sum(-1)


def _dominant_column(filtered: torch.Tensor) -> torch.Tensor:
    """The dominant eigenvector of near-rank-one PSD ``T`` (b, N, N): its largest column,
    multiplied by ``T`` once more (squaring what is left of the rest), normalised."""
    column = filtered.diagonal(dim1=1, dim2=2).argmax(dim=1)
    index = torch.arange(filtered.shape[0], device=filtered.device)
    vector = filtered[index, :, column]
    vector = torch.bmm(filtered, vector.unsqueeze(-1)).squeeze(-1)
    return vector / vector.norm(dim=1, keepdim=True)


def _squaring_second(normalized: torch.Tensor, degrees: torch.Tensor,
                     stats: dict | None = None) -> torch.Tensor:
    """``_dense_second`` by repeated squaring of ``M + I - 2 u_1 u_1^T`` (module docstring);
    images that do not converge or fail the residual certificate go to ``_dense_second``.
    ``stats`` (optional) gets the squarings each image took and the number of fallbacks."""
    batch, n, _ = normalized.shape
    top = degrees.sqrt()
    top = top / top.norm(dim=1, keepdim=True)
    filtered = normalized - 2.0 * top.unsqueeze(2) * top.unsqueeze(1)
    filtered.diagonal(dim1=1, dim2=2).add_(1.0)
    filtered /= _trace(filtered).view(-1, 1, 1)
    vectors = torch.zeros(batch, n, dtype=normalized.dtype, device=normalized.device)
    pending = torch.arange(batch, device=normalized.device)
    for step in range(1, MAX_SQUARINGS + 1):
        filtered = torch.bmm(filtered, filtered)
        filtered /= _trace(filtered).view(-1, 1, 1)
        if step < FIRST_CHECK:
            continue
        done = 1.0 - filtered.square().sum(dim=(1, 2)) <= RANK_ONE_TOL
        if bool(done.any()):  # one host sync per squaring for the whole batch
            vectors[pending[done]] = _dominant_column(filtered[done])
            if stats is not None:
                stats.setdefault("squarings", []).extend([step] * int(done.sum()))
            pending, filtered = pending[~done], filtered[~done]
            if pending.numel() == 0:
                break
    product = torch.bmm(normalized, vectors.unsqueeze(-1)).squeeze(-1)
    rayleigh = (vectors * product).sum(dim=1, keepdim=True)
    residual = (product - rayleigh * vectors).norm(dim=1)
    failed = ~(residual <= RESIDUAL_TOL)
    failed[pending] = True  # unconverged: still zero vectors, whose residual says nothing
    if stats is not None:
        stats.setdefault("squarings", []).extend([MAX_SQUARINGS] * pending.numel())
        stats["fallbacks"] = stats.get("fallbacks", 0) + int(failed.sum())
    if bool(failed.any()):
        vectors[failed] = _dense_second(normalized[failed])
    return vectors


def fiedler_vectors(weights: torch.Tensor, solver: str = "subset",
                    stats: dict | None = None) -> torch.Tensor:
    """``v`` (b, N) float64 of ``(D - W) v = lambda_2 D v`` with ``v^T D v = 1``, sign
    arbitrary, for graphs ``W`` (b, N, N) float64 with positive row sums. ``stats``: see
    ``_squaring_second``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    degrees = weights.sum(dim=-1)
    inv_sqrt = degrees.rsqrt()
    normalized = inv_sqrt.unsqueeze(2) * weights * inv_sqrt.unsqueeze(1)
    if solver == "subset":
        unit = _subset_second(normalized)
    elif solver == "dense":
        unit = _dense_second(normalized)
    else:
        unit = _squaring_second(normalized, degrees, stats)
    return inv_sqrt * unit


def bipartition(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeds ``argmax |v|`` (b,; ties within ``SEED_TIE``: the lowest index) and the patches
    strictly on the seed's side of ``mean(v)`` (b, N): the reference's flip rule, independent
    of the eigenvector's sign (module docstring)."""
    magnitude = vectors.abs()
    near_top = magnitude >= magnitude.amax(dim=1, keepdim=True) * (1 - SEED_TIE)
    seed = near_top.to(torch.uint8).argmax(dim=1)  # the first of the tied largest
    centred = vectors - vectors.mean(dim=1, keepdim=True)
    seed_side = centred.gather(1, seed.unsqueeze(1))
    # a seed at the mean means a constant v (never an eigenvector): then every patch, as the
    # reference's reversed v <= mean gives
    same_side = torch.where(seed_side > 0, centred > 0, centred < 0)
    return seed, same_side | (seed_side == 0)


def default_solver(device: torch.device) -> str:
    """``subset`` on a CPU (one LAPACK eigenpair beats N^3 products there), ``squaring`` on a
    GPU (batched float64 products, no LAPACK)."""
    return "subset" if device.type == "cpu" else "squaring"


def _chunk_size(batch: int, num_patches: int, device: torch.device) -> int:
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, min(batch, budget // max(1, 5 * 8 * num_patches * num_patches)))


def tokencut(feats: torch.Tensor, grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
             tau: float = 0.2, eps: float = 1e-5, binary_graph: bool = True,
             solver: str | None = None) -> MethodOutput:
    """TokenCut on a batch ``(B, N, D)`` of one ``grid``; ``sizes`` (B, 2) the unpadded
    ``(H, W)``. ``solver``: one of ``SOLVERS`` (default: ``default_solver``)."""
    batch, num_patches, _ = feats.shape
    rows, cols = grid
    if rows * cols != num_patches:
        raise ValueError(f"grid {grid} has {rows * cols} patches but feats have {num_patches}")
    sizes = sizes.to(feats.device)
    if num_patches < 3:
        return _whole_image(grid, patch_size, sizes)
    solver = solver or default_solver(feats.device)
    chunk = _chunk_size(batch, num_patches, feats.device)
    vectors = torch.cat([
        fiedler_vectors(tokencut_weights(feats[i:i + chunk], tau, eps, binary_graph), solver)
        for i in range(0, batch, chunk)])
    seed, partition = bipartition(vectors)
    boxes, component = seed_components(partition.view(batch, rows, cols), seed, patch_size,
                                       sizes)
    maps = {"eigenvector": vectors.view(batch, rows, cols),
            "bipartition": partition.view(batch, rows, cols)}
    return MethodOutput(boxes, seed, component, maps)


# --- registry entry ------------------------------------------------------------------------


def _run(feats: torch.Tensor, grid: tuple[int, int], patch_size: int, sizes: torch.Tensor,
         params: dict) -> MethodOutput:
    return tokencut(feats, grid, patch_size, sizes, params["tau"], params["eps"],
                    params["binary_graph"])


def _reference(feats: torch.Tensor, grid: tuple[int, int], patch_size: int,
               size: tuple[int, int], params: dict) -> MethodOutput:
    return tokencut_reference(feats, grid, patch_size, size, params["tau"], params["eps"],
                              params["binary_graph"])


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``), as a sweep list or config holds them."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(text)


def _check(params: dict) -> str | None:
    tau, eps, binary = params["tau"], params["eps"], params["binary_graph"]
    if not isinstance(tau, (int, float)) or not math.isfinite(tau):
        return f"--tau {tau}: must be a finite number"
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        return f"--eps {eps}: must be a positive number (the weight of the other edges)"
    if not isinstance(binary, bool):
        return f"binary_graph {binary!r}: must be true or false"
    if not binary and tau <= 0:
        return (f"--tau {tau} with --no-binary-graph: must be positive, or similarities in "
                f"[tau, 0] become edge weights <= 0 and the degree matrix is not positive")
    return None


register_method(MethodSpec(
    "tokencut", _run, _reference,
    params=(
        Param("tau", float, 0.2, "TokenCut: edges with cosine similarity > tau weigh 1 (a "
              "comma list sweeps it)"),
        Param("eps", float, 1e-5, "TokenCut: the weight of every other edge"),
        Param("binary_graph", parse_bool, True, "TokenCut: keep the similarities >= tau as "
              "edge weights instead of 1 (the paper's ablation)", flag="--no-binary-graph",
              switch=False),
    ),
    default_feature="k",
    title="TokenCut",
    description="Wang et al., CVPR 2022: the normalized cut of the patch graph",
    check=_check,
))

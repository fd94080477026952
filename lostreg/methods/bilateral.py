"""The fast bilateral solver refinement of TokenCut's saliency pipeline, exact and vectorised.

Reference: ``YangtaoWANG95/TokenCut`` @ ``ce70ed6176b1876212f0a3d1144d28507c81427d``,
``unsupervised_saliency_detection/bilateral_solver.py`` (itself Poole & Barron's numpy demo of
the fast bilateral solver), called by ``get_saliency.py`` with ``sigma_spatial=16,
sigma_luma=16, sigma_chroma=8`` (its argparse defaults and the README's command lines).
FOUND's ``bilateral_solver.py`` (``valeoai/FOUND`` @ ``f9f2ef7``) is the same code plus a
``get_all_cc`` option.

What the reference does, and what ``bilateral_refine`` reproduces:

* **Inputs.** ``reference = np.array(Image.open(path).convert('RGB'))`` (uint8 HxWx3, the
  original image, not the resized one) and ``target`` = the upsampled TokenCut mask (float64,
  0/1, HxW). The confidence is built inside as ``np.ones((h, w)) * 0.999``: a constant, so
  ``confidence`` here is the scalar 0.999. Both are reshaped to ``(H*W, 1)`` float64.
* **Grid.** YUV by ``np.tensordot(im, RGB_TO_YUV, ([2], [1])) + [0, 128, 128]`` (float64);
  cell coordinates ``(x/σs, y/σs, Y/σl, U/σc, V/σc).astype(int)`` (truncation); each cell
  hashed as ``x + 255 y + 255² Y + 255³ U + 255⁴ V`` (float64 in the reference, exact; int64
  here, the same integers); vertices = sorted unique hashes; splat ``S`` (vertices x pixels)
  sums pixels into their vertex, slice ``S^T`` reads a vertex back.
* **Blur.** ``blur(x) = 2·dim·x + Σ_d (x[v - e_d] + x[v + e_d])`` over the neighbours present
  (dim = 5, a ``1 2 1`` kernel per dimension, the centre counted once per dimension).
  Neighbours are looked up by hash (``hash ± 255^d``), so the reference's wrap-around (a cell
  at ``x = 0`` "sees" ``x = 254`` of the previous row) is reproduced too; it needs a
  coordinate of 254, i.e. images over 4064 px at σs = 16.
* **Bistochastization.** ``m = S·1``, ``n = 1``, ten times ``n = sqrt(n·m / blur(n))``, then
  ``m = n·blur(n)``.
* **System.** ``A = λ (diag(m) - diag(n) B diag(n)) + diag(S w)`` with λ = 256 and ``B`` the
  blur, ``b = S (t·w)``, start ``y0 = S(t·w) / S(w)`` (the per-vertex mean of the target).
* **Solve.** ``scipy.sparse.linalg.cg(A, b, x0=y0, M=diag(1/max(diag(A), 1e-5)),
  maxiter=25, tol=1e-5)``: Jacobi-preconditioned CG. TokenCut's requirements say
  ``scipy>=1.5.0`` on Python 3.7, i.e. SciPy 1.5-1.7, whose ``cg`` called without ``atol``
  used the *legacy* rule: return ``x0`` at once if ``|b - A x0| <= tol`` (an **absolute**
  1e-5), else iterate until ``|r| <= tol·|b|`` (relative) or 25 iterations. SciPy 1.12
  renamed ``tol`` to ``rtol`` (removed in 1.14) and its rewritten ``cg`` has no absolute exit
  and tests ``|r| < rtol·|b|`` before each iteration instead of ``<=`` after it. The updates
  (``z = M r``, ``ρ = r·z``, ``p = z + β p``, ``q = A p``, ``α = ρ / p·q``, ``x += α p``,
  ``r -= α q``) are the same in both, so only the exit rule differs: ``legacy_cg`` below
  implements the 1.5-1.7 rule, the one the published numbers came from.
* **Output.** ``soft = S^T y`` (HxW float64; not clipped: values slightly outside [0, 1]
  happen). ``binary = binary_fill_holes(soft > 0.5)``, then the component
  ``labeled == argsort(sizes)[-2]`` where ``sizes`` counts **every** label including the
  background 0 (``nb_pixel = [np.sum(labeled == i) for i in range(n + 1)]``); with no
  component at all (``argsort`` of one entry, ``[-2]`` raises) the whole image (all True).
  That is "the largest object" only while the background is the largest region: an object
  bigger than the background makes ``[-2]`` the background (label 0, the complement of all
  objects) or the second object, and a result filling the whole image gives an empty mask.
  ``component_rule="largest"`` is the corrected reading (largest foreground component; empty
  stays empty); ``"reference"`` is the default.

TokenCut's saliency figures "+ BS" score the **soft** output (``mask_bfs.append(
output_solver)`` in ``get_saliency.py``); the binary mask is only drawn (and negated for the
drawing when its IoU with the TokenCut mask is < 0.5). ``--refine bilateral`` scores that soft
output; ``--refine bilateral-binary`` scores the post-processed mask instead, the corrected
variant (``lostreg.runs.mask_lines.refined``).

Speed (``benchmarks/bench_bilateral.py``): the same arithmetic without the reference's
per-call sparse-matrix algebra and Python loops. Vertex ids come from two presence tables
(colour cells, then colour rank x spatial cell, the spatial cells padded by one empty cell on
every side and one empty colour block at the end) ranked by cumulative sums instead of sorting
every pixel's hash; the rank table holds "absent" where no pixel fell, so all ten neighbours
are one look-up of ``±1`` steps (``grid_by_table``); when a coordinate leaves [0, 253] or a
table would be too large, ``grid_by_hash`` does the reference's hashing with one
``np.unique`` and one ``searchsorted`` for all ten directions.
The colour cells skip the reference's ``tensordot`` of a uint8 image with a float64 matrix
(NumPy's slow mixed-type loop): every coefficient has six decimals, so the YUV values in
millionths are exact integers, and the cell ``v = value / (1e6 sigma)`` (relative error below
1e-15) truncates like the reference's float wherever ``v`` is more than ``CELL_BAND / sigma``
from a nonzero integer. The reference's float is off the exact value by at most about
1.5e-13 / sigma (three products of at most 255 by coefficients whose absolute values sum to 1,
their sum, the coefficients' own rounding and the ``+ 128``, each within an ulp of 256) plus
its division's half ulp, so the band (4e-12 / sigma) holds it with a margin; pixels inside the
band (the colours whose exact value is an integer number of cells: 9243 of the 2^24 at
TokenCut's sigmas, and the reference truncates 279 of them to the lower cell) are computed with
the reference's own expression. ``benchmarks/check_yuv_cells.py`` checks all 2^24 colours.
Large temporaries are few and the colour arithmetic runs in blocks: on a virtual machine a
fresh page costs microseconds (~4 us here), and a 400x300 image's per-pixel arrays are
thousands of pages.
The blur (centre and neighbours) is one CSR matrix built once, ``A`` reuses its sparsity
pattern, splat is ``bincount``, slice a gather, the CG loop runs on plain arrays, holes are
filled by labelling the complement once and component sizes come from ``bincount``.
``prepare_solver`` (grid, bistochastization, ``A``: the image alone) and ``solve`` (the
target) are separate so that several targets on one image pay the first once.

Exactness: vertex ids, neighbours, splat (including the sequential sums of the constant
confidence) and slice are identical to the reference's; every entry of ``A`` is computed with
the reference's operations. Sums inside a CSR row (blur, ``A p``) run in another order than
the reference's dimension-by-dimension blur and SciPy's products, so the soft output agrees to
about 1e-14 on the benchmark's images, not bit for bit; tests require identical binary masks
and soft outputs within 1e-9.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import csr_matrix

from lostreg.errors import LostregError

RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]])
YUV_OFFSET = np.array([0, 128.0, 128.0]).reshape(1, 1, -1)
# the same conversion in millionths (integers: RGB_TO_YUV == YUV_MICRO / 1e6 bit for bit)
YUV_MICRO = np.array([[299000, 587000, 114000],
                      [-168736, -331264, 500000],
                      [500000, -418688, -81312]], dtype=np.float64)
YUV_OFFSET_MICRO = np.array([0, 128e6, 128e6])
# cell values closer than CELL_BAND / sigma to a nonzero integer take the reference's own
# arithmetic (its float error is below 2e-13 / sigma; see the module docstring)
CELL_BAND = 4e-12
COLOUR_BLOCK = 8192  # pixels per block of the colour-cell arithmetic
HASH_BASE = 255  # the reference's MAX_VAL: hash = sum(coord_d * 255**d)
DIM = 5  # x, y, luma, u, v
COMPONENT_RULES = ("reference", "largest")
LOOKUP_TABLE_FACTOR = 8  # vertex ids by table when the compact key range <= 8x the pixels


class BilateralParams(NamedTuple):
    """TokenCut's saliency settings (``get_saliency.py`` defaults, ``bs_params``)."""

    sigma_spatial: float = 16.0
    sigma_luma: float = 16.0
    sigma_chroma: float = 8.0
    lam: float = 256.0
    a_diag_min: float = 1e-5
    cg_tol: float = 1e-5
    cg_maxiter: int = 25
    confidence: float = 0.999
    bistochastize_iters: int = 10


TOKENCUT_PARAMS = BilateralParams()


class BilateralOutput(NamedTuple):
    """``soft``: the solver's output (HxW float64); ``binary``: fill holes + component rule
    (HxW bool); ``cg_iterations``: CG updates made (0: the start already met the tolerance)."""

    soft: np.ndarray
    binary: np.ndarray
    cg_iterations: int


class Grid(NamedTuple):
    """The bilateral grid: ``vertex`` of each pixel, ``counts`` = pixels per vertex (float64,
    ``S·1``), and the blur ``2·dim·I + Σ_d (shift_-d + shift_+d)`` as a CSR matrix whose rows
    list the present neighbours then the vertex itself (``rows`` holds each entry's row)."""

    vertex: np.ndarray
    counts: np.ndarray
    blur: csr_matrix
    rows: np.ndarray
    nvertices: int


def check_image(image: np.ndarray) -> None:
    """One clear line for an image the solver cannot take."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise LostregError(f"bilateral solver: the image must be uint8 HxWx3 RGB, got {got}")


def check_target(target: np.ndarray, shape: tuple[int, int]) -> None:
    """One clear line for a target the solver cannot take (``shape``: the image's HxW)."""
    if not isinstance(target, np.ndarray) or target.shape != tuple(shape):
        got = target.shape if isinstance(target, np.ndarray) else type(target)
        raise LostregError(f"bilateral solver: target {got} does not match the image "
                           f"{tuple(shape)}")
    if target.dtype != np.bool_ and not np.issubdtype(target.dtype, np.floating):
        raise LostregError(f"bilateral solver: target must be bool or float, got {target.dtype}")
    if not np.isfinite(target).all():
        raise LostregError("bilateral solver: target has NaN or infinite values")


def reference_colour_cells(pixels: np.ndarray, params: BilateralParams) -> np.ndarray:
    """The reference's own expression for the luma, u, v cells of ``pixels`` (``(N, 3)``
    uint8): ``np.tensordot`` with ``RGB_TO_YUV``, ``+ offset``, ``/ sigma``, truncation.
    Returns ``(3, N)`` int32 (the reference's ``.astype(int)`` truncates toward 0 the same
    way; values are below 2**31 for any sigma >= 1e-6). Each output row of the product is
    computed from its own pixel alone, so a subset of pixels gets the bits the whole image
    gets (checked for all 2^24 colours by ``benchmarks/check_yuv_cells.py``)."""
    yuv = np.tensordot(pixels, RGB_TO_YUV, ([1], [1]))
    yuv += YUV_OFFSET.reshape(1, 3)
    yuv /= np.array([params.sigma_luma, params.sigma_chroma, params.sigma_chroma])
    return yuv.T.astype(np.int32, order="C")


def exact_colour_cells(pixels: np.ndarray, params: BilateralParams) -> np.ndarray:
    """``reference_colour_cells`` without its slow mixed-type product (uint8 x float64 runs
    numpy's per-element dot loop, ~4 ms for 400x300 px). Every coefficient of ``RGB_TO_YUV``
    has six decimals, so ``YUV_MICRO @ rgb + offset`` is the exact YUV in millionths (integers
    below 2^28: exact in float64 in any summation order, FMA or not). Its cell value ``v``
    is within ``band`` of the reference's float value (error analysis in the module
    docstring), so wherever ``v`` is farther than ``band`` from every nonzero integer both
    truncate to the same cell. The pixels near one (e.g. a grey whose luma is exactly 16k:
    its float luma may fall an ulp short) take the reference's expression itself. Blocks of
    ``COLOUR_BLOCK`` pixels keep the temporaries in cache and out of fresh pages (a page
    fault costs microseconds on a virtual machine)."""
    sigmas = np.array([params.sigma_luma, params.sigma_chroma, params.sigma_chroma])
    if not (np.isfinite(sigmas).all() and (sigmas > 0).all()):
        return reference_colour_cells(pixels, params)
    cells = np.empty((3, len(pixels)), dtype=np.int32)
    divisor = (1e6 * sigmas)[:, None]
    band = (CELL_BAND / sigmas)[:, None]
    upper = 1 - band
    near_border = []
    for start in range(0, len(pixels), COLOUR_BLOCK):
        values = YUV_MICRO @ pixels[start:start + COLOUR_BLOCK].T.astype(np.float64)
        values += YUV_OFFSET_MICRO[:, None]
        values /= divisor
        block = cells[:, start:start + COLOUR_BLOCK]
        block[...] = values  # truncation toward 0, as ``.astype(int)``
        values -= block  # the fraction part
        near = (values >= upper) | ((values <= band) & (block > 0))
        found = np.flatnonzero(near.any(axis=0))
        if found.size:
            near_border.append(found + start)
    if near_border:
        ambiguous = np.concatenate(near_border)
        cells[:, ambiguous] = reference_colour_cells(pixels[ambiguous], params)
    return cells


def cell_channels(image: np.ndarray, params: BilateralParams
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell coordinates, truncated at cell borders exactly as the reference truncates them:
    ``x`` per column, ``y`` per row (int64) and the ``(3, H*W)`` luma, u, v cells (int32,
    one contiguous row per channel; ``exact_colour_cells``)."""
    height, width = image.shape[:2]
    xs = (np.arange(width) / params.sigma_spatial).astype(np.int64)
    ys = (np.arange(height) / params.sigma_spatial).astype(np.int64)
    return xs, ys, exact_colour_cells(image.reshape(-1, 3), params)


def grid_by_hash(xs: np.ndarray, ys: np.ndarray, colour: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The reference's construction, vectorised: 255-radix hashes of all pixels, sorted unique
    hashes (``np.unique``) and the ten neighbour look-ups ``hash ± 255^d`` in one
    ``searchsorted``. Works for any coordinates, wrap-around aliases included."""
    steps = HASH_BASE ** np.arange(DIM, dtype=np.int64)
    hashes = (ys[:, None] * steps[1] + xs[None, :]).reshape(-1)
    for c in range(3):
        hashes = hashes + colour[c].astype(np.int64) * steps[2 + c]
    unique, vertex = np.unique(hashes, return_inverse=True)
    nvertices = len(unique)
    offsets = (np.array([-1, 1])[None, :] * steps[:, None]).reshape(-1)  # -e0, +e0, -e1, ...
    queries = unique[:, None] + offsets[None, :]
    locs = np.minimum(np.searchsorted(unique, queries), nvertices - 1)
    neighbours = np.where(unique[locs] == queries, locs, nvertices)
    return vertex.reshape(-1), neighbours


def compact(keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank of each key among the distinct keys, by a presence table of ``size`` entries (no
    sort): ``(ids, occupied keys in increasing order, rank table)``. The rank table holds
    ``len(occupied)`` (one past the last id: "absent") where no key fell, so that a look-up
    needs no presence test; it is int32 (up to 8 entries per pixel), the ids intp (NumPy's
    fancy indexing takes those without a conversion)."""
    present = np.zeros(size, dtype=bool)
    present[keys] = True
    rank = np.cumsum(present, dtype=np.int32)
    occupied = np.flatnonzero(present)
    ids = rank.take(keys).astype(np.intp)
    ids -= 1
    rank -= 1
    rank[~present] = len(occupied)
    return ids, occupied, rank


def grid_by_table(xs: np.ndarray, ys: np.ndarray, colour: np.ndarray,
                  max_table: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The same grid without sorting. Sorting by the 255-radix hash is sorting by
    (v, u, luma, y, x); so is ranking the colour cells (v, u, luma) in a presence table, then
    ranking ``colour_rank · cells_xy + y · row + x`` in a second one, whose spatial cells are
    padded by one on every side (never occupied: a ``±1`` step from a real cell stays in the
    table and finds nothing). With every coordinate in [0, 253] the hash has no aliases (a
    ``-1`` or ``+1`` step never lands on another cell's hash), so the neighbours are plain
    ``±1`` steps found in the tables. ``None`` when that does not hold or a table would
    exceed ``max_table`` entries."""
    lows, highs = [int(c.min()) for c in colour], [int(c.max()) for c in colour]
    if min(lows) < 0 or max(highs + [int(xs[-1]), int(ys[-1])]) > HASH_BASE - 2:
        return None
    c_ext = [hi - lo + 1 for lo, hi in zip(lows, highs, strict=True)]
    if c_ext[0] * c_ext[1] * c_ext[2] > max_table:
        return None
    c_key = colour[2].astype(np.intp)
    c_key -= lows[2]
    for c in (1, 0):
        c_key *= c_ext[c]
        c_key += colour[c]
        c_key -= lows[c]
    c_id, c_occupied, c_rank = compact(c_key, c_ext[0] * c_ext[1] * c_ext[2])
    del c_key
    row, cells_xy = int(xs[-1]) + 3, (int(xs[-1]) + 3) * (int(ys[-1]) + 3)
    if (len(c_occupied) + 1) * cells_xy > max_table:
        return None
    key = c_id
    key *= cells_xy
    key += np.add.outer((ys + 1) * row, xs + 1).reshape(-1)
    vertex, occupied, rank = compact(key, (len(c_occupied) + 1) * cells_xy)
    targets = np.empty((2 * DIM, len(occupied)), dtype=np.intp)  # direction-major
    np.add(occupied[None], np.array([-1, 1, -row, row])[:, None], out=targets[:4])
    cell, xy = np.divmod(occupied, cells_xy)
    steps = colour_neighbours(c_occupied, c_rank, c_ext)  # (6, C + 1)
    np.take(steps, cell, axis=1, out=targets[4:])
    targets[4:] *= cells_xy
    targets[4:] += xy
    return vertex, rank.take(targets).T


def colour_neighbours(c_occupied: np.ndarray, c_rank: np.ndarray, c_ext: list[int]
                      ) -> np.ndarray:
    """``(6, C + 1)``: for each occurring colour cell, the rank of its ``luma - 1, luma + 1,
    u - 1, u + 1, v - 1, v + 1`` neighbour cell, or ``C`` (an empty colour block at the end
    of the vertex table) where that cell is outside the table or does not occur. A few
    hundred cells: computed once per colour, not per vertex."""
    absent = len(c_occupied)
    steps = np.full((2 * 3, absent + 1), absent, dtype=np.intp)
    stride = 1
    for c in range(3):
        digit = (c_occupied // stride) % c_ext[c]
        for side, (step, inside) in enumerate(((-stride, digit > 0),
                                               (stride, digit < c_ext[c] - 1))):
            has = np.flatnonzero(inside)
            steps[2 * c + side, has] = c_rank[c_occupied[has] + step]
        stride *= c_ext[c]
    return steps


def build_grid(image: np.ndarray, params: BilateralParams = TOKENCUT_PARAMS,
               table_factor: int = LOOKUP_TABLE_FACTOR) -> Grid:
    """Per-pixel vertex ids, pixel counts and the blur matrix; vertices found by table when it
    is at most ``table_factor`` times the pixel count, else by hash (both give the
    reference's vertex order and neighbours; tests check they agree)."""
    xs, ys, colour = cell_channels(image, params)
    built = grid_by_table(xs, ys, colour, table_factor * colour.shape[1])
    vertex, neighbours = built if built is not None else grid_by_hash(xs, ys, colour)
    del colour, built  # the largest arrays of the call: freed before the next ones
    nv = neighbours.shape[0]
    cols = np.empty((nv, 2 * DIM + 1), dtype=np.int32)
    cols[:, :-1] = neighbours
    cols[:, -1] = np.arange(nv)  # each row ends with its diagonal entry
    present = np.flatnonzero(cols < nv)  # row-major: each row's entries in direction order
    indices = cols.reshape(-1).take(present)
    rows = (present // (2 * DIM + 1)).astype(np.int32)
    per_row = np.full(nv, 2 * DIM + 1, dtype=np.int32)
    per_row -= (neighbours.T == nv).sum(axis=0, dtype=np.int32)  # (10, V): sums of rows
    indptr = np.zeros(nv + 1, dtype=np.int32)
    np.cumsum(per_row, out=indptr[1:])
    values = np.ones(len(indices))
    values[indptr[1:] - 1] = 2 * DIM
    blur_matrix = csr_matrix((values, indices, indptr), shape=(nv, nv))
    counts = np.bincount(vertex, minlength=nv).astype(np.float64)
    return Grid(vertex, counts, blur_matrix, rows, nv)


def blur(grid: Grid, x: np.ndarray) -> np.ndarray:
    """``2·dim·x + Σ_d (x[v - e_d] + x[v + e_d])`` (absent neighbours count 0): the reference's
    ``blur``, summed in one pass over each row instead of dimension by dimension (so equal up
    to the last bit or so)."""
    return grid.blur @ x


def bistochastize(grid: Grid, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` and ``m`` with ``n · blur(n) = m`` (``bistochastize`` of the reference)."""
    m = grid.counts
    n = np.ones(grid.nvertices)
    for _ in range(iterations):
        n = np.sqrt(n * m / blur(grid, n))
    return n, n * blur(grid, n)


def system_matrix(grid: Grid, n: np.ndarray, m: np.ndarray, w_splat: np.ndarray,
                  lam: float) -> csr_matrix:
    """``A = lam (diag(m) - diag(n) B diag(n)) + diag(w_splat)`` on the blur's sparsity
    pattern, each entry computed as the reference's sparse algebra computes it: off-diagonal
    ``lam · -(n_i n_j)``, diagonal ``lam (m_i - n_i (2·dim·n_i)) + w_i``. A column listed twice
    (hash aliases only) is summed by the product and by ``diagonal()`` alike, as SciPy's sums
    of the reference's matrices would."""
    blur_matrix = grid.blur
    cols, rows = blur_matrix.indices, grid.rows
    values = n.take(rows)
    values *= n.take(cols)
    np.negative(values, out=values)
    values *= lam  # lam * -(n_i n_j), without a temporary per operation
    last = blur_matrix.indptr[1:] - 1
    values[last] = lam * (m - n * (2 * DIM * n)) + w_splat
    return csr_matrix((values, cols, blur_matrix.indptr), shape=blur_matrix.shape)


def splat_constant(counts: np.ndarray, value: float) -> np.ndarray:
    """``S·(value·1)`` exactly as the reference's sparse product sums it: ``value`` added
    ``count`` times in sequence (not ``value·count``), read from one running sum."""
    running = np.cumsum(np.full(int(counts.max()), value, dtype=np.float64))
    return running[counts.astype(np.int64) - 1]


def legacy_cg(a: csr_matrix, b: np.ndarray, x0: np.ndarray, inv_diag: np.ndarray,
              maxiter: int, tol: float) -> tuple[np.ndarray, int]:
    """Jacobi-preconditioned CG with SciPy 1.5-1.7's legacy stopping rule (``atol`` unset):
    ``x0`` if ``|b - A x0| <= tol``; else updates until ``|r| <= tol·|b|`` (``tol`` if
    ``b = 0``) or ``maxiter`` updates. Returns the solution and the number of updates."""
    x = x0.copy()
    r = b - a @ x
    resid = float(np.linalg.norm(r))
    if resid <= tol:
        return x, 0
    bnrm2 = float(np.linalg.norm(b))
    atol = tol * bnrm2 if bnrm2 != 0 else tol
    if resid <= atol:
        return x, 0
    p, z, step = np.empty_like(r), np.empty_like(r), np.empty_like(r)
    rho_prev = 1.0
    for iteration in range(maxiter):
        np.multiply(inv_diag, r, out=z)
        rho = float(np.dot(r, z))
        if iteration > 0:
            p *= rho / rho_prev
            p += z
        else:
            p[:] = z
        q = a @ p
        alpha = rho / float(np.dot(p, q))
        x += np.multiply(p, alpha, out=step)
        r -= np.multiply(q, alpha, out=step)
        rho_prev = rho
        if math.sqrt(float(np.dot(r, r))) <= atol:  # np.linalg.norm's arithmetic, less overhead
            return x, iteration + 1
    return x, maxiter


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (4-connected background, the default
    structure): background regions that do not touch the border become foreground. One
    labelling of the complement instead of an iterated dilation."""
    labels, count = ndi.label(~mask)
    if count == 0:
        return mask.copy()
    border = np.zeros(count + 1, dtype=bool)
    border[labels[0, :]] = border[labels[-1, :]] = True
    border[labels[:, 0]] = border[labels[:, -1]] = True
    border[0] = True  # label 0 is the mask itself
    if border.all():  # no hole (the usual case)
        return mask.copy()
    return mask | ~border.take(labels)


def select_component(filled: np.ndarray, rule: str = "reference") -> np.ndarray:
    """The post-processed binary mask: see the module docstring for the reference's
    ``argsort(sizes)[-2]`` rule and the corrected ``largest``."""
    if rule not in COMPONENT_RULES:
        raise LostregError(f"component rule {rule!r}: expected one of {', '.join(COMPONENT_RULES)}")
    labeled, count = ndi.label(filled)
    sizes = np.bincount(labeled.reshape(-1), minlength=count + 1)
    if rule == "largest":
        if count == 0:
            return np.zeros_like(filled, dtype=bool)
        return labeled == 1 + int(np.argmax(sizes[1:]))
    if count == 0:
        return np.ones_like(filled, dtype=bool)
    return labeled == np.argsort(sizes)[-2]


class PreparedSolver(NamedTuple):
    """Everything of the solve that depends on the image alone (the confidence is the constant
    0.999): the grid, the system matrix ``A`` and its Jacobi preconditioner, the splatted
    confidence. Built once per image, it serves any number of targets
    (``lostreg.runs.mask_lines``: every refined run of one image)."""

    grid: Grid
    a: csr_matrix
    inv_diag: np.ndarray
    w_splat: np.ndarray
    shape: tuple[int, int]
    params: BilateralParams


def prepare_solver(image: np.ndarray, params: BilateralParams = TOKENCUT_PARAMS
                   ) -> PreparedSolver:
    """The image's half of ``bilateral_solver_output``: grid, bistochastization, ``A``."""
    check_image(image)
    grid = build_grid(image, params)
    n, m = bistochastize(grid, params.bistochastize_iters)
    w_splat = splat_constant(grid.counts, params.confidence)
    a = system_matrix(grid, n, m, w_splat, params.lam)
    inv_diag = 1 / np.maximum(a.diagonal(), params.a_diag_min)
    return PreparedSolver(grid, a, inv_diag, w_splat, image.shape[:2], params)


def solve(prepared: PreparedSolver, target: np.ndarray) -> tuple[np.ndarray, int]:
    """The target's half: ``(soft output HxW float64, CG updates made)``."""
    check_target(target, prepared.shape)
    grid, params = prepared.grid, prepared.params
    xw = target.reshape(-1).astype(np.float64) * params.confidence
    b = np.bincount(grid.vertex, weights=xw, minlength=grid.nvertices)
    y, iterations = legacy_cg(prepared.a, b, b / prepared.w_splat, prepared.inv_diag,
                              params.cg_maxiter, params.cg_tol)
    return y[grid.vertex].reshape(prepared.shape), iterations


def post_process(soft: np.ndarray, component_rule: str = "reference") -> np.ndarray:
    """The reference's binary mask of a soft output: holes filled, then one component."""
    return select_component(fill_holes(soft > 0.5), component_rule)


def bilateral_refine(image: np.ndarray, target: np.ndarray,
                     params: BilateralParams = TOKENCUT_PARAMS,
                     component_rule: str = "reference") -> BilateralOutput:
    """Refine ``target`` (HxW, bool or float, e.g. TokenCut's upsampled 0/1 mask) on the RGB
    ``image`` (uint8 HxWx3, same size) as TokenCut's ``bilateral_solver_output`` does."""
    soft, iterations = solve(prepare_solver(image, params), target)  # each checks its input
    return BilateralOutput(soft, post_process(soft, component_rule), iterations)


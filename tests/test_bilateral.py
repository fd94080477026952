"""The bilateral solver refinement against the transcription of TokenCut's
``bilateral_solver.py``: identical binary masks and soft outputs within 1e-9 on generated
images, both grid constructions, the legacy CG rule and the post-processing quirks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import csr_matrix, diags
from scipy.sparse.linalg import cg

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from saliency_references import ReferenceGrid, reference_bilateral, reference_colour_cells  # noqa: E402

from benchmarks import bench_bilateral  # noqa: E402
from benchmarks.bench_bilateral import compare, make_inputs  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.methods import bilateral as B  # noqa: E402

SOFT_TOL = 1e-9


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    """A coloured shape on a textured background with a coarse blocky mask, both ways up."""
    return make_inputs(4, 90, 120, seed=5) + make_inputs(1, 300, 400, seed=6)


def test_matches_reference_on_generated_images(scenes) -> None:
    for image, target in scenes:
        soft, binary = reference_bilateral(image, target)
        ours = B.bilateral_refine(image, target)
        assert np.array_equal(ours.binary, binary)
        assert np.abs(ours.soft - soft).max() < SOFT_TOL
        assert ours.cg_iterations == 25  # these systems do not reach 1e-5 * |b| in 25 steps


def test_benchmark_check_passes(scenes) -> None:
    checked = compare(scenes[:2])
    assert checked["identical_masks"] and checked["max_soft_abs_diff"] < SOFT_TOL


def test_benchmark_core_runs() -> None:
    """The script's measuring core on one tiny image (its ``main`` adds only the printing and
    ``machine_facts``, whose timm import alone takes seconds); never a timing assertion."""
    args = bench_bilateral.build_parser().parse_args([])
    assert (args.images, args.height, args.width, args.blas_threads) == (20, 300, 400, "1")
    result = bench_bilateral.measure(make_inputs(1, 24, 32, seed=0), rounds=1)
    assert set(result["seconds_per_image"]) == {"reference", "ours"} and result["ratio"] > 0


def test_table_and_hash_grids_agree(scenes) -> None:
    for image, _ in scenes:
        xs, ys, colour = B.cell_channels(image, B.TOKENCUT_PARAMS)
        table = B.grid_by_table(xs, ys, colour, 8 * colour.shape[1])
        vertex, neighbours = B.grid_by_hash(xs, ys, colour)
        assert table is not None
        assert np.array_equal(table[0], vertex) and np.array_equal(table[1], neighbours)
    image = scenes[0][0]
    grid_table = B.build_grid(image)
    grid_hash = B.build_grid(image, table_factor=0)
    assert np.array_equal(grid_table.vertex, grid_hash.vertex)
    assert (grid_table.blur != grid_hash.blur).nnz == 0


def test_grid_is_the_reference_grid(scenes) -> None:
    """Same vertices in the same order (each pixel's row of the reference's splat matrix) and
    the same blur matrix, centre included."""
    image = scenes[1][0]
    reference = ReferenceGrid(image, 16, 16, 8)
    grid = B.build_grid(image)
    assert grid.nvertices == reference.nvertices
    assert np.array_equal(reference.S.tocsc().indices, grid.vertex)
    blur = 2 * reference.dim * np.eye(reference.nvertices) + sum(b.toarray() for b in reference.blurs)
    assert np.array_equal(blur, grid.blur.toarray())


def test_hash_aliases_are_reproduced() -> None:
    """Coordinates reaching 254/255 make the reference's 255-radix hash alias neighbours
    (x = -1 of one row is x = 254 of the row before). A 4100-px-wide strip at sigma 16 and a
    luma sigma of 1 both get there; the hash path must follow the reference."""
    rng = np.random.default_rng(2)
    strip = rng.integers(0, 256, (3, 4100, 3), dtype=np.uint8)
    target = np.zeros((3, 4100))
    target[:, 1000:3000] = 1.0
    soft, binary = reference_bilateral(strip, target)
    ours = B.bilateral_refine(strip, target)
    assert np.array_equal(ours.binary, binary) and np.abs(ours.soft - soft).max() < SOFT_TOL
    # black (Y 0, U cell 16) next to (255, 255, 250) (Y 254.4, U 125.5 -> cell 15) in one
    # spatial cell at sigma_luma 1: hash(Y - 1 of black) == hash(Y 254, U 15) of the other
    image = np.where(rng.random((24, 30, 1)) < 0.5, np.uint8(0), np.uint8(255))
    image = np.repeat(image, 3, axis=2)
    image[..., 2] = np.where(image[..., 0] == 255, 250, 0)
    target = np.zeros((24, 30))
    target[6:18, 8:20] = 1.0
    params = B.BilateralParams(sigma_luma=1.0)
    soft, binary = reference_bilateral(image, target, 16, 1.0, 8)
    ours = B.bilateral_refine(image, target, params)
    xs, ys, colour = B.cell_channels(image, params)
    assert B.grid_by_table(xs, ys, colour, 10**9) is None  # luma cells reach 254
    vertex, neighbours = B.grid_by_hash(xs, ys, colour)
    black = vertex[int(np.flatnonzero(image[..., 0].reshape(-1) == 0)[0])]
    assert neighbours[black, 4] < len(neighbours)  # a luma -1 neighbour of luma cell 0: alias
    assert np.array_equal(ours.binary, binary) and np.abs(ours.soft - soft).max() < SOFT_TOL


def test_legacy_absolute_exit_and_empty_targets() -> None:
    """All-ones target: the start (the per-vertex mean, 1) has |b - A x0| ~ 1e-13 <= 1e-5, so
    the legacy rule returns it untouched; an all-zero target has b = 0. The reference's binary
    rule then gives nothing for a full result (one component bigger than the empty
    background: ``[-2]`` is label 0) and the whole image for an empty one (``[-2]`` raises)."""
    image, _ = make_inputs(1, 40, 50, seed=1)[0]
    ones = B.bilateral_refine(image, np.ones((40, 50)))
    ref_soft, ref_binary = reference_bilateral(image, np.ones((40, 50)))
    assert ones.cg_iterations == 0 and np.array_equal(ones.soft, ref_soft)
    assert np.all(ones.soft == 1.0) and not ones.binary.any() and not ref_binary.any()
    assert B.bilateral_refine(image, np.ones((40, 50)), component_rule="largest").binary.all()
    zeros = B.bilateral_refine(image, np.zeros((40, 50), dtype=bool))
    ref_soft, ref_binary = reference_bilateral(image, np.zeros((40, 50)))
    assert zeros.cg_iterations == 0 and np.all(zeros.soft == 0.0) and np.all(ref_soft == 0.0)
    assert zeros.binary.all() and ref_binary.all()
    assert not B.bilateral_refine(image, np.zeros((40, 50)), component_rule="largest").binary.any()


def test_legacy_cg_matches_scipy_when_it_converges() -> None:
    """Same updates as SciPy's cg; on a system that converges before maxiter the two stop at
    the same iterate (the relative rule), and the iteration count is reported."""
    rng = np.random.default_rng(0)
    m = rng.random((40, 40))
    a = m @ m.T + 40 * np.eye(40)
    a_sparse = csr_matrix(a)
    b = rng.random(40)
    x0 = np.zeros(40)
    inv_diag = 1 / a.diagonal()
    ours, iterations = B.legacy_cg(a_sparse, b, x0, inv_diag, 25, 1e-5)
    steps = []
    theirs, info = cg(a_sparse, b, x0=x0, M=diags(inv_diag), maxiter=25, rtol=1e-5, atol=0.0,
                      callback=lambda xk: steps.append(1))
    assert info == 0 and 0 < iterations < 25 and iterations == len(steps)
    assert np.abs(ours - theirs).max() < 1e-12
    assert np.linalg.norm(b - a @ ours) <= 1e-5 * np.linalg.norm(b)


def test_reference_component_rule_and_its_correction() -> None:
    """An object bigger than the background: argsort(sizes)[-2] is label 0, the background."""
    filled = np.zeros((4, 4), dtype=bool)
    filled[:3] = True  # 12 object pixels, 4 background pixels
    assert B.select_component(filled).tolist() == (~filled).tolist()
    assert B.select_component(filled, "largest").tolist() == filled.tolist()
    two = np.zeros((6, 6), dtype=bool)
    two[0, 0] = True
    two[3:5, 3:5] = True
    assert B.select_component(two).tolist() == B.select_component(two, "largest").tolist()
    with pytest.raises(LostregError, match="component rule"):
        B.select_component(two, "biggest")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_fill_holes_is_scipys(height: int, width: int, seed: int) -> None:
    mask = np.random.default_rng(seed).random((height, width)) < 0.55
    assert np.array_equal(B.fill_holes(mask), ndi.binary_fill_holes(mask))


def test_splat_of_the_constant_confidence_is_the_sequential_sum(scenes) -> None:
    grid = B.build_grid(scenes[0][0])
    weights = np.full(grid.vertex.size, 0.999)
    assert np.array_equal(B.splat_constant(grid.counts, 0.999),
                          np.bincount(grid.vertex, weights=weights, minlength=grid.nvertices))


def test_bad_input_is_one_line() -> None:
    image, target = make_inputs(1, 30, 40, seed=3)[0]
    for bad_image, bad_target, message in (
            (image.astype(np.float32), target, "uint8"),
            (image, target[:-1], "does not match"),
            (image, target.astype(np.int64), "bool or float"),
            (image, np.full(target.shape, np.nan), "NaN")):
        with pytest.raises(LostregError, match=message):
            B.bilateral_refine(bad_image, bad_target)


def border_colours(sigma_luma: int, sigma_chroma: int) -> np.ndarray:
    """Every 24-bit colour whose exact luma, u or v (offset included) is a nonzero multiple of
    its sigma: the colours where the reference's float may truncate an ulp short."""
    channel = np.arange(256, dtype=np.int64)
    r, g, b = channel[:, None, None], channel[None, :, None], channel[None, None, :]
    found = np.zeros((256, 256, 256), dtype=bool)
    for row, offset, sigma in zip(B.YUV_MICRO.astype(np.int64), B.YUV_OFFSET_MICRO.astype(np.int64),
                                  (sigma_luma, sigma_chroma, sigma_chroma), strict=True):
        value = row[0] * r + row[1] * g + row[2] * b + offset
        found |= (value % (sigma * 10**6) == 0) & (value > 0)
    return np.flatnonzero(found.reshape(-1))


def test_colour_cells_are_the_references_bit_for_bit() -> None:
    """The exact-integer cells with the reference's fallback near borders agree with the
    reference's ``tensordot`` cells on every border colour and on a random sample, at three
    sigma pairs (all 2^24 colours: ``benchmarks/check_yuv_cells.py``, whose comparison this
    runs). Without the fallback some border colours would differ: the reference truncates
    them to the lower cell."""
    from benchmarks.check_yuv_cells import check_sigmas, colour_image

    assert np.array_equal(B.YUV_MICRO / 1e6, B.RGB_TO_YUV)
    sample = np.random.default_rng(0).choice(1 << 24, 1 << 16, replace=False)
    codes = np.concatenate([border_colours(16, 8), sample]).astype(np.uint32)
    for sigma_luma, sigma_chroma in ((16.0, 8.0), (10.0, 3.0), (0.7, 0.3)):
        result = check_sigmas(codes, sigma_luma, sigma_chroma, chunk=len(codes))
        assert result["cell_mismatches"] == 0, result
        if (sigma_luma, sigma_chroma) == (16.0, 8.0):
            assert result["reference_rounded_down"] > 0  # the fallback is needed
    image = colour_image(codes, len(codes))
    bad = B.BilateralParams(sigma_luma=-4.0)  # no band rule: the reference's own expression
    luma, _ = reference_colour_cells(image, -4.0, 8)
    assert np.array_equal(B.cell_channels(image, bad)[2][0], luma.reshape(-1))


def test_check_yuv_cells_core_runs() -> None:
    """The 2^24-colour script's core on a few thousand colours (its full run takes seconds
    per sigma pair), with the border colours included; its argument errors are one line."""
    from benchmarks import check_yuv_cells

    order = np.concatenate([border_colours(16, 8)[:2000],
                            np.arange(0, 1 << 24, 4099)]).astype(np.uint32)
    result = check_yuv_cells.check_sigmas(order, 16.0, 8.0, chunk=1024)
    assert result["cell_mismatches"] == 0 and result["colours"] == len(order)
    assert result["exact_border_cells"] >= 2000 and result["reference_rounded_down"] > 0
    assert check_yuv_cells.parse_sigmas("16:8,10:3") == [(16.0, 8.0), (10.0, 3.0)]
    with pytest.raises(LostregError, match="LUMA:CHROMA"):
        check_yuv_cells.parse_sigmas("16")
    assert check_yuv_cells.main(["--chunk", "0"]) == 2

"""LOST's row-blocked similarities (one image larger than the byte budget) against the unblocked
path: byte-identical degrees, seeds, ``M``, boxes and masks, and no ``N x N`` allocation.

Two kinds of features: integer-valued ones, whose float32 products and sums are exact in any
summation order, so they test the blocking logic alone on any BLAS (diagonals at block
offsets, ties, exact zeros, padding of the potential rows); and Gaussian ones at realistic
sizes, which also rest on the BLAS property the module docstring states (a block of at least
``MIN_BLOCK_ROWS`` rows rounds each entry like the full product), checked on its own here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from lostreg.methods import lost as lost_module
from lostreg.methods.lost import (
    CHUNK_BYTES,
    MIN_BLOCK_ROWS,
    lost,
    lost_reference,
    lost_with_mask,
)

CPU = torch.device("cpu")
P = 14


def expansions(feats: torch.Tensor, gram_bias: float, k: int, block_rows: int | None,
               min_rows: int = MIN_BLOCK_ROWS) -> tuple[torch.Tensor, ...]:
    """``_seed_expansions`` with the row block forced to ``block_rows`` (None: unblocked)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lost_module, "MIN_BLOCK_ROWS", min_rows)
        if block_rows is not None:
            patch.setattr(lost_module, "_row_block", lambda n, device: block_rows)
        else:
            patch.setitem(CHUNK_BYTES, "cpu", 1 << 40)
        return lost_module._seed_expansions(feats, gram_bias, k)


def outputs(feats: torch.Tensor, grid: tuple[int, int], sizes, k: int, gram_bias: float,
            block_rows: int | None, min_rows: int = MIN_BLOCK_ROWS):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lost_module, "MIN_BLOCK_ROWS", min_rows)
        if block_rows is not None:
            patch.setattr(lost_module, "_row_block", lambda n, device: block_rows)
        else:
            patch.setitem(CHUNK_BYTES, "cpu", 1 << 40)
        return lost_with_mask(feats, grid, P, sizes, k, gram_bias)


def assert_identical(blocked, unblocked) -> None:
    for a, b in zip(blocked, unblocked, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_row_block_is_the_whole_image_when_it_fits_and_even_blocks_otherwise() -> None:
    cpu_rows = CHUNK_BYTES["cpu"] // 4  # N*N*4 bytes fit while N*N <= this
    assert lost_module._row_block(1000, CPU) == 1000  # VOC at patch 16: unblocked
    assert lost_module._row_block(int(cpu_rows ** 0.5), CPU) == int(cpu_rows ** 0.5)
    for n in (1449, 1610, 2961, 4800, 61_000):  # above the 8 MiB budget on a CPU
        rows = lost_module._row_block(n, CPU)
        blocks = -(-n // rows)
        assert MIN_BLOCK_ROWS <= rows < n
        assert rows * n * 4 <= max(CHUNK_BYTES["cpu"], MIN_BLOCK_ROWS * n * 4)
        assert n - (blocks - 1) * rows >= rows - blocks  # the tail block is not short
    # a 4000x3000 image at patch 14 on a GPU: 1 GiB blocks of ~4.4k rows, not one 15 GB block
    rows = lost_module._row_block(61_000, torch.device("cuda"))
    assert 4000 < rows < 4500 and rows * 61_000 * 4 <= CHUNK_BYTES["cuda"]
    # the minimum wins over a budget too small for it
    assert lost_module._row_block(1_000_000, CPU) == MIN_BLOCK_ROWS


def planted(grid: tuple[int, int], object_cells: list[tuple[int, int]]) -> torch.Tensor:
    rows, cols = grid
    feats = torch.zeros(rows * cols, 4)
    feats[:, 0] = 1.0
    for r, c in object_cells:
        feats[r * cols + c] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    return feats


@pytest.mark.parametrize("block_rows", [1, 2, 3, 7, 19, 20])
def test_hand_case_in_row_blocks(block_rows) -> None:
    """test_lost.py's hand case (4x5 grid, six object patches, degrees 5 and 13) in blocks of
    1 row up to the whole image: same degrees, seed and box, worked out by hand."""
    cells = [(0, 0), (1, 1), (2, 3), (2, 4), (3, 3), (3, 4)]
    feats = planted((4, 5), cells).unsqueeze(0)
    (box, seed, degrees), mask = outputs(feats, (4, 5), [(56, 70)], 100, 0.0, block_rows, 1)
    expected = torch.full((20,), 13)
    for r, c in cells:
        expected[r * 5 + c] = 5
    assert torch.equal(degrees[0], expected)
    assert seed.tolist() == [0] and box.tolist() == [[0, 0, 14, 14]]
    assert mask[0].nonzero().tolist() == [[0, 0]]
    # the 2x2 blob alone: seed 13, a box clipped to the image
    feats = planted((4, 5), cells[2:]).unsqueeze(0)
    (box, seed, _), mask = outputs(feats, (4, 5), [(50, 65)], 100, 0.0, block_rows, 1)
    assert seed.tolist() == [13] and box.tolist() == [[42, 28, 65, 50]]
    assert int(mask.sum()) == 4


@st.composite
def integer_cases(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    n = rows * cols
    batch = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # small integers: every product and every sum of them is exact in float32, whatever the
    # order, and exact zeros and equal degrees (ties) are frequent
    feats = torch.randint(-2, 3, (batch, n, dim), generator=gen).float()
    k = draw(st.integers(1, n + 3))
    bias = draw(st.sampled_from([0.0, 0.0, 0.5, -0.5, 1.0, -2.0]))
    block_rows = draw(st.integers(1, n))
    min_rows = draw(st.sampled_from([1, 2, 5, MIN_BLOCK_ROWS]))
    return feats, (rows, cols), k, bias, block_rows, min_rows


@settings(max_examples=200, deadline=None)
@given(integer_cases())
def test_blocked_equals_unblocked_on_exact_features(case) -> None:
    feats, grid, k, bias, block_rows, min_rows = case
    blocked = expansions(feats, bias, k, block_rows, min_rows)
    assert_identical(blocked, expansions(feats, bias, k, None))
    sizes = [(grid[0] * P - 1, grid[1] * P - 2)] * feats.shape[0]
    (box, seed, degrees), mask = outputs(feats, grid, sizes, k, bias, block_rows, min_rows)
    (box_u, seed_u, degrees_u), mask_u = outputs(feats, grid, sizes, k, bias, None)
    assert_identical((box, seed, degrees, mask), (box_u, seed_u, degrees_u, mask_u))
    for i in range(feats.shape[0]):
        ref = lost_reference(feats[i], grid, P, sizes[i], k, bias)
        assert box[i].tolist() == ref.box and int(seed[i]) == ref.seed


def test_blas_rounds_blocks_like_the_full_product() -> None:
    """The property the blocked path rests on, on this machine's BLAS: products of at least
    ``MIN_BLOCK_ROWS`` rows, at any offset or gathered in any order, give each entry the same
    bits as the full ``F F^T``. If a BLAS breaks this, this test names it before any LOST
    comparison can flake."""
    gen = torch.Generator().manual_seed(0)
    for n, dim in [(1610, 384), (2961, 64), (700, 768)]:
        feats = torch.randn(1, n, dim, generator=gen)
        full = torch.bmm(feats, feats.transpose(1, 2))
        for rows in (MIN_BLOCK_ROWS, 100, 805, n // 3):
            for start in (0, 1, rows, n - rows):
                part = torch.bmm(feats[:, start:start + rows], feats.transpose(1, 2))
                assert torch.equal(part, full[:, start:start + rows]), (n, dim, rows, start)
        picked = torch.randperm(n, generator=gen)[:MIN_BLOCK_ROWS].view(1, -1)
        chosen = torch.gather(feats, 1, picked.unsqueeze(-1).expand(-1, -1, dim))
        part = torch.bmm(chosen, feats.transpose(1, 2))
        assert torch.equal(part[0], full[0, picked[0]]), (n, dim, "gathered")


@pytest.mark.parametrize(("k", "bias"), [(100, 0.0), (3, 0.0), (1, 0.2), (250, -0.1)])
def test_blocked_equals_unblocked_on_a_coco_sized_image(k, bias) -> None:
    """640x480 at patch 14 (46x35 = 1610 patches): 10.4 MB of similarities, above the CPU's
    8 MiB budget, so the default path is blocked (2 blocks of 805 rows). Gaussian features
    with a planted object, d = 384."""
    grid = (35, 46)
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(7)
    background, foreground = torch.randn(2, 384, generator=gen)
    inside = torch.zeros(grid, dtype=torch.bool)
    inside[10:22, 15:31] = True
    feats = torch.where(inside.view(-1, 1), foreground - 0.5 * background, background)
    feats = (feats + 0.8 * torch.randn(n, 384, generator=gen)).unsqueeze(0)
    assert lost_module._row_block(n, CPU) == 805
    blocked = lost_module._seed_expansions(feats, bias, k)
    assert_identical(blocked, expansions(feats, bias, k, None))
    (box, seed, degrees), mask = lost_with_mask(feats, grid, P, [(480, 640)], k, bias)
    ref = lost_reference(feats[0], grid, P, (480, 640), k, bias)
    assert box[0].tolist() == ref.box and int(seed[0]) == ref.seed
    assert torch.equal(degrees[0], ref.degrees)


class LargestOutput(TorchDispatchMode):
    """Records the element count of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return result


def test_no_n_by_n_tensor_is_ever_built_for_a_large_image(monkeypatch) -> None:
    """Every operator's output during ``lost`` on one 2000-patch image, with a 1 MiB budget:
    blocks of 125 rows and the k = 100 potential rows, nothing near N x N (4M)."""
    grid = (40, 50)
    n = grid[0] * grid[1]
    feats = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(1))
    monkeypatch.setitem(CHUNK_BYTES, "cpu", 1 << 20)
    assert lost_module._row_block(n, CPU) == 125
    with LargestOutput() as probe:
        blocked = lost(feats, grid, P, [(560, 700)])
    assert probe.largest == 125 * n  # a block (the potential rows are 100 x N)
    monkeypatch.setitem(CHUNK_BYTES, "cpu", 1 << 40)
    with LargestOutput() as probe:  # the probe sees an N x N block where there is one
        unblocked = lost(feats, grid, P, [(560, 700)])
    assert probe.largest == n * n
    assert torch.equal(blocked.box, unblocked.box) and torch.equal(blocked.seed, unblocked.seed)
    assert torch.equal(blocked.degrees, unblocked.degrees)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blocked_equals_unblocked_under_cublas(monkeypatch) -> None:
    """On a GPU the blocked path starts above 16k patches (1 GiB); forced here at 3000
    patches, Gaussian features: the same bits as the unblocked path if cuBLAS rounds blocks
    like the full product (the property checked on the CPU above)."""
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 3000, 384, generator=gen).to(cuda)
    monkeypatch.setitem(CHUNK_BYTES, "cuda", 1 << 40)
    unblocked = lost_module._seed_expansions(feats, 0.0, 100)
    monkeypatch.setitem(CHUNK_BYTES, "cuda", 2 << 20)
    assert lost_module._row_block(3000, cuda) < 3000
    blocked = lost_module._seed_expansions(feats, 0.0, 100)
    assert_identical(blocked, unblocked)

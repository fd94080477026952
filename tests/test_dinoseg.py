"""DINO-seg exactness: the published code's quirks (on by default) and the corrected variant,
hand-computed maps, degenerate conventions, and batched == per-image reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lostreg.errors import LostregError
from lostreg.methods import get_method
from lostreg.methods.dinoseg import (
    _roots_propagate,
    _roots_scipy,
    dinoseg,
    dinoseg_reference,
    kept_patches,
)

P = 14
VARIANTS = ("reference", "corrected")


def blob_attention(grid: tuple[int, int], blobs: list[list[tuple[int, int]]],
                   heads: int = 6, head: int = 4) -> torch.Tensor:
    """``(N, heads)`` attention whose head ``head`` keeps exactly the blob patches at mass 0.6.

    The background holds 39% of the mass, each blob patch an equal share of the other 61%:
    ascending, the background's cumulative mass stays <= 0.39 < 0.4 and the first blob patch
    lifts it above 0.4, so every blob patch is kept. Other heads are uniform noise.
    """
    rows, cols = grid
    cells = [cell for blob in blobs for cell in blob]
    values = torch.full((rows * cols,), 0.39 / (rows * cols - len(cells)))
    for r, c in cells:
        values[r * cols + c] = 0.61 / len(cells)
    attn = torch.rand(rows * cols, heads, generator=torch.Generator().manual_seed(0))
    attn[:, head] = values
    return attn


def both_paths(attn: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], variant: str,
               head: int = 4, mass: float = 0.6) -> list[tuple[list[int], torch.Tensor]]:
    """(box, mask) of the batched path and of the per-image reference."""
    out = dinoseg(attn.unsqueeze(0), grid, P, torch.tensor([size]), head, mass, variant)
    ref = dinoseg_reference(attn, grid, P, size, head, mass, variant)
    assert int(out.seed[0]) == -1 and int(ref.seed) == -1  # DINO-seg has no seed
    return [(out.box[0].tolist(), out.mask[0]), (ref.box.tolist(), ref.mask)]


def cells_mask(grid: tuple[int, int], cells: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(grid, dtype=torch.bool)
    for r, c in cells:
        mask[r, c] = True
    return mask


# --- the registry entry and its parameters ---------------------------------------------------


def test_entry_reads_attention_only_with_the_reference_defaults() -> None:
    spec = get_method("dinoseg")
    assert spec.defaults() == {"dinoseg_head": 4, "dinoseg_mass": 0.6,
                               "dinoseg_variant": "reference"}
    assert spec.feature_kinds == ("attn",) and spec.default_feature == "attn"
    assert spec.feature_for(None, "k") == "attn"
    with pytest.raises(LostregError, match="--method dinoseg reads attn, not --features k"):
        spec.feature_for("k", "k")
    flags = {p.cli_flag for p in spec.params}
    assert flags == {"--dinoseg-head", "--dinoseg-mass", "--dinoseg-variant"}
    assert spec.resolve({"dinoseg_head": "2", "dinoseg_variant": "corrected"})["dinoseg_head"] == 2


@pytest.mark.parametrize(("values", "message"), [
    ({"dinoseg_head": -1}, "--dinoseg-head -1: must be a head index >= 0"),
    ({"dinoseg_head": "two"}, "--dinoseg-head 'two': not a valid value for dinoseg"),
    ({"dinoseg_mass": 0.0}, r"--dinoseg-mass 0.0: must be in \(0, 1\]"),
    ({"dinoseg_mass": 1.5}, r"--dinoseg-mass 1.5: must be in \(0, 1\]"),
    ({"dinoseg_mass": math.nan}, r"--dinoseg-mass nan: must be in \(0, 1\]"),
    ({"dinoseg_variant": "fixed"}, "--dinoseg-variant 'fixed': expected one of reference, "
                                   "corrected"),
])
def test_bad_parameters_are_one_line(values: dict, message: str) -> None:
    with pytest.raises(LostregError, match=message) as info:
        get_method("dinoseg").resolve(values)
    assert "\n" not in str(info.value)


def test_a_head_the_attention_lacks_is_one_line_at_run_time() -> None:
    spec = get_method("dinoseg")
    attn = torch.rand(2, 12, 3)
    params = spec.resolve({})  # head 4 of a 3-head model
    message = r"--dinoseg-head 4: the attention has 3 heads \(valid heads 0..2\)"
    with pytest.raises(LostregError, match=message):
        spec.run(attn, (3, 4), P, torch.tensor([[42, 56]] * 2), params)
    with pytest.raises(LostregError, match=message):
        spec.reference(attn[0], (3, 4), P, (42, 56), params)


# --- the threshold, by hand ----------------------------------------------------------------------


def test_threshold_sorts_ascending_keeps_mass_above_one_minus_share_in_patch_order() -> None:
    # one head, 2x2: ascending 0.1, 0.2, 0.3, 0.4 -> cumulative 0.1, 0.3, 0.6, 1.0 > 0.4:
    # the patches holding 0.3 (index 3) and 0.4 (index 1) are kept, back in patch order
    attn = torch.tensor([[0.1], [0.4], [0.2], [0.3]])
    assert kept_patches(attn.unsqueeze(0), 0, 0.6).tolist() == [[False, True, False, True]]
    # unnormalised input is normalised first: the same answer at any scale
    assert kept_patches(5 * attn.unsqueeze(0), 0, 0.6).tolist() == [[False, True, False, True]]
    # a larger share keeps more: 0.9 keeps cumulative > 0.1, i.e. all but the smallest
    assert kept_patches(attn.unsqueeze(0), 0, 0.9).tolist() == [[False, True, True, True]]
    # kept patches (0,1) and (1,1) are one component: the reference boxes the background,
    # column 0 of both rows; the corrected variant boxes column 1
    (box, mask), (ref_box, ref_mask) = both_paths(attn, (2, 2), (28, 28), "reference", head=0)
    assert box == ref_box == [0, 0, 14, 28]
    assert torch.equal(mask, ref_mask) and mask.tolist() == [[True, False], [True, False]]
    for box, mask in both_paths(attn, (2, 2), (28, 28), "corrected", head=0):
        assert box == [14, 0, 28, 28] and mask.tolist() == [[False, True], [False, True]]


# --- the quirks, by hand -------------------------------------------------------------------------


SMALL_FIRST = [(0, 0), (0, 1)]  # label 1 (first in raster order), 2 patches
LARGE_SECOND = [(3, 2), (3, 3), (4, 2), (4, 3), (4, 4)]  # label 2, 5 patches


def test_two_components_reference_takes_label_1_even_when_smaller() -> None:
    attn = blob_attention((5, 6), [SMALL_FIRST, LARGE_SECOND])
    # sizes listed over range(max label = 2) = [background, label 1]: label 2 is never a
    # candidate, so the first component in raster order wins whatever its size
    for box, mask in both_paths(attn, (5, 6), (70, 84), "reference"):
        assert box == [0, 0, 28, 14] and torch.equal(mask, cells_mask((5, 6), SMALL_FIRST))
    for box, mask in both_paths(attn, (5, 6), (70, 84), "corrected"):
        assert box == [28, 42, 70, 70] and torch.equal(mask, cells_mask((5, 6), LARGE_SECOND))


def test_three_components_reference_never_takes_the_highest_label() -> None:
    middle = [(2, 5)]  # label 2 (raster order: row 0, row 2, row 3), 1 patch
    attn = blob_attention((5, 6), [SMALL_FIRST, middle, LARGE_SECOND])
    # candidates labels 1 (2 patches) and 2 (1 patch): label 1; label 3 (5 patches) excluded
    for box, mask in both_paths(attn, (5, 6), (70, 84), "reference"):
        assert box == [0, 0, 28, 14] and torch.equal(mask, cells_mask((5, 6), SMALL_FIRST))
    for box, _ in both_paths(attn, (5, 6), (70, 84), "corrected"):
        assert box == [28, 42, 70, 70]


def test_largest_component_ties_go_to_the_lowest_label() -> None:
    first, second, third = [(0, 4), (0, 5)], [(2, 0), (3, 0)], [(4, 3), (4, 4)]
    attn = blob_attention((5, 6), [first, second, third])
    for variant in VARIANTS:  # equal sizes: np.argmax's first, label 1
        for _, mask in both_paths(attn, (5, 6), (70, 84), variant):
            assert torch.equal(mask, cells_mask((5, 6), first))


def test_single_component_reference_boxes_the_background_unclipped() -> None:
    # image 60x75 on a padded 5x6 grid (70x84). The only component is column 0: the
    # reference boxes the background (columns 1-5) out to the padded 84x70; corrected boxes
    # column 0 clipped to the image height 60
    column = [(r, 0) for r in range(5)]
    attn = blob_attention((5, 6), [column])
    for box, mask in both_paths(attn, (5, 6), (60, 75), "reference"):
        assert box == [14, 0, 84, 70] and torch.equal(mask, ~cells_mask((5, 6), column))
    for box, mask in both_paths(attn, (5, 6), (60, 75), "corrected"):
        assert box == [0, 0, 14, 60] and torch.equal(mask, cells_mask((5, 6), column))


def test_reference_box_is_not_clipped_corrected_box_is() -> None:
    corner = [(3, 4), (3, 5), (4, 5)]
    attn = blob_attention((5, 6), [SMALL_FIRST[:1], corner])
    # corrected: the corner blob (3 patches), padded 84x70 clipped to the image 75x60
    for box, _ in both_paths(attn, (5, 6), (60, 75), "corrected"):
        assert box == [56, 42, 75, 60]
    # the reference variant with the corner blob as label 1 (no other blob): the background
    attn = blob_attention((5, 6), [corner, [(4, 0)]])  # labels: corner (row 3) 1, (4,0) 2
    for box, mask in both_paths(attn, (5, 6), (60, 75), "reference"):
        assert box == [56, 42, 84, 70] and torch.equal(mask, cells_mask((5, 6), corner))


# --- degenerate conventions ------------------------------------------------------------------------


def test_every_patch_kept_boxes_the_whole_grid() -> None:
    # mass 1: every patch with positive attention has cumulative mass > 0. The reference's
    # background is then empty (it raises); here the box is the whole grid
    attn = torch.rand(20, 6, generator=torch.Generator().manual_seed(1)) + 0.1
    for box, mask in both_paths(attn, (4, 5), (50, 60), "reference", mass=1.0):
        assert box == [0, 0, 70, 56] and bool(mask.all())
    for box, mask in both_paths(attn, (4, 5), (50, 60), "corrected", mass=1.0):
        assert box == [0, 0, 60, 50] and bool(mask.all())


@pytest.mark.parametrize("value", [0.0, math.nan])
def test_no_patch_kept_boxes_the_whole_grid(value: float) -> None:
    attn = torch.full((12, 6), value)  # 0/0: NaN mass, nothing exceeds the threshold
    assert not kept_patches(attn.unsqueeze(0), 4, 0.6).any()
    for variant, expected in [("reference", [0, 0, 56, 42]), ("corrected", [0, 0, 50, 40])]:
        for box, mask in both_paths(attn, (3, 4), (40, 50), variant):
            assert box == expected and bool(mask.all())


# --- connected components ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1), st.floats(0.2, 0.8))
def test_propagated_roots_equal_scipy_and_follow_its_label_order(rows: int, cols: int,
                                                                 seed: int, density: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, rows, cols, generator=generator) < density
    roots = _roots_scipy(mask)
    assert torch.equal(_roots_propagate(mask, check_every=1), roots)
    for image in range(3):
        labels, count = scipy.ndimage.label(mask[image].numpy())
        firsts = [int(np.flatnonzero(labels.flatten() == label)[0]) for label in range(1, count + 1)]
        assert firsts == sorted(firsts)  # scipy numbers components by their first patch
        assert torch.equal(roots[image] >= 0, mask[image].flatten())


def test_snake_component_converges() -> None:
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, ::2] = True  # rows 0, 2, 4, 6, 8
    mask[0, 1::4, -1] = mask[0, 3::4, 0] = True  # joined alternately right and left
    roots = _roots_propagate(mask)
    assert set(roots[0].tolist()) == {-1, 0} and torch.equal(roots, _roots_scipy(mask))


# --- batched == reference on random maps ---------------------------------------------------------


def random_attention(grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Softmax-like maps ``(N, 6)``: peaked noise with a few bright blobs per head."""
    rows, cols = grid
    logits = torch.randn(6, 1, rows, cols, generator=generator) * 1.5
    logits = torch.nn.functional.avg_pool2d(logits, 3, stride=1, padding=1,
                                            count_include_pad=False) * 3
    return logits.flatten(1).softmax(dim=1).T.contiguous()


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_equals_reference_on_random_maps(variant: str, one_thread) -> None:
    generator = torch.Generator().manual_seed(21)
    checked = total = 0
    for grid, head, mass in [((1, 1), 0, 0.6), ((2, 3), 4, 0.6), ((5, 7), 4, 0.6),
                             ((9, 12), 1, 0.6), ((27, 36), 4, 0.6), ((8, 6), 5, 0.3),
                             ((7, 9), 2, 1.0)]:
        rows, cols = grid
        attn = torch.stack([random_attention(grid, generator) for _ in range(8)])
        sizes = torch.tensor([[rows * P - 5, cols * P - 9]] * 8)
        out = dinoseg(attn, grid, P, sizes, head, mass, variant)
        for i in range(8):
            total += 1
            ref = dinoseg_reference(attn[i], grid, P, tuple(sizes[i].tolist()), head, mass,
                                    variant)
            # robust: no cumulative mass within float32 rounding of the threshold
            values = torch.sort(attn[i, :, head]).values.double()
            cumulative = torch.cumsum(values / values.sum(), 0)
            if bool(((cumulative - (1 - mass)).abs() < 1e-5).any()):
                continue
            assert out.box[i].tolist() == ref.box.tolist(), (grid, i)
            assert torch.equal(out.mask[i], ref.mask), (grid, i)
            checked += 1
    assert checked >= 0.9 * total, f"only {checked}/{total} random maps were robust"


def test_entry_run_and_reference_match_the_functions() -> None:
    spec = get_method("dinoseg")
    attn = torch.stack([random_attention((4, 6), torch.Generator().manual_seed(s))
                        for s in range(3)])
    sizes = torch.tensor([[50, 80]] * 3)
    params = spec.resolve({"dinoseg_head": 2, "dinoseg_variant": "corrected"})
    out = spec.run(attn, (4, 6), P, sizes, params)
    plain = dinoseg(attn, (4, 6), P, sizes, 2, 0.6, "corrected")
    assert torch.equal(out.box, plain.box) and torch.equal(out.mask, plain.mask)
    assert out.seed.tolist() == [-1, -1, -1] and out.box.dtype == torch.long
    ref = spec.reference(attn[1], (4, 6), P, (50, 80), params)
    assert torch.equal(ref.box, out.box[1]) and torch.equal(ref.mask, out.mask[1])

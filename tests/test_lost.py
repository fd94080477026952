"""LOST exactness: hand-computed cases, properties, and batched == per-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lostreg.methods.geometry import seed_component
from lostreg.methods.lost import lost, lost_reference

P = 16


def planted(grid: tuple[int, int], object_cells: list[tuple[int, int]], dim: int = 4) -> torch.Tensor:
    """Background patches get e0, object patches e1: similarities are 1 within a group, 0
    across, so degrees and the mask can be worked out by hand."""
    rows, cols = grid
    feats = torch.zeros(rows * cols, dim)
    feats[:, 0] = 1.0
    for r, c in object_cells:
        feats[r * cols + c] = 0.0
        feats[r * cols + c, 1] = 1.0
    return feats


# Grid 4x5; object patches: (0,0), (1,1) touching it only diagonally, and a 2x2 blob.
OBJECT = [(0, 0), (1, 1), (2, 3), (2, 4), (3, 3), (3, 4)]


def test_hand_case_seed_degree_and_four_connectivity() -> None:
    feats = planted((4, 5), OBJECT)
    box, seed, degrees = lost(feats, (4, 5), P, (64, 80))
    # object patches have 5 positive neighbours, background ones 13 (diagonal excluded)
    expected_degrees = torch.full((20,), 13)
    for r, c in OBJECT:
        expected_degrees[r * 5 + c] = 5
    assert torch.equal(degrees, expected_degrees)
    assert seed == 0  # ties among the six object patches go to the lowest index
    # the mask holds all six object patches, but (1,1) touches (0,0) only diagonally:
    # with 4-connectivity the seed's component is its own patch (8-connectivity: 32x32 box)
    assert box == [0, 0, 16, 16]
    assert lost_reference(feats, (4, 5), P, (64, 80)).box == box


def test_hand_case_box_of_blob_clipped_to_image() -> None:
    cells = [(2, 3), (2, 4), (3, 3), (3, 4)]
    feats = planted((4, 5), cells)
    box, seed, _ = lost(feats, (4, 5), P, (60, 75))  # padded 64x80, image 60x75
    assert seed == 2 * 5 + 3
    assert box == [48, 32, 75, 60]  # (col_max+1)*16 = 80 clipped to W=75, 64 to H=60


def test_k_patches_limits_seed_expansion() -> None:
    # one 1x3 object: with k=1 only the seed's own row of A is summed
    feats = planted((3, 4), [(1, 0), (1, 1), (1, 2)])
    # make patch (1,2) also similar to background so it has a high degree
    feats[1 * 4 + 2, 0] = 0.5
    box_k1, seed, _ = lost(feats, (3, 4), P, (48, 64), k_patches=1)
    assert seed == 4  # (1,0) and (1,1) have degree 2 (tie -> lowest index), (1,2) has 11
    # seed row of A is positive on (1,0), (1,1), (1,2): mask = those 3 -> box 48 wide
    assert box_k1 == [0, 16, 48, 32]
    ref = lost_reference(feats, (3, 4), P, (48, 64), k_patches=1)
    assert ref.box == box_k1 and ref.seed == seed


def test_negative_gram_bias_seed_outside_mask_gives_seed_patch() -> None:
    feats = planted((3, 3), [(1, 1)])
    box, seed, degrees = lost(feats, (3, 3), P, (48, 48), gram_bias=-2.0)
    assert torch.equal(degrees, torch.zeros(9, dtype=degrees.dtype))
    assert seed == 0
    assert box == [0, 0, 16, 16]
    assert lost_reference(feats, (3, 3), P, (48, 48), gram_bias=-2.0).box == box


def test_gram_bias_is_added_before_thresholding() -> None:
    # two orthogonal groups; a positive bias makes every pair similar: all degrees equal,
    # seed 0, mask everything -> full-image box
    feats = planted((2, 3), [(0, 2), (1, 2)])
    box, seed, degrees = lost(feats, (2, 3), P, (32, 48), gram_bias=0.5)
    assert torch.equal(degrees, torch.full((6,), 5, dtype=degrees.dtype))
    assert (seed, box) == (0, [0, 0, 48, 32])


def test_degree_counts_positive_similarities_only() -> None:
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # A = [[1,-1,0,1],[-1,1,0,-1],[0,0,1,1],[1,-1,1,2]]
    _, seed, degrees = lost(feats, (2, 2), P, (32, 32))
    assert degrees.tolist() == [1, 0, 1, 2]
    assert seed == 1


def test_seed_component_matches_scipy_on_random_masks() -> None:
    import scipy.ndimage

    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(64, 9, 13, generator=gen) > 0.45
    seeds = torch.stack([torch.randint(0, 9, (64,), generator=gen),
                         torch.randint(0, 13, (64,), generator=gen)], dim=1)
    component = seed_component(masks, seeds)
    for mask, seed, comp in zip(masks, seeds, component, strict=True):
        labels, _ = scipy.ndimage.label(mask.numpy())
        label = labels[seed[0], seed[1]]
        expected = (labels == label) if label else np.zeros_like(mask.numpy())
        assert np.array_equal(comp.numpy(), expected)


def test_spiral_component_needs_many_propagation_steps() -> None:
    # a long snake: a dilation would need one step per pixel of the path
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 0, :] = True
    mask[0, :, 8] = True
    mask[0, 8, :] = True
    mask[0, 2:, 0] = True
    mask[0, 2, :7] = True
    mask[0, 2:7, 6] = True
    component = seed_component(mask, torch.tensor([[4, 6]]))
    assert torch.equal(component, mask)


@st.composite
def lost_inputs(draw):
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 9))
    batch = draw(st.integers(1, 4))
    dim = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    k = draw(st.integers(1, 120))
    bias = draw(st.sampled_from([0.0, 0.0, 0.3, -0.3]))
    gen = torch.Generator().manual_seed(seed)
    # smooth-ish features: a low-rank field plus noise gives blobs, not salt and pepper
    feats = torch.randn(batch, rows * cols, dim, generator=gen)
    sizes = [(draw(st.integers((rows - 1) * P + 1, rows * P)),
              draw(st.integers((cols - 1) * P + 1, cols * P))) for _ in range(batch)]
    return feats, (rows, cols), sizes, k, bias


@settings(max_examples=150, deadline=None)
@given(lost_inputs())
def test_batched_equals_per_image_reference(inputs) -> None:
    feats, grid, sizes, k, bias = inputs
    batched = lost(feats, grid, P, sizes, k_patches=k, gram_bias=bias)
    for i in range(feats.shape[0]):
        ref = lost_reference(feats[i], grid, P, sizes[i], k_patches=k, gram_bias=bias)
        single = lost(feats[i], grid, P, sizes[i], k_patches=k, gram_bias=bias)
        assert batched.box[i].tolist() == ref.box == single.box
        assert int(batched.seed[i]) == ref.seed == single.seed
        assert torch.equal(batched.degrees[i], ref.degrees)


@settings(max_examples=100, deadline=None)
@given(lost_inputs(), st.floats(0.01, 100.0))
def test_box_properties_and_scale_invariance(inputs, scale) -> None:
    feats, grid, sizes, k, _ = inputs
    rows, cols = grid
    out = lost(feats, grid, P, sizes, k_patches=k)
    scaled = lost(feats * scale, grid, P, sizes, k_patches=k)
    assert torch.equal(out.box, scaled.box) and torch.equal(out.seed, scaled.seed)
    for (x1, y1, x2, y2), seed, (height, width) in zip(out.box.tolist(), out.seed.tolist(),
                                                        sizes, strict=True):
        r, c = divmod(seed, cols)
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert x1 % P == 0 and y1 % P == 0
        # the box contains the seed patch (clipped to the image)
        assert x1 <= c * P and y1 <= r * P
        assert x2 >= min((c + 1) * P, width) and y2 >= min((r + 1) * P, height)


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="grid"):
        lost(torch.randn(10, 4), (3, 3), P, (48, 48))
    with pytest.raises(ValueError, match="image_size"):
        lost(torch.randn(2, 9, 4), (3, 3), P, [(48, 48)] * 3)


def test_half_precision_features_are_upcast() -> None:
    feats = torch.randn(2, 20, 8)
    out32 = lost(feats.half().float(), (4, 5), P, (64, 80))
    out16 = lost(feats.half(), (4, 5), P, (64, 80))
    assert torch.equal(out32.box, out16.box)


def test_chunking_and_component_paths_change_no_result(monkeypatch) -> None:
    """CPU builds similarities a few images at a time and labels with scipy; a GPU builds the
    whole batch and labels components by tensor-op propagation. Every combination gives the
    same output."""
    from lostreg.methods import lost as lost_module

    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(7, 6 * 9, 5, generator=gen)
    sizes = [(90, 140)] * 7
    default = lost(feats, (6, 9), P, sizes, k_patches=20)
    monkeypatch.setattr(lost_module, "_chunk_size", lambda batch, n, device: 1)
    one_at_a_time = lost(feats, (6, 9), P, sizes, k_patches=20)
    from lostreg.methods import geometry

    monkeypatch.setattr(geometry, "_seed_component_scipy", geometry.seed_component)
    propagation = lost(feats, (6, 9), P, sizes, k_patches=20)
    for other in (one_at_a_time, propagation):
        assert torch.equal(default.box, other.box) and torch.equal(default.seed, other.seed)
        assert torch.equal(default.degrees, other.degrees)


def test_similarity_chunks_are_bounded_on_every_device() -> None:
    """A whole (B, N, N) block per batch would not fit a GPU for ViT/8 on COCO-sized images."""
    from lostreg.methods import lost as lost_module

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert lost_module._chunk_size(64, 1000, cuda) == 64  # ViT-S/14 on VOC: the whole batch
    assert lost_module._chunk_size(64, 4800, cuda) == 11  # ViT/8 on COCO: 11 x 88 MiB
    assert lost_module._chunk_size(64, 1000, cpu) == 2
    assert lost_module._chunk_size(64, 20000, cuda) == lost_module._chunk_size(8, 9000, cpu) == 1

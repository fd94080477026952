"""The tensor connected-component path (``component_labels`` / ``seed_component``, LOST's GPU
path), run on the CPU: identical components to ``scipy.ndimage.label`` on random masks and on
shapes built to be slow for propagation (spirals, serpentines, combs), and few rounds on them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lostreg.methods import geometry
from lostreg.methods.geometry import component_labels, seed_component, seed_components

FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def scipy_component(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    labels, _ = scipy.ndimage.label(mask, structure=FOUR)
    label = labels[row, col]
    return labels == label if label else np.zeros_like(mask)


def assert_same_partition(mask: np.ndarray, labels: np.ndarray) -> None:
    """``labels`` (R, C) splits the mask exactly like scipy's labelling, and marks the
    background with R*C."""
    expected, count = scipy.ndimage.label(mask, structure=FOUR)
    assert np.all(labels[~mask] == mask.size)
    pairs = set(zip(expected[mask].tolist(), labels[mask].tolist(), strict=True))
    assert len(pairs) == count == len(set(labels[mask].tolist()))
    # every label points into its own component
    flat = expected.reshape(-1)
    for scipy_label, own in pairs:
        assert flat[own] == scipy_label


def serpentine(rows: int, cols: int) -> torch.Tensor:
    """Full rows joined by one pixel at alternating ends: a single path of ~N/2 pixels."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[::2] = True
    for r in range(1, rows, 2):
        mask[r, cols - 1 if (r // 2) % 2 == 0 else 0] = True
    return mask


def spiral(size: int) -> torch.Tensor:
    """A one-pixel-wide square spiral walled by one-pixel gaps: one long path inwards."""
    mask = np.zeros((size, size), dtype=bool)
    row, col, dr, dc = 0, 0, 0, 1
    mask[0, 0] = True
    while True:
        moved = False
        for _ in range(2):  # try straight on, then a right turn
            ahead = (row + 2 * dr, col + 2 * dc)
            if (0 <= ahead[0] < size and 0 <= ahead[1] < size and not mask[ahead]
                    and not mask[row + dr, col + dc]):
                mask[row + dr, col + dc] = mask[ahead] = True
                row, col = ahead
                moved = True
                break
            dr, dc = dc, -dr
        if not moved:
            return torch.from_numpy(mask)


def comb(rows: int, cols: int) -> torch.Tensor:
    """One spine along the top, teeth down every other column."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[0] = True
    mask[:, ::2] = True
    return mask


def checkerboard(rows: int, cols: int) -> torch.Tensor:
    """Only diagonal contacts: every pixel is its own 4-connected component."""
    return (torch.arange(rows).view(-1, 1) + torch.arange(cols)) % 2 == 0


ADVERSARIAL = {
    "serpentine 27x36": serpentine(27, 36),
    "serpentine 64x64": serpentine(64, 64),
    "serpentine 64x64 turned": serpentine(64, 64).T.contiguous(),
    "serpentine 64x64 reversed": serpentine(64, 64).flip(0, 1).contiguous(),
    "serpentine 250x250 turned": serpentine(250, 250).T.contiguous(),
    "spiral 9": spiral(9),
    "spiral 64": spiral(64),
    "spiral 250": spiral(250),
    "spiral 63 mirrored": spiral(63).flip(1).contiguous(),
    "comb 40x41": comb(40, 41),
    "checkerboard 17x23": checkerboard(17, 23),
    "single pixel": torch.ones(1, 1, dtype=torch.bool),
    "line 1x97": torch.ones(1, 97, dtype=torch.bool),
    "line 97x1": torch.ones(97, 1, dtype=torch.bool),
    "full 30x40": torch.ones(30, 40, dtype=torch.bool),
    "empty 30x40": torch.zeros(30, 40, dtype=torch.bool),
}


def test_the_adversarial_shapes_are_what_they_claim() -> None:
    for name in ("serpentine 64x64", "spiral 64", "spiral 250"):
        mask = ADVERSARIAL[name].numpy()
        labels, count = scipy.ndimage.label(mask, structure=FOUR)
        assert count == 1, name
        # a path: every pixel has at most two 4-neighbours inside the mask
        padded = np.pad(mask, 1)
        neighbours = (padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2]
                      + padded[1:-1, 2:])
        assert neighbours[mask].max() == 2, name
    assert int(ADVERSARIAL["serpentine 64x64"].sum()) >= 64 * 64 // 2
    assert int(ADVERSARIAL["spiral 250"].sum()) > 250 * 250 // 3


def count_rounds(monkeypatch) -> list[int]:
    rounds: list[int] = []
    real = geometry._propagation_round

    def counted(*args):
        rounds.append(1)
        return real(*args)

    monkeypatch.setattr(geometry, "_propagation_round", counted)
    return rounds


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_shapes_equal_scipy_in_few_rounds(name, monkeypatch) -> None:
    mask = ADVERSARIAL[name]
    rows, cols = mask.shape
    rounds = count_rounds(monkeypatch)
    labels = component_labels(mask.unsqueeze(0), check_every=1)
    assert_same_partition(mask.numpy(), labels[0].view(rows, cols).numpy())
    # a 4-neighbour dilation needs one step per pixel of the path (31k on the 250 spiral);
    # label propagation with pointer jumping needs a handful of rounds (+1 to see no change)
    assert len(rounds) <= 6, (name, len(rounds))
    # every seed, inside and outside the mask, gets scipy's component
    seeds = torch.tensor([[0, 0], [rows - 1, cols - 1], [rows // 2, cols // 2], [0, cols - 1]])
    batch = mask.unsqueeze(0).expand(len(seeds), rows, cols)
    for seed_rc, component in zip(seeds, seed_component(batch, seeds), strict=True):
        expected = scipy_component(mask.numpy(), int(seed_rc[0]), int(seed_rc[1]))
        assert np.array_equal(component.numpy(), expected), (name, seed_rc.tolist())


def test_seed_outside_the_mask_gives_an_empty_component() -> None:
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[0, 2, 3] = False
    mask[1] = False
    component = seed_component(mask, torch.tensor([[2, 3], [0, 0]]))
    assert not component.any()
    # and seed_components falls back to the seed's own patch, as the reference does
    boxes, patches = seed_components(mask, torch.tensor([2 * 6 + 3, 0]), 16,
                                     torch.tensor([[80, 96], [80, 96]]))
    assert boxes.tolist() == [[48, 32, 64, 48], [0, 0, 16, 16]]
    assert patches.flatten(1).sum(1).tolist() == [1, 1]


def test_a_batch_mixes_no_labels_between_images() -> None:
    """Image 1 is full and image 0 empty: a wrong batch offset in the hooking would leak."""
    mask = torch.stack([torch.zeros(7, 8, dtype=torch.bool), torch.ones(7, 8, dtype=torch.bool),
                        serpentine(7, 8)])
    labels = component_labels(mask)
    for image in range(3):
        assert_same_partition(mask[image].numpy(), labels[image].view(7, 8).numpy())


@st.composite
def masks_and_seeds(draw):
    rows, cols = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    batch = draw(st.integers(1, 4))
    density = draw(st.sampled_from([0.2, 0.45, 0.55, 0.6, 0.8, 1.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(batch, rows, cols, generator=gen) < density
    seeds = torch.stack([torch.randint(0, rows, (batch,), generator=gen),
                         torch.randint(0, cols, (batch,), generator=gen)], dim=1)
    return mask, seeds, draw(st.integers(1, 5))


@settings(max_examples=200, deadline=None)
@given(masks_and_seeds())
def test_random_masks_equal_scipy(case) -> None:
    mask, seeds, check_every = case
    rows, cols = mask.shape[1:]
    labels = component_labels(mask, check_every)
    component = seed_component(mask, seeds, check_every)
    for image in range(mask.shape[0]):
        assert_same_partition(mask[image].numpy(), labels[image].view(rows, cols).numpy())
        expected = scipy_component(mask[image].numpy(), int(seeds[image, 0]),
                                   int(seeds[image, 1]))
        assert np.array_equal(component[image].numpy(), expected)


def test_check_every_changes_no_result_and_must_be_positive() -> None:
    mask = torch.stack([spiral(31), serpentine(31, 31), checkerboard(31, 31)])
    first = component_labels(mask, 1)
    for check_every in (2, 3, 8):
        assert torch.equal(component_labels(mask, check_every), first)
    with pytest.raises(ValueError, match="check_every"):
        component_labels(mask, 0)


def test_scipy_and_tensor_paths_give_the_same_boxes(monkeypatch) -> None:
    """``seed_components`` routes the CPU to scipy and other devices to the tensor path."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(16, 11, 14, generator=gen) < 0.55
    seed = torch.randint(0, 11 * 14, (16,), generator=gen)
    sizes = torch.tensor([[170, 215]] * 16)
    scipy_boxes, scipy_patches = seed_components(mask, seed, 16, sizes)
    monkeypatch.setattr(geometry, "_seed_component_scipy", geometry.seed_component)
    tensor_boxes, tensor_patches = seed_components(mask, seed, 16, sizes)
    assert torch.equal(scipy_boxes, tensor_boxes) and torch.equal(scipy_patches, tensor_patches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_components_on_the_gpu_equal_the_cpu_with_one_sync() -> None:
    cuda = torch.device("cuda")
    mask = torch.stack([spiral(64), serpentine(64, 64), checkerboard(64, 64),
                        torch.ones(64, 64, dtype=torch.bool)])
    seeds = torch.tensor([[0, 0], [63, 63], [5, 5], [10, 20]])
    expected = seed_component(mask, seeds)
    mask_gpu, seeds_gpu = mask.to(cuda), seeds.to(cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:
            on_gpu = seed_component(mask_gpu, seeds_gpu, check_every=6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) <= 2, [str(w.message) for w in syncs]
    assert torch.equal(on_gpu.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lost_on_the_gpu_syncs_only_to_check_convergence() -> None:
    """A batch of ``lost_with_mask`` on a GPU: the sizes are copied without a sync, and the
    components' convergence check is the only one (one per four rounds)."""
    from lostreg.methods.lost import lost_with_mask

    cuda = torch.device("cuda")
    feats = torch.randn(16, 24 * 32, 64, generator=torch.Generator().manual_seed(0))
    sizes = [(380, 500)] * 16
    expected, expected_mask = lost_with_mask(feats, (24, 32), 16, sizes)
    on_gpu = feats.to(cuda)
    lost_with_mask(on_gpu, (24, 32), 16, sizes)  # lazy initialisation outside the count
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:
            out, mask = lost_with_mask(on_gpu, (24, 32), 16, sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) <= 2, syncs
    assert torch.equal(out.box.cpu(), expected.box) and torch.equal(mask.cpu(), expected_mask)

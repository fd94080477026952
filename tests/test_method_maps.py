"""Each method's output holds what it knows per patch (``MethodOutput.maps``), consistent with
its mask: the box's patches come out of those maps."""

from __future__ import annotations

import torch

from lostreg.methods import get_method

GRID = (5, 7)
P = 8


def _run(name: str, feats: torch.Tensor, **params):
    spec = get_method(name)
    sizes = torch.tensor([[GRID[0] * P, GRID[1] * P]] * feats.shape[0])
    return spec.run(feats, GRID, P, sizes, spec.resolve(params))


def test_lost_maps_hold_degrees_and_the_expansion_around_the_mask() -> None:
    feats = torch.randn(3, GRID[0] * GRID[1], 6, generator=torch.Generator().manual_seed(0))
    out = _run("lost", feats, k_patches=5)
    degree, expansion = out.maps["degree"], out.maps["expansion"]
    assert degree.shape == expansion.shape == out.mask.shape == (3, *GRID)
    flat = degree.flatten(1)
    # the seed is the patch of lowest degree (ties: lowest index)
    assert torch.equal(out.seed, flat.argmin(dim=1))
    # the boxed patches are the seed's component of the expansion (or the seed alone)
    seed_patch = torch.zeros_like(out.mask).flatten(1).scatter_(1, out.seed[:, None], True)
    assert bool((out.mask & ~(expansion | seed_patch.view_as(out.mask))).sum() == 0)


def test_tokencut_maps_hold_the_eigenvector_and_bipartition_around_the_mask() -> None:
    feats = torch.randn(2, GRID[0] * GRID[1], 6, generator=torch.Generator().manual_seed(1))
    out = _run("tokencut", feats)
    vector, part = out.maps["eigenvector"], out.maps["bipartition"]
    assert vector.shape == part.shape == out.mask.shape == (2, *GRID)
    assert bool((out.mask & ~part).sum() == 0)
    # the seed is the largest |v|, on the bipartition's side
    assert torch.equal(out.seed, vector.flatten(1).abs().argmax(dim=1))
    assert bool(part.flatten(1).gather(1, out.seed[:, None]).all())


def test_dinoseg_maps_hold_the_thresholded_attention() -> None:
    attn = torch.rand(2, GRID[0] * GRID[1], 6, generator=torch.Generator().manual_seed(2))
    out = _run("dinoseg", attn, dinoseg_variant="corrected", dinoseg_head=0)
    kept = out.maps["kept"]
    assert kept.shape == out.mask.shape == (2, *GRID) and kept.dtype == torch.bool
    assert bool((out.mask & ~kept).sum() == 0)  # the corrected variant boxes a kept component
    assert bool(kept.any())

"""One Gram matrix for a whole sweep: ``lost_many`` equals one ``lost`` call per setting."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lostreg.methods import get_method
from lostreg.methods.lost import lost_many, lost_with_mask

P = 14
BIASES = (0.0, -0.1, 0.1, -0.3, 0.2, -1e-7, 0.05)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 7), st.integers(2, 7), st.integers(1, 9),
       st.integers(0, 10_000), st.lists(st.sampled_from(BIASES), min_size=1, max_size=5),
       st.lists(st.integers(1, 60), min_size=1, max_size=3), st.booleans())
def test_many_settings_equal_one_call_each(batch, rows, cols, dim, seed, biases, ks,
                                           integer) -> None:
    """Random and small-integer features (integer ones make similarities tie at exactly the
    bias, where ``fl(a + b) > 0`` and ``a > -b`` must still agree)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, rows * cols, dim, generator=gen)
    if integer:
        feats = torch.randint(-2, 3, feats.shape, generator=gen).float() / 10
    sizes = [(rows * P - 3, cols * P - 5)] * batch
    settings_ = [(b, k) for b in biases for k in ks]
    together = lost_many(feats, (rows, cols), P, sizes, settings_)
    for (bias, k), (out, mask) in zip(settings_, together, strict=True):
        alone, alone_mask = lost_with_mask(feats, (rows, cols), P, sizes, k, bias)
        assert torch.equal(out.box, alone.box) and torch.equal(out.seed, alone.seed)
        assert torch.equal(out.degrees, alone.degrees) and torch.equal(mask, alone_mask)


def test_the_registry_serves_a_sweep_through_run_many() -> None:
    spec = get_method("lost")
    feats = torch.randn(3, 30, 8, generator=torch.Generator().manual_seed(2))
    sizes = torch.tensor([[70, 84]] * 3)
    params = [spec.resolve({"gram_bias": b, "k_patches": k}) for b in (0.0, -0.2) for k in (5, 50)]
    many = spec.run_all(feats, (5, 6), P, sizes, params)
    for p, out in zip(params, many, strict=True):
        one = spec.run(feats, (5, 6), P, sizes, p)
        assert torch.equal(out.box, one.box) and torch.equal(out.mask, one.mask)

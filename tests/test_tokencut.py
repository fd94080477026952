"""TokenCut exactness: hand-computed graphs, sign handling, degenerate conventions, and the
batched solvers (dense and squaring) against the per-image scipy reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lostreg.errors import LostregError
from lostreg.methods import get_method
from lostreg.methods import tokencut as tokencut_module
from lostreg.methods.tokencut import (
    bipartition,
    fiedler_vectors,
    reference_eigenpair,
    reference_robustness,
    tokencut,
    tokencut_reference,
    tokencut_weights,
)

P = 14
SOLVERS = ("subset", "dense", "squaring")


def two_groups(grid: tuple[int, int], object_cells: list[tuple[int, int]],
               dim: int = 6) -> torch.Tensor:
    """Background patches get e0, object patches e1: cosine 1 within a group, 0 across."""
    rows, cols = grid
    feats = torch.zeros(rows * cols, dim)
    feats[:, 0] = 1.0
    for r, c in object_cells:
        feats[r * cols + c] = 0.0
        feats[r * cols + c, 1] = 1.0
    return feats


def noisy_object(grid: tuple[int, int], dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random rectangle whose features point away from the background's, plus noise of a
    random strength: the spectra range from a clear cut to nearly degenerate."""
    rows, cols = grid
    directions = torch.randn(2, dim, generator=generator)
    r0, r1 = sorted(torch.randint(0, rows + 1, (2,), generator=generator).tolist())
    c0, c1 = sorted(torch.randint(0, cols + 1, (2,), generator=generator).tolist())
    inside = torch.zeros(rows, cols, dtype=torch.bool)
    inside[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True
    mean = torch.where(inside.view(-1, 1), directions[1], directions[0])
    noise = 0.25 + float(torch.rand((), generator=generator))
    return mean + noise * torch.randn(rows * cols, dim, generator=generator)


# --- the registry entry and its parameters ---------------------------------------------------


def test_entry_defaults_flags_and_feature() -> None:
    spec = get_method("tokencut")
    assert spec.defaults() == {"tau": 0.2, "eps": 1e-5, "binary_graph": True}
    flags = {p.name: (p.cli_flag, p.switch) for p in spec.params}
    assert flags["binary_graph"] == ("--no-binary-graph", False)
    assert flags["tau"][0] == "--tau" and flags["eps"][0] == "--eps"
    assert spec.default_feature == "k" and spec.feature_kinds is None
    assert spec.feature_for(None, "q") == "k" and spec.feature_for("v", "k") == "v"
    assert spec.identity(spec.resolve({})) == {
        "method": "tokencut",
        "method_params": {"binary_graph": True, "eps": 1e-5, "tau": 0.2}}
    assert spec.resolve({"binary_graph": "false", "tau": "0.3"}) == {
        "tau": 0.3, "eps": 1e-5, "binary_graph": False}


@pytest.mark.parametrize(("values", "message"), [
    ({"tau": math.nan}, "--tau nan: must be a finite number"),
    ({"tau": "inf"}, "--tau inf: must be a finite number"),
    ({"eps": 0.0}, "--eps 0.0: must be a positive number"),
    ({"eps": -1e-5}, "--eps -1e-05: must be a positive number"),
    ({"tau": "x"}, "--tau 'x': not a valid value for tokencut"),
    ({"binary_graph": "maybe"}, "--no-binary-graph 'maybe': not a valid value"),
    ({"binary_graph": False, "tau": 0.0}, "--tau 0.0 with --no-binary-graph: must be positive"),
])
def test_bad_parameters_are_one_line(values: dict, message: str) -> None:
    with pytest.raises(LostregError, match=message.replace("(", r"\(")) as info:
        get_method("tokencut").resolve(values)
    assert "\n" not in str(info.value)


# --- the graph, by hand --------------------------------------------------------------------------


def test_graph_weights_by_hand_diagonal_and_threshold_equality() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 0.0]]).unsqueeze(0)
    unit = torch.nn.functional.normalize(feats[0], p=2, dim=-1)
    at_tau = float((unit @ unit.T)[0, 1])  # ~0.6: the threshold itself, in float32
    eps = 1e-5
    binary = tokencut_weights(feats, at_tau, eps, True)[0]
    # the diagonal is an edge (self-similarity 1 > tau), sim == tau is not (strict >), and a
    # zero feature (normalised to zero) has similarity 0 to everything, itself included
    expected = torch.tensor([[1, eps, eps, eps], [eps, 1, 1, eps], [eps, 1, 1, eps],
                             [eps, eps, eps, eps]], dtype=torch.float64)
    assert binary.dtype == torch.float64 and torch.equal(binary, expected)
    raw = tokencut_weights(feats, at_tau, eps, False)[0]
    # --no-binary-graph: A[A < tau] = eps, so sim == tau keeps its own value; eps is float32
    e32 = float(torch.tensor(eps, dtype=torch.float32))
    sim12 = float((unit @ unit.T)[1, 2])
    expected_raw = torch.tensor([[1, at_tau, e32, e32], [at_tau, 1, sim12, e32],
                                 [e32, sim12, 1, e32], [e32, e32, e32, e32]], dtype=torch.float64)
    assert torch.allclose(raw, expected_raw, rtol=0, atol=1e-7)
    assert raw[0, 1] == at_tau and raw[0, 2] == e32
    # non-finite similarities count as below tau instead of poisoning the solve
    nan = tokencut_weights(torch.full((1, 3, 2), math.nan), 0.2, eps, False)
    assert torch.equal(nan, torch.full((1, 3, 3), e32, dtype=torch.float64))


# --- hand-computed cuts --------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["reference", *SOLVERS])
def test_planted_object_is_the_cut_and_the_box_is_clipped(solver: str) -> None:
    # 5x7 grid, image 60x90 (padded 70x98): a 3x3 object at rows 2-4, cols 4-6. Two cliques
    # joined by eps: the Fiedler vector is constant on each, |v| larger on the smaller one
    # (v_obj n_obj^2 = -v_bg n_bg^2 from v^T D 1 = 0), so the seed and the cut are the object.
    cells = [(r, c) for r in range(2, 5) for c in range(4, 7)]
    feats = two_groups((5, 7), cells)
    if solver == "reference":
        out = tokencut_reference(feats, (5, 7), P, (60, 90))
        box, seed, mask = out.box, int(out.seed), out.mask
    else:
        out = tokencut(feats.unsqueeze(0), (5, 7), P, torch.tensor([[60, 90]]), solver=solver)
        box, seed, mask = out.box[0], int(out.seed[0]), out.mask[0]
    assert box.tolist() == [4 * P, 2 * P, 90, 60]  # (6+1)*14 = 98 -> 90, (4+1)*14 = 70 -> 60
    # the object's |v| are tied: the reference picks among them by rounding, the batched
    # path takes the lowest index (SEED_TIE)
    assert divmod(seed, 7) in cells and (solver == "reference" or seed == 2 * 7 + 4)
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[2:5, 4:7] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("solver", ["reference", *SOLVERS])
def test_cut_side_is_the_seed_side_and_its_component_is_4_connected(solver: str) -> None:
    # the object is two blobs touching only diagonally: both are on the seed's side of the
    # cut, only the seed's 4-connected blob is boxed; the other blob is the larger one, so
    # the seed (first largest |v|, all object entries equal) lies in the first blob in order
    first = [(0, 0), (0, 1)]
    second = [(1, 2), (2, 2), (2, 3)]
    feats = two_groups((4, 6), first + second)
    if solver == "reference":
        out = tokencut_reference(feats, (4, 6), P, (56, 84))
        box, mask = out.box, out.mask
    else:
        out = tokencut(feats.unsqueeze(0), (4, 6), P, torch.tensor([[56, 84]]), solver=solver)
        box, mask = out.box[0], out.mask[0]
    # the batched path's seed is the lowest tied index, (0, 0): the first blob
    seed_blob = first if mask[0, 0] else second
    assert solver == "reference" or seed_blob == first
    assert int(mask.sum()) == len(seed_blob)
    rows = [r for r, _ in seed_blob]
    cols = [c for _, c in seed_blob]
    assert box.tolist() == [min(cols) * P, min(rows) * P, (max(cols) + 1) * P,
                            (max(rows) + 1) * P]


# --- sign handling ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-6, 6), min_size=3, max_size=12))
def test_bipartition_is_independent_of_the_eigenvector_sign(values: list[int]) -> None:
    vector = torch.tensor(values, dtype=torch.float64).unsqueeze(0) / 7.0
    seed, part = bipartition(vector)
    seed_neg, part_neg = bipartition(-vector)
    assert int(seed) == int(seed_neg) and torch.equal(part, part_neg)
    assert bool(part[0, seed[0]])
    centred = vector - vector.mean()
    if float(centred[0, seed[0]]) == 0:  # constant: never an eigenvector; every patch
        assert bool(part.all())
        return
    # strictly the seed's side: patches exactly at the mean are never taken
    assert not bool(part[centred == 0].any())
    # the reference's rule for the sign that puts the seed above the mean
    if float(centred[0, seed[0]]) > 0:
        assert torch.equal(part, vector > vector.mean())


def test_seed_ties_go_to_the_lowest_index_whatever_the_rounding() -> None:
    # |v| tied to 1e-12 at patches 1 and 3 (opposite signs: opposite sides of the mean):
    # the seed is patch 1 for either rounding and either sign, and so is the cut
    for wobble in (1e-12, -1e-12):
        vector = torch.tensor([[0.1, -0.5, 0.2, 0.5 * (1 + wobble), 0.05, -0.3]],
                              dtype=torch.float64)
        for sign in (1, -1):
            seed, part = bipartition(sign * vector)
            assert int(seed) == 1
            assert part.tolist() == [[False, True, False, False, False, True]]
    # beyond the tie tolerance the larger one wins
    seed, _ = bipartition(torch.tensor([[0.1, -0.5, 0.2, 0.5 * (1 + 1e-6)]], dtype=torch.float64))
    assert int(seed) == 3


def test_solvers_agree_on_tied_seeds_in_different_components() -> None:
    # patches similar to nothing but themselves all have the same v: whichever solver runs,
    # the seed is the first of them and the box its own patch
    generator = torch.Generator().manual_seed(6)
    feats = torch.randn(3, 30, 64, generator=generator)  # near-orthogonal: no edge > 0.2
    feats[:, :12] = feats[:, :1] + 0.05 * torch.randn(3, 12, 64, generator=generator)
    sizes = torch.tensor([[70, 84]] * 3)
    dense = tokencut(feats, (5, 6), P, sizes, solver="dense")
    for solver in ("squaring", "subset"):
        other = tokencut(feats, (5, 6), P, sizes, solver=solver)
        assert torch.equal(dense.seed, other.seed) and torch.equal(dense.box, other.box)
        assert torch.equal(dense.mask, other.mask)


def test_reference_is_unchanged_when_lapack_returns_the_other_sign(monkeypatch) -> None:
    feats = noisy_object((6, 8), 16, torch.Generator().manual_seed(5))
    plain = tokencut_reference(feats, (6, 8), P, (84, 112))
    import scipy.linalg  # the module imports it where used, so the patch reaches it

    original = scipy.linalg.eigh

    def flipped(*args, **kwargs):
        values, vectors = original(*args, **kwargs)
        return values, -vectors

    monkeypatch.setattr(scipy.linalg, "eigh", flipped)
    other = tokencut_reference(feats, (6, 8), P, (84, 112))
    assert torch.equal(plain.box, other.box) and torch.equal(plain.mask, other.mask)
    assert int(plain.seed) == int(other.seed)


# --- batched == reference on random robust cases ------------------------------------------------


GRIDS = [(3, 1), (2, 3), (4, 5), (5, 7), (7, 6), (6, 9)]


@pytest.mark.parametrize("binary_graph", [True, False])
@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_equals_reference_on_every_robust_random_case(solver: str, binary_graph: bool,
                                                              one_thread) -> None:
    generator = torch.Generator().manual_seed(11 if binary_graph else 12)
    tau, eps = (0.2, 1e-5) if binary_graph else (0.3, 1e-4)
    checked = seeds = total = 0
    for grid in GRIDS:
        rows, cols = grid
        feats = torch.stack([noisy_object(grid, 12, generator) for _ in range(10)])
        sizes = torch.tensor([[rows * P - 3, cols * P - 5]] * 10)
        out = tokencut(feats, grid, P, sizes, tau, eps, binary_graph, solver=solver)
        for i in range(10):
            total += 1
            ref = tokencut_reference(feats[i], grid, P, tuple(sizes[i].tolist()), tau, eps,
                                     binary_graph)
            box_ok, seed_ok = reference_robustness(feats[i], ref.mask, tau, eps,
                                                   binary_graph)
            if box_ok:
                assert torch.equal(out.box[i], ref.box), (grid, i)
                assert torch.equal(out.mask[i], ref.mask), (grid, i)
                checked += 1
            if seed_ok:
                assert int(out.seed[i]) == int(ref.seed), (grid, i)
                seeds += 1
    assert checked >= 0.8 * total, f"only {checked}/{total} random cases were robust"
    assert seeds >= 0.5 * total, f"only {seeds}/{total} random cases had a unique seed"


def test_solvers_give_the_same_vectors_up_to_sign(one_thread) -> None:
    generator = torch.Generator().manual_seed(3)
    feats = torch.stack([noisy_object((6, 7), 10, generator) for _ in range(8)])
    weights = tokencut_weights(feats, 0.2, 1e-5, True)
    dense, squared = fiedler_vectors(weights, "dense"), fiedler_vectors(weights, "squaring")
    subset = fiedler_vectors(weights, "subset")
    sign = torch.sign((dense * squared).sum(dim=1, keepdim=True))
    degrees = weights.sum(-1)
    assert torch.allclose(((degrees * dense * dense).sum(1)), torch.ones(8, dtype=torch.float64))
    for i in range(8):
        pair = reference_eigenpair(feats[i], 0.2, 1e-5, True)
        if pair.eigenvalues[1] - pair.eigenvalues[0] > 1e-3 * pair.eigenvalues[1]:
            assert torch.allclose(dense[i], sign[i] * squared[i], rtol=0, atol=1e-9)
            assert torch.allclose(dense[i].abs(), subset[i].abs(), rtol=0, atol=1e-9)
            ref = torch.from_numpy(pair.vector)
            assert torch.allclose(dense[i].abs(), ref.abs(), rtol=0, atol=1e-9)


# --- degenerate inputs: conventions, never a crash --------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1)])
def test_fewer_than_three_patches_box_the_whole_image(grid: tuple[int, int]) -> None:
    rows, cols = grid
    size = (rows * P - 4, cols * P - 1)
    feats = torch.randn(2, rows * cols, 5, generator=torch.Generator().manual_seed(0))
    out = tokencut(feats, grid, P, torch.tensor([size, size]))
    ref = tokencut_reference(feats[0], grid, P, size)
    for box, seed, mask in [(out.box[0], out.seed[0], out.mask[0]), (ref.box, ref.seed, ref.mask)]:
        assert box.tolist() == [0, 0, size[1], size[0]]
        assert int(seed) == 0 and bool(mask.all()) and mask.shape == grid


def test_three_patches_run_the_cut() -> None:
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    out = tokencut(feats.unsqueeze(0), (1, 3), P, torch.tensor([[14, 40]]))
    ref = tokencut_reference(feats, (1, 3), P, (14, 40))
    # the odd patch out (2) has the larger |v|: it is the object, clipped to W = 40
    assert out.box[0].tolist() == ref.box.tolist() == [28, 0, 40, 14]


def test_degenerate_spectrum_falls_back_to_the_dense_solver(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(4)
    good = two_groups((4, 5), [(1, 1), (1, 2), (2, 1)])
    identical = torch.ones(20, 6)  # every edge weighs 1: lambda_2 = ... = lambda_N
    feats = torch.stack([good, identical, torch.zeros(20, 6), noisy_object((4, 5), 6, generator)])
    calls = []
    dense = tokencut_module._dense_second

    def counting(normalized):
        calls.append(normalized.shape[0])
        return dense(normalized)

    monkeypatch.setattr(tokencut_module, "_dense_second", counting)
    sizes = torch.tensor([[50, 70]] * 4)
    out = tokencut(feats, (4, 5), P, sizes, solver="squaring")
    assert calls == [2]  # the two degenerate images, solved together by eigh
    for i in range(4):
        assert bool(out.mask[i].flatten()[out.seed[i]])
        assert 0 <= out.box[i, 0] < out.box[i, 2] <= 70 and 0 <= out.box[i, 1] < out.box[i, 3] <= 50
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[1, 1:3] = expected[2, 1] = True
    assert torch.equal(out.mask[0], expected)


def test_nonfinite_features_do_not_crash_the_batched_path() -> None:
    feats = torch.full((2, 12, 4), math.nan)
    feats[1] = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    for binary_graph in (True, False):
        out = tokencut(feats, (3, 4), P, torch.tensor([[42, 56]] * 2), 0.2, 1e-5, binary_graph)
        assert out.box.shape == (2, 4) and bool(out.mask.flatten(1).any(1).all())


def test_entry_run_and_reference_match_the_functions() -> None:
    spec = get_method("tokencut")
    generator = torch.Generator().manual_seed(8)
    feats = torch.stack([noisy_object((5, 6), 8, generator) for _ in range(3)])
    sizes = torch.tensor([[70, 84]] * 3)
    params = spec.resolve({"tau": 0.25})
    out = spec.run(feats, (5, 6), P, sizes, params)
    plain = tokencut(feats, (5, 6), P, sizes, tau=0.25)
    assert torch.equal(out.box, plain.box) and torch.equal(out.mask, plain.mask)
    ref = spec.reference(feats[0], (5, 6), P, (70, 84), params)
    assert torch.equal(ref.box, tokencut_reference(feats[0], (5, 6), P, (70, 84), 0.25).box)
    assert out.box.dtype == torch.long and out.seed.dtype == torch.long


def test_robustness_rejects_degenerate_spectra_and_tied_seeds() -> None:
    identical = torch.ones(12, 4)  # lambda_2 = lambda_3: no defined eigenvector
    assert reference_robustness(identical, torch.ones(3, 4, dtype=torch.bool)) == (False, False)
    cells = [(1, 1), (1, 2), (2, 1)]
    feats = two_groups((4, 5), cells)  # a clear cut, but the object's |v| are all tied
    ref = tokencut_reference(feats, (4, 5), P, (56, 70))
    assert reference_robustness(feats, ref.mask) == (True, False)
    outside = ~ref.mask  # the tied candidates are not all in this component
    assert reference_robustness(feats, outside) == (False, False)

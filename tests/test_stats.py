"""Bootstrap intervals and the exact McNemar test against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from lostreg.evaluation import stats


def _hits(n_hits: int, n: int, seed: int = 0) -> np.ndarray:
    hits = np.zeros(n, dtype=bool)
    hits[:n_hits] = True
    return np.random.default_rng(seed).permutation(hits)


def _direct_bootstrap(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """One resample at a time, the textbook way."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for i in range(n_resamples):
        out[i] = 100.0 * values[rng.integers(0, values.size, size=values.size)].mean()
    return out


def test_corloc_percent() -> None:
    assert stats.corloc_percent([True, False, True, True]) == 75.0
    assert stats.corloc_percent(np.array([1, 0], dtype=np.uint8)) == 50.0
    assert math.isnan(stats.corloc_percent([]))


def test_bootstrap_ci_degenerate_cases() -> None:
    assert stats.bootstrap_corloc_ci(np.ones(50, dtype=bool)) == (100.0, 100.0)
    assert stats.bootstrap_corloc_ci(np.zeros(50, dtype=bool)) == (0.0, 0.0)
    low, high = stats.bootstrap_corloc_ci([])
    assert math.isnan(low) and math.isnan(high)


def test_bootstrap_ci_matches_direct_computation() -> None:
    hits = _hits(37, 90)
    direct = _direct_bootstrap(hits.astype(float), 2000, seed=7)
    expected = tuple(np.percentile(direct, [2.5, 97.5]))
    got = stats.bootstrap_corloc_ci(hits, n_resamples=2000, seed=7)
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[0] < 100 * 37 / 90 < got[1]
    # other confidence levels use the matching percentiles
    got90 = stats.bootstrap_corloc_ci(hits, n_resamples=2000, confidence=0.9, seed=7)
    assert got90 == pytest.approx(tuple(np.percentile(direct, [5, 95])), abs=1e-9)


def test_bootstrap_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    hits = _hits(120, 301, seed=3)
    whole = stats.bootstrap_corloc_ci(hits, n_resamples=500, seed=11)
    monkeypatch.setattr(stats, "_MAX_CELLS", 301 * 7)  # 7 resamples per chunk, ragged tail
    assert stats.bootstrap_corloc_ci(hits, n_resamples=500, seed=11) == whole


def test_bootstrap_width_is_close_to_the_binomial_standard_error() -> None:
    n = 1000
    low, high = stats.bootstrap_corloc_ci(_hits(500, n))
    normal_width = 2 * 1.959964 * 100 * math.sqrt(0.25 / n)
    assert high - low == pytest.approx(normal_width, rel=0.06)
    assert low < 50.0 < high


def test_paired_bootstrap_matches_direct_computation() -> None:
    base, other = _hits(40, 100, seed=1), _hits(55, 100, seed=2)
    rng = np.random.default_rng(5)
    diffs = []
    for _ in range(1500):
        idx = rng.integers(0, 100, size=100)
        diffs.append(100.0 * (other[idx].mean() - base[idx].mean()))
    expected = tuple(np.percentile(diffs, [2.5, 97.5]))
    got = stats.paired_bootstrap_diff_ci(base, other, n_resamples=1500, seed=5)
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[0] < 15.0 < got[1]


def test_paired_bootstrap_of_identical_runs_is_zero() -> None:
    hits = _hits(30, 80)
    assert stats.paired_bootstrap_diff_ci(hits, hits) == (0.0, 0.0)


def test_paired_bootstrap_of_a_constant_shift() -> None:
    # other hits everything base hits plus 10 more of 50 images: every resample moves by
    # (number of those 10 drawn) / 50, never below 0
    base = np.zeros(50, dtype=bool)
    base[:20] = True
    other = base.copy()
    other[20:30] = True
    low, high = stats.paired_bootstrap_diff_ci(base, other)
    assert 0.0 < low < 20.0 < high < 40.0


def _hand_mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar: twice the smaller binomial tail at p = 1/2, capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _pairs(b: int, c: int, both: int = 5, neither: int = 4) -> tuple[np.ndarray, np.ndarray]:
    base = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    other = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    return base, other


@pytest.mark.parametrize(("b", "c"), [(12, 3), (3, 12), (0, 6), (7, 7), (1, 0), (40, 25)])
def test_mcnemar_matches_hand_computation_and_statsmodels(b: int, c: int) -> None:
    base, other = _pairs(b, c)
    result = stats.mcnemar_exact(base, other)
    assert (result.miss_to_hit, result.hit_to_miss) == (b, c)
    assert result.p_value == pytest.approx(_hand_mcnemar(b, c), rel=1e-9)
    table = [[5, c], [b, 4]]  # rows: base hit/miss; columns: other hit/miss
    assert result.p_value == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9)


def test_mcnemar_without_discordant_pairs() -> None:
    base, other = _pairs(0, 0)
    assert stats.mcnemar_exact(base, other) == stats.McNemarResult(0, 0, 1.0)


def test_mcnemar_known_value() -> None:
    # 12 vs 3 discordant: p = 2 * (1 + 15 + 105 + 455) / 2**15
    base, other = _pairs(12, 3)
    assert stats.mcnemar_exact(base, other).p_value == pytest.approx(1152 / 32768)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="length"):
        stats.mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError, match="0/1"):
        stats.bootstrap_corloc_ci([0, 2, 1])
    with pytest.raises(ValueError, match="1-D"):
        stats.corloc_percent(np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_corloc_ci([True, False], confidence=1.5)

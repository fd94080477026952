"""Uncertainty for CorLoc: bootstrap intervals and the exact McNemar test on paired images.

CorLoc is a mean of per-image hits, so its sampling error comes from *which images* were drawn:
the bootstrap resamples images. Two backbones scored on the same images are paired, and a paired
test (McNemar: only images where they disagree carry information) is far more sensitive than
comparing two independent intervals. Every function is pure: arrays in, numbers out, fixed seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from lostreg.evaluation.corloc import corloc

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
# resampled index matrices are drawn in chunks of at most this many cells (8 bytes each)
_MAX_CELLS = 4_000_000


@dataclass(frozen=True)
class McNemarResult:
    """Discordant pairs of a paired comparison and the exact two-sided p-value."""

    miss_to_hit: int  # base missed, other hit
    hit_to_miss: int  # base hit, other missed
    p_value: float


def as_hits(hits: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Per-image hits as a 1-D bool array (refuses anything that is not 0/1)."""
    array = np.asarray(hits)
    if array.ndim != 1:
        raise ValueError(f"hits must be 1-D, got shape {array.shape}")
    if array.dtype != bool:
        if array.size and not np.isin(array, (0, 1)).all():
            raise ValueError("hits must be booleans or 0/1")
        array = array.astype(bool)
    return array


def _paired(base: Sequence[bool] | np.ndarray,
            other: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_hits(base), as_hits(other)
    if a.shape != b.shape:
        raise ValueError(f"paired hits differ in length: {a.size} vs {b.size}")
    return a, b


def corloc_percent(hits: Sequence[bool] | np.ndarray) -> float:
    """CorLoc in percent (NaN for no images), as ``lostreg.evaluation.corloc.corloc`` computes it."""
    return corloc(as_hits(hits).tolist())[0]


def resample_indices(n: int, n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``range(n)`` as ``(m, n)`` index chunks.

    Chunking bounds memory on 20k-image datasets; the random stream is the same as drawing all
    ``n_resamples`` rows at once (or one row at a time) from ``default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _MAX_CELLS // max(n, 1))
    done = 0
    while done < n_resamples:
        m = min(rows, n_resamples - done)
        yield rng.integers(0, n, size=(m, n))
        done += m


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_means(values: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED) -> np.ndarray:
    """Mean of ``values`` over each bootstrap resample of its entries, ``(n_resamples,)``."""
    values = np.asarray(values, dtype=np.float64)
    return np.concatenate([values[idx].mean(axis=1)
                           for idx in resample_indices(values.size, n_resamples, seed)])


def bootstrap_corloc_ci(hits: Sequence[bool] | np.ndarray, n_resamples: int = DEFAULT_RESAMPLES,
                        confidence: float = 0.95,
                        seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of CorLoc (percent), resampling images."""
    array = as_hits(hits)
    if not array.size:
        return float("nan"), float("nan")
    return _percentile_interval(100.0 * bootstrap_means(array, n_resamples, seed), confidence)


def paired_bootstrap_diff_ci(base: Sequence[bool] | np.ndarray,
                             other: Sequence[bool] | np.ndarray,
                             n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                             seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile interval of ``CorLoc(other) - CorLoc(base)`` in points.

    Both runs are resampled with the *same* images, so the interval reflects only how the two
    disagree, not how hard the drawn images happen to be.
    """
    a, b = _paired(base, other)
    if not a.size:
        return float("nan"), float("nan")
    per_image = b.astype(np.int8) - a.astype(np.int8)
    return _percentile_interval(100.0 * bootstrap_means(per_image, n_resamples, seed),
                                confidence)


def mcnemar_exact(base: Sequence[bool] | np.ndarray,
                  other: Sequence[bool] | np.ndarray) -> McNemarResult:
    """Exact McNemar test: under H0 each discordant image is a fair coin between the two runs.

    Two-sided binomial test on the discordant pairs; p = 1 when there are none.
    """
    a, b = _paired(base, other)
    miss_to_hit = int(np.count_nonzero(~a & b))
    hit_to_miss = int(np.count_nonzero(a & ~b))
    discordant = miss_to_hit + hit_to_miss
    if discordant == 0:
        return McNemarResult(0, 0, 1.0)
    p_value = binomtest(miss_to_hit, discordant, 0.5, alternative="two-sided").pvalue
    return McNemarResult(miss_to_hit, hit_to_miss, float(min(1.0, p_value)))


@dataclass(frozen=True)
class PairedMeanDiff:
    """A paired bootstrap comparison of a continuous per-image score (IoU of masks): the mean
    difference ``other - base`` with its percentile interval, and a two-sided bootstrap p."""

    n: int
    mean_diff: float
    low: float
    high: float
    p_value: float


def paired_bootstrap_mean_diff(base: Sequence[float] | np.ndarray,
                               other: Sequence[float] | np.ndarray,
                               n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                               seed: int = DEFAULT_SEED) -> PairedMeanDiff:
    """Paired bootstrap of ``mean(other - base)`` over images, the continuous counterpart of
    ``mcnemar_exact`` (the saliency metric's ``paired_test="bootstrap"``).

    Both scores of an image are resampled together (the same index stream as every other
    interval here: ``resample_indices``, seed 0), so the interval reflects only how the two
    runs differ. ``p_value`` inverts the percentile interval: twice the smaller share of
    resampled means on either side of 0 (ties count on both sides), at least
    ``2 / n_resamples`` and at most 1; it is an approximation, as every bootstrap p is.
    NaN scores are refused: the caller says which images it left out and why.
    """
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired scores must be 1-D and equal in length: {a.shape} vs {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("paired scores must not be NaN")
    if not a.size:
        return PairedMeanDiff(0, float("nan"), float("nan"), float("nan"), float("nan"))
    diff = b - a
    means = bootstrap_means(diff, n_resamples, seed)
    low, high = _percentile_interval(means, confidence)
    side = min(float(np.mean(means <= 0.0)), float(np.mean(means >= 0.0)))
    p_value = min(1.0, 2.0 * max(side, 1.0 / n_resamples))
    return PairedMeanDiff(int(a.size), float(diff.mean()), low, high, p_value)

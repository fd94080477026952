"""Best of a grid of settings, and what that choice is worth on images it was not chosen on.

A protocol that sweeps settings and reports the best one, chosen on the images it is scored on,
reports the maximum of many noisy estimates: its expected value is above the true CorLoc of the
setting it picks (the "winner's curse"). These functions estimate by how much, from per-image
hits alone (a ``(n_images, n_settings)`` boolean matrix, settings in grid order):

* ``best_of_grid``: the in-sample best, the figure such a protocol reports;
* ``split_half``: choose the best setting on a random half of the images, score it on the other
  half, and compare with the best score on that same half (chosen on itself): the difference is
  the optimism of in-sample selection, measured on identical images. Repeated over seeded
  splits; mean and spread are reported;
* ``cross_dataset``: choose on one dataset's CorLoc (VOC07, say), score on another's images.

Ties between settings go to the **first setting in grid order** (``np.argmax``), so every
choice is deterministic. All functions are pure: arrays in, numbers out, a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lostreg.errors import LostregError
from lostreg.evaluation.stats import as_hits

DEFAULT_SPLITS = 50
DEFAULT_SPLIT_SEED = 0


def hits_matrix(hits: np.ndarray) -> np.ndarray:
    """``hits`` as a 2-D bool matrix ``(n_images, n_settings)``; anything else is refused."""
    array = np.asarray(hits)
    if array.ndim != 2:
        raise ValueError(f"hits must be (n_images, n_settings), got shape {array.shape}")
    if array.dtype != bool:
        as_hits(array.reshape(-1))  # refuses values other than 0/1
        array = array.astype(bool)
    return array


def setting_corloc(hits: np.ndarray) -> np.ndarray:
    """CorLoc (percent) of every setting, ``(n_settings,)``."""
    hits = hits_matrix(hits)
    if not hits.shape[0]:
        raise LostregError("no images: CorLoc is undefined")
    return 100.0 * hits.sum(axis=0) / hits.shape[0]


def first_best(scores: np.ndarray) -> int:
    """Index of the highest score; ties go to the first in grid order."""
    scores = np.asarray(scores, dtype=np.float64)
    if not scores.size or not np.isfinite(scores).all():
        raise LostregError("selection needs at least one setting and finite scores")
    return int(np.argmax(scores))


@dataclass(frozen=True)
class Choice:
    """One selected setting and its CorLoc where it was scored."""

    index: int
    corloc: float


def best_of_grid(hits: np.ndarray) -> Choice:
    """The in-sample best: chosen and scored on the same images (optimistic by design)."""
    scores = setting_corloc(hits)
    index = first_best(scores)
    return Choice(index, float(scores[index]))


@dataclass(frozen=True)
class Spread:
    """Mean, standard deviation (ddof 1; 0 for one value) and 5-95% range of some values."""

    mean: float
    sd: float
    low: float
    high: float

    @classmethod
    def of(cls, values: np.ndarray) -> Spread:
        values = np.asarray(values, dtype=np.float64)
        sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
        low, high = np.percentile(values, [5.0, 95.0])
        return cls(float(values.mean()), sd, float(low), float(high))


@dataclass(frozen=True)
class SplitHalf:
    """Per split: the setting chosen on the selection half (``chosen``), its CorLoc on the
    scoring half (``held_out``) and the best CorLoc on the scoring half when chosen on itself
    (``in_sample``). ``optimism = in_sample - held_out`` >= 0 on every split."""

    n_splits: int
    seed: int
    n_select: int
    n_score: int
    chosen: np.ndarray
    held_out: np.ndarray
    in_sample: np.ndarray

    @property
    def optimism(self) -> np.ndarray:
        return self.in_sample - self.held_out

    def times_chosen(self) -> dict[int, int]:
        """How often each setting was chosen, most often first (ties: grid order)."""
        values, counts = np.unique(self.chosen, return_counts=True)
        order = sorted(zip(values.tolist(), counts.tolist(), strict=True),
                       key=lambda vc: (-vc[1], vc[0]))
        return {int(v): int(c) for v, c in order}

    def summary(self) -> dict[str, Spread]:
        return {"held_out": Spread.of(self.held_out), "in_sample": Spread.of(self.in_sample),
                "optimism": Spread.of(self.optimism)}


def split_half(hits: np.ndarray, n_splits: int = DEFAULT_SPLITS,
               seed: int = DEFAULT_SPLIT_SEED) -> SplitHalf:
    """Choose on a random half of the images, score on the other half, ``n_splits`` times.

    Split ``s`` is ``rng.permutation(n)`` from one ``default_rng(seed)`` stream: its first
    ``n // 2`` images select, the rest score. Halves have half the images, so chance
    differences between settings are about sqrt(2) larger than on the whole set: the optimism
    measured here leans high as an estimate of the whole set's.
    """
    hits = hits_matrix(hits)
    n = hits.shape[0]
    if n < 2:
        raise LostregError(f"split-half selection needs at least 2 images, got {n}")
    if n_splits < 1:
        raise LostregError(f"--splits {n_splits}: must be at least 1")
    rng = np.random.default_rng(seed)
    chosen = np.empty(n_splits, dtype=np.int64)
    held_out = np.empty(n_splits, dtype=np.float64)
    in_sample = np.empty(n_splits, dtype=np.float64)
    for split in range(n_splits):
        order = rng.permutation(n)
        select, score = order[: n // 2], order[n // 2:]
        chosen[split] = first_best(setting_corloc(hits[select]))
        scores = setting_corloc(hits[score])
        held_out[split] = scores[chosen[split]]
        in_sample[split] = scores.max()
    return SplitHalf(n_splits, seed, n // 2, n - n // 2, chosen, held_out, in_sample)


@dataclass(frozen=True)
class CrossChoice:
    """A setting chosen on another dataset (``index``, with its CorLoc there: ``selected_on``)
    and scored here (``held_out``), beside this dataset's in-sample best (``best``)."""

    index: int
    selected_on: float
    held_out: float
    best: Choice

    @property
    def optimism(self) -> float:
        return self.best.corloc - self.held_out


def cross_dataset(selection_corloc: np.ndarray, hits: np.ndarray) -> CrossChoice:
    """Choose the setting with the best CorLoc on the selection dataset (``(n_settings,)``,
    same settings in the same order as ``hits``' columns) and score it on ``hits``."""
    selection_corloc = np.asarray(selection_corloc, dtype=np.float64)
    scores = setting_corloc(hits)
    if selection_corloc.shape != scores.shape:
        raise ValueError(f"{selection_corloc.size} selection scores for {scores.size} settings")
    index = first_best(selection_corloc)
    return CrossChoice(index, float(selection_corloc[index]), float(scores[index]),
                       best_of_grid(hits))

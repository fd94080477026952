"""The metric registry: one entry maps a name to a per-image score and its aggregate.

Like DINOv2's ``eval/`` metrics, a metric is an object that one generic loop runs: the run
scores each image as its line is written (``score``), the same ``score`` recomputes it when a
line is read back (a stored score is never trusted), and ``aggregate()`` gives a fresh
streaming accumulator that sees each image's scores once (``update``) and returns the run's
figures (``result``), so no run is ever held in memory to be scored.

A metric declares

* ``target``: the ground-truth kind it scores (``lostreg.evaluation.targets``);
* ``reads``: the prediction it reads (``box``, or ``mask``: the line's ``pred_mask_rle``);
* ``fields``: the per-image scores it adds to a predictions line, with their JSON checks;
* ``per_image`` and ``paired_test``: the per-image value two runs are compared on, and how:
  ``mcnemar`` for a hit/miss (exact McNemar), ``bootstrap`` for a continuous score (a paired
  bootstrap of the mean difference);
* ``headline``: the key of ``result()`` tables show, ``describe``: the words a run's summary
  line gives the result; ``definition``: where the definition comes from, so every number
  says which definition made it;
* ``check_line`` (optional): a line's fields checked against each other (a mask metric's
  counts against the image size and the stored mask), beyond each field's own check.

Adding a metric is one module in this folder with one ``register_metric`` call, imported in
``lostreg/evaluation/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lostreg.errors import LostregError, did_you_mean
from lostreg.evaluation.targets import LineField

PAIRED_TESTS = ("mcnemar", "bootstrap")


class Aggregate(Protocol):
    """A metric's running state over one run's images."""

    def update(self, scores: Mapping[str, Any]) -> None: ...

    def result(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MetricSpec:
    """What the benchmark knows about one metric (see the module docstring)."""

    name: str
    title: str
    target: str
    reads: tuple[str, ...]
    fields: Mapping[str, LineField]
    score: Callable[[Mapping[str, Any], Any], dict[str, Any]]
    aggregate: Callable[[], Aggregate]
    per_image: str
    paired_test: str
    headline: str
    definition: str
    # the words a run's summary line gives its result, e.g. ``CorLoc 61.90 (3102/5011)``
    describe: Callable[[Mapping[str, Any]], str]
    # optional fast path over a whole run (same numbers as ``score`` line by line): lines and
    # their targets in, one score dict per line out
    score_many: Callable[[Sequence[Mapping[str, Any]], Sequence[Any]],
                         list[dict[str, Any]]] | None = None
    # optional: what in a schema-checked line disagrees with itself (its fields against the
    # line's image and prediction), or None; such a line is bad (quarantined, recomputed)
    check_line: Callable[[Mapping[str, Any]], str | None] | None = None

    def __post_init__(self) -> None:
        if self.paired_test not in PAIRED_TESTS:
            raise ValueError(f"metric {self.name}: paired_test must be one of {PAIRED_TESTS}")
        if self.per_image not in self.fields:
            raise ValueError(f"metric {self.name}: per_image {self.per_image!r} is not one of "
                             "its fields")

    def score_all(self, lines: Sequence[Mapping[str, Any]], targets: Sequence[Any]
                  ) -> list[dict[str, Any]]:
        """``score`` of every line (through ``score_many`` when the metric has it)."""
        if self.score_many is not None:
            return self.score_many(lines, targets)
        return [self.score(line, target) for line, target in zip(lines, targets, strict=True)]

    def evaluate(self, scores: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """The generic loop: every image's scores through a fresh aggregate."""
        aggregate = self.aggregate()
        for item in scores:
            aggregate.update(item)
        return aggregate.result()


METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    taken = {key: other.name for other in METRICS.values() if other.name != spec.name
             for key in other.fields}
    clash = [key for key in spec.fields if key in taken]
    if clash:
        raise ValueError(f"metric {spec.name}: line field {clash[0]!r} is already "
                         f"{taken[clash[0]]}'s")
    METRICS[spec.name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    if name in METRICS:
        return METRICS[name]
    raise LostregError(f"unknown metric {name!r}; {did_you_mean(name, METRICS)}")


def metrics_for(target: str) -> list[MetricSpec]:
    """Every registered metric that scores ``target``."""
    return [spec for spec in METRICS.values() if spec.target == target]

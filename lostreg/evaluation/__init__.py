"""Evaluation: ground truth and predictions in, per-image scores and their aggregate out.

* ``targets``: the typed ground truth a dataset annotates (``BoxesTarget``), and how a
  predictions line holds it;
* ``registry``: the metric registry (``MetricSpec``: per-image score, streaming aggregate,
  paired test); ``corloc``: its first entry;
* ``iou``: box IoU, the one implementation in the tree;
* ``stats``: intervals and paired tests over per-image scores.

Adding a metric is one module here with one ``register_metric`` call plus its import below.
"""

from lostreg.evaluation import corloc  # noqa: F401 - registers itself
from lostreg.evaluation.registry import METRICS, MetricSpec, get_metric, metrics_for, register_metric

__all__ = ["METRICS", "MetricSpec", "get_metric", "metrics_for", "register_metric"]

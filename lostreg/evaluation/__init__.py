"""Evaluation: ground truth and predictions in, per-image scores and their aggregate out.

* ``targets``: the typed ground truth a dataset annotates (``BoxesTarget``, ``MaskTarget``),
  and how a predictions line holds it;
* ``registry``: the metric registry (``MetricSpec``: per-image score, streaming aggregate,
  paired test); ``corloc`` (boxes) and ``saliency_metric`` (masks: Acc, IoU, maxF under
  TokenCut's, MOVE's and FOUND's definitions) are its entries;
* ``saliency``, ``saliency_protocol``, ``mask_gt``, ``rle``: the saliency definitions from
  compact per-image counts, TokenCut's image protocol, GT masks, and stored masks;
* ``iou``: box IoU, the one implementation in the tree;
* ``stats``: intervals and paired tests over per-image scores.

Adding a metric is one module here with one ``register_metric`` call plus its import below.
"""

from lostreg.evaluation import (
    corloc,  # noqa: F401 - registers itself
    saliency_metric,  # noqa: F401 - registers itself
)
from lostreg.evaluation.registry import METRICS, MetricSpec, get_metric, metrics_for, register_metric

__all__ = ["METRICS", "MetricSpec", "get_metric", "metrics_for", "register_metric"]

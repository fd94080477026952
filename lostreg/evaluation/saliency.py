"""Saliency (single-object segmentation) metrics: Acc, IoU and max F-beta, as the public codes
compute them, from compact per-image integer counts.

The public evaluation codes disagree, so every number here names the definition that made it:

``tokencut`` (the default) — ``YangtaoWANG95/TokenCut`` @ ``ce70ed6``,
``unsupervised_saliency_detection/metric.py``; GT read by ``get_saliency.py`` as
``np.array(Image.open(gt).convert('L'))``.
  * GT: any non-zero gray pixel is foreground (``.to(torch.bool)`` / ``> 0.5`` on uint8).
  * IoU and Acc per image on ``pred > 0.5``, in float32 (``intersection.float() / union``;
    ``mean((a == b).float())``), summed over images in Python floats, divided by the count.
    An image with an empty GT **and** an empty prediction has ``0/0 = NaN`` IoU, which makes
    the dataset IoU NaN; ``iou_nan_images`` counts them and ``iou_empty_as_one`` is the
    corrected mean (such an image scores 1).
  * F: 255 thresholds ``np.arange(0.0, 1.0, 1/255)`` (float64), ``pred > t``; precision
    ``tp / |pred|`` (1 when the prediction is empty), recall ``tp / |gt|`` (1 when the GT is
    empty), both float32; ``F = (1.3 p r) / (0.3 p + r)`` in float32 with NaN (p = r = 0) set
    to 0; averaged over images **at each threshold**, then the max over thresholds
    (a dataset-level max).

``move`` — ``adambielski/move-seg`` @ ``6ea886d``, ``segmentation_eval.py --fbeta``.
  * GT: ``float32(gray) / 255 > 0.5``, i.e. gray >= 128.
  * IoU ``tp / (union + 1e-8)`` in float32 (an empty/empty image scores 0), Acc as TokenCut,
    both on ``pred > 0.5`` (``--th``), averaged with ``np.array(values).mean()``.
  * F as TokenCut's but on 256 thresholds ``np.arange(0.0, 1.0, 1/256)``; reported both as
    the dataset-level max (``max_f``, with its threshold) and as the mean of per-image maxima
    (``max_f_per_image``).
  * MOVE scores predictions saved as 8-bit PNGs (``/ 255``) and resized BILINEAR to the GT;
    that quantisation belongs to its pipeline, not to the metric, and is not applied here.

``found`` — ``valeoai/FOUND`` @ ``f9f2ef7`` ``evaluation/metrics/f_measure.py``, ``iou.py``,
``pixel_acc.py`` (taken from SelfMask, ``NoelShin/selfmask`` @ ``d37cf79``
``metrics/f_measure.py``) and ``evaluation/saliency.py`` @ ``0ee8b56`` (``eval_batch``);
GT ``gray == 255`` (``datasets/datasets.py``).
  * F: ``beta_square = 0.3`` is squared again in the formula, so the effective beta² is
    **0.09**: ``F = (1.09 p r) / (0.09 p + r + 1e-7)`` with ``p = tp / (|pred| + 1e-7)``,
    ``r = tp / (|gt| + 1e-7)`` (an empty prediction has precision 0); 255 thresholds
    ``torch.arange(0, 1, 1/255)`` (float32); the max **per image**, averaged over images
    (``max_f_per_image``, FOUND's ``f_max``). ``f_measure_at_half`` is SelfMask's
    ``f_measure`` (threshold 0.5). ``eval_batch``'s ``f_maxs_fixed`` resets its per-threshold
    meters on every call and FOUND calls it once per image, so it equals ``f_max``; the
    dataset-level max over the mean curve is given as ``max_f_dataset`` (not a FOUND number).
    The corrected form is TokenCut's (beta² = 0.3, no epsilons).
  * IoU ``tp / (union + 1e-7)`` and Acc on ``pred > 0.5``, float32, averaged. ``eval_batch``
    *returns* ``results["iou"] = float(iou)``, the **last** image's IoU, while its progress bar
    prints the mean (``metrics_res["ious"].avg``): both are given (``iou_last_image``,
    ``iou``). FOUND's ``AverageMeter`` sums numpy float32 values (in float32 under NumPy 2);
    means here are float64.

Per-image counts (``image_counts``) are what a run stores, one JSON line per image; every
aggregate above is recomputed exactly from them. The prediction (float32, float64 or bool,
same size as the GT) is compared with thresholds **in its own precision**, as torch does with
a Python-float threshold (float64 thresholds are rounded to float32 for a float32 prediction;
FOUND's float32 thresholds are exact in float64). All thresholds of all definitions, plus 0.5,
are merged into one sorted edge list per precision; a pixel's bin is the number of edges
strictly below its value, so ``pred > edge_j`` is ``bin > j``. The record keeps, for the
occupied bins only, the pixel count and the count of GT-foreground pixels under the non-zero
rule; when the GT has grey pixels (neither 0 nor 255) it also keeps the counts under the
``>= 128`` and ``== 255`` rules. Size: ``3 + 3k`` integers (``3 + 5k`` with grey pixels) for
``k`` occupied bins; a binary prediction has ``k <= 2``, a soft map at most ``len(edges) + 1``
(765 bins in float64, 511 in float32: 764 and 510 distinct edges).

Float32 arithmetic of the references is reproduced per image (the per-image IoU, Acc,
precision, recall and F are bit-identical to the torch code's; tests check it); means of F
over images are taken in float64 where torch averaged float32 (differences ~1e-7).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lostreg.errors import LostregError

F32 = np.float32
TOKENCUT_THRESHOLDS = np.arange(0.0, 1.0, 1.0 / 255)  # metric.py: np.arange(0.0, 1.0, 1/255)
MOVE_THRESHOLDS = np.arange(0.0, 1.0, 1.0 / 256)  # segmentation_eval.py: prob_bins = 256
# f_measure.py: torch.arange(0, 1, 1 / 255) in torch's default float32 (values i * (1/255)
# computed in double, then rounded; tests compare with torch.arange)
FOUND_THRESHOLDS = (np.arange(255) * (1.0 / 255)).astype(np.float32)
BINARY_THRESHOLD = 0.5
GT_RULES = ("nonzero", "half", "full")  # TokenCut, MOVE, FOUND
DEFINITIONS = ("tokencut", "move", "found")
PRECISIONS = {np.dtype(np.float64): "float64", np.dtype(np.float32): "float32"}

DEFINITION_TEXT = {
    "tokencut": "tokencut: YangtaoWANG95/TokenCut unsupervised_saliency_detection/metric.py "
                "@ ce70ed6176b1876212f0a3d1144d28507c81427d (GT non-zero; Acc/IoU on "
                "pred > 0.5; 255 thresholds arange(0,1,1/255), beta^2 0.3, F averaged over "
                "images then max over thresholds)",
    "move": "move: adambielski/move-seg segmentation_eval.py "
            "@ 6ea886d0bec09e84f91f4d62a40340babb72a768 (GT >= 128; IoU tp/(union+1e-8); "
            "256 thresholds arange(0,1,1/256), beta^2 0.3; dataset-level and per-image max)",
    "found": "found: valeoai/FOUND evaluation/metrics/f_measure.py "
             "@ f9f2ef709002037c5498ce571115ad76b9627c31 (SelfMask's) and "
             "evaluation/saliency.py @ 0ee8b562cd1472a44bc2739c7094c34c99aa19ba (GT == 255; "
             "effective beta^2 0.09 with eps 1e-7; 255 float32 thresholds; per-image max)",
}


# --- ground truth ------------------------------------------------------------------------


def read_gray_mask(path: str | Path) -> np.ndarray:
    """A GT mask as TokenCut (and FOUND) read it: ``np.array(Image.open(p).convert('L'))``,
    uint8 HxW (PIL, not OpenCV; ``convert('L')`` maps RGB with ITU-R 601-2 luma)."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("L"))
    except OSError as exc:
        raise LostregError(f"{path}: cannot read the mask ({exc})") from exc


def check_gray(gray: np.ndarray) -> None:
    if not isinstance(gray, np.ndarray) or gray.dtype != np.uint8 or gray.ndim != 2:
        got = f"{gray.dtype} {gray.shape}" if isinstance(gray, np.ndarray) else type(gray)
        raise LostregError(f"saliency GT: expected an 8-bit gray HxW mask (uint8), got {got}")


def gt_foreground(gray: np.ndarray, rule: str = "nonzero") -> np.ndarray:
    """Foreground pixels of an 8-bit gray GT: ``nonzero`` (TokenCut: any value > 0),
    ``half`` (MOVE: ``gray / 255 > 0.5``, i.e. >= 128) or ``full`` (FOUND: ``== 255``)."""
    check_gray(gray)
    if rule == "nonzero":
        return gray != 0
    if rule == "half":
        return gray >= 128
    if rule == "full":
        return gray == 255
    raise LostregError(f"GT rule {rule!r}: expected one of {', '.join(GT_RULES)}")


def grey_pixel_count(gray: np.ndarray) -> int:
    """Pixels that are neither 0 nor 255: where the three GT rules can disagree (anti-aliased
    borders); worth recording per image."""
    check_gray(gray)
    return int(np.count_nonzero((gray != 0) & (gray != 255)))


# --- per-image counts ----------------------------------------------------------------------


@lru_cache(maxsize=2)
def edges_for(precision: str) -> np.ndarray:
    """Every threshold of every definition (and 0.5) in ``precision``, sorted, distinct."""
    dtype = np.float64 if precision == "float64" else np.float32
    merged = np.concatenate([TOKENCUT_THRESHOLDS.astype(dtype), MOVE_THRESHOLDS.astype(dtype),
                             FOUND_THRESHOLDS.astype(dtype), np.array([0.5], dtype=dtype)])
    edges = np.unique(merged)
    edges.setflags(write=False)
    return edges


def comparison_precision(pred: np.ndarray) -> str:
    """The precision thresholds are compared in: the prediction's own (bool as float64 0/1)."""
    if pred.dtype == np.bool_:
        return "float64"
    if pred.dtype not in PRECISIONS:
        raise LostregError(f"saliency prediction: expected float32, float64 or bool, "
                           f"got {pred.dtype}")
    return PRECISIONS[pred.dtype]


@dataclass(frozen=True)
class ImageCounts:
    """One image's counts, enough for every definition (see the module docstring).

    ``bins``: occupied bins (bin = number of edges below the value) in increasing order;
    ``pred``: pixels per bin; ``gt``: GT-foreground (non-zero rule) pixels per bin;
    ``gt_half`` / ``gt_full``: the same under ``>= 128`` / ``== 255``, ``None`` when the GT
    has no grey pixel (then all three rules agree); ``grey``: pixels neither 0 nor 255.
    """

    pixels: int
    precision: str
    bins: tuple[int, ...]
    pred: tuple[int, ...]
    gt: tuple[int, ...]
    gt_half: tuple[int, ...] | None = None
    gt_full: tuple[int, ...] | None = None
    grey: int = 0

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ints and lists of ints; the optional rules only when present)."""
        out: dict[str, Any] = {"pixels": self.pixels, "precision": self.precision,
                               "bins": list(self.bins), "pred": list(self.pred),
                               "gt": list(self.gt), "grey": self.grey}
        if self.gt_half is not None:
            out["gt_half"], out["gt_full"] = list(self.gt_half), list(self.gt_full or ())
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageCounts:
        try:
            half, full = data.get("gt_half"), data.get("gt_full")
            counts = cls(int(data["pixels"]), str(data["precision"]), tuple(data["bins"]),
                         tuple(data["pred"]), tuple(data["gt"]),
                         None if half is None else tuple(half),
                         None if full is None else tuple(full), int(data.get("grey", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise LostregError(f"saliency counts: malformed record ({exc})") from exc
        counts.validate()
        return counts

    def validate(self) -> None:
        """Reject a record whose lists disagree or whose counts do not add up."""
        if self.precision not in ("float64", "float32"):
            raise LostregError(f"saliency counts: unknown precision {self.precision!r}")
        lists = [self.bins, self.pred, self.gt]
        lists += [] if self.gt_half is None else [self.gt_half, self.gt_full or ()]
        if len({len(values) for values in lists}) != 1 or sum(self.pred) != self.pixels:
            raise LostregError("saliency counts: bins, pred and gt lists disagree")
        if self.bins and max(self.bins) > len(edges_for(self.precision)):
            raise LostregError("saliency counts: a bin is past the last edge")

    def dense(self, rule: str = "nonzero") -> tuple[np.ndarray, np.ndarray]:
        """``(pixels per bin, GT-foreground pixels per bin)`` over all bins, int64."""
        size = len(edges_for(self.precision)) + 1
        pred = np.zeros(size, dtype=np.int64)
        gt = np.zeros(size, dtype=np.int64)
        bins = np.asarray(self.bins, dtype=np.int64)
        pred[bins] = self.pred
        source = {"nonzero": self.gt, "half": self.gt_half, "full": self.gt_full}[rule]
        gt[bins] = self.gt if source is None else source
        return pred, gt


def image_counts(pred: np.ndarray, gray: np.ndarray) -> ImageCounts:
    """Counts of one image from its prediction (binary or soft map, float32/float64/bool, the
    GT's size; values outside [0, 1] allowed, NaN not) and its 8-bit gray GT."""
    check_gray(gray)
    if not isinstance(pred, np.ndarray) or pred.shape != gray.shape:
        got = pred.shape if isinstance(pred, np.ndarray) else type(pred)
        raise LostregError(f"saliency prediction {got} does not match the GT {gray.shape}")
    precision = comparison_precision(pred)
    values = pred.astype(np.float64) if pred.dtype == np.bool_ else pred
    if np.isnan(values).any():
        raise LostregError("saliency prediction has NaN values")
    edges = edges_for(precision)
    bin_of = np.searchsorted(edges, values.reshape(-1), side="left")
    size = len(edges) + 1
    per_bin = np.bincount(bin_of, minlength=size)
    flat_gray = gray.reshape(-1)
    occupied = np.flatnonzero(per_bin)
    nonzero = np.bincount(bin_of[flat_gray != 0], minlength=size)[occupied]
    grey = grey_pixel_count(gray)
    half = full = None
    if grey:
        half = tuple(np.bincount(bin_of[flat_gray >= 128], minlength=size)[occupied].tolist())
        full = tuple(np.bincount(bin_of[flat_gray == 255], minlength=size)[occupied].tolist())
    return ImageCounts(int(flat_gray.size), precision, tuple(occupied.tolist()),
                       tuple(per_bin[occupied].tolist()), tuple(nonzero.tolist()), half, full,
                       grey)


def threshold_counts(counts: ImageCounts, thresholds: np.ndarray, rule: str = "nonzero"
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tp, predicted positives)`` at each threshold (``pred > t`` in the record's
    precision) and the GT positives, all exact integers."""
    edges = edges_for(counts.precision)
    cast = np.asarray(thresholds).astype(edges.dtype)
    index = np.searchsorted(edges, cast)
    if np.any(index >= len(edges)) or np.any(edges[np.minimum(index, len(edges) - 1)] != cast):
        raise LostregError("saliency counts: a threshold is not one of the stored edges")
    pred, gt = counts.dense(rule)
    pred_above = int(pred.sum()) - np.cumsum(pred)[index]
    tp = int(gt.sum()) - np.cumsum(gt)[index]
    return tp, pred_above, int(gt.sum())


# --- per-image values, as each reference computes them ---------------------------------------


def _div32(num: np.ndarray | int, den: np.ndarray | int | F32) -> np.ndarray:
    """``num / den`` in float32 (both rounded to float32 first), NaN/inf allowed."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(num).astype(F32) / np.asarray(den).astype(F32)


def tokencut_f(tp: np.ndarray, pred_pos: np.ndarray, gt_pos: int, beta_sq: float = 0.3
               ) -> np.ndarray:
    """TokenCut's (and MOVE's) per-threshold F of one image, float32, NaN -> 0."""
    precision = np.where(pred_pos == 0, F32(1.0), _div32(tp, pred_pos))
    recall = np.where(gt_pos == 0, F32(1.0), _div32(tp, np.full_like(tp, gt_pos)))
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (F32(1 + beta_sq) * precision * recall) / (F32(beta_sq) * precision + recall)
    return np.where(np.isnan(f), F32(0.0), f).astype(F32)


def found_f(tp: np.ndarray, pred_pos: np.ndarray, gt_pos: int) -> np.ndarray:
    """SelfMask/FOUND's per-threshold F of one image: beta_square 0.3 squared (0.09), eps
    1e-7 added to both denominators and to F's, float32."""
    eps, beta_square = F32(1e-7), 0.3
    precision = np.asarray(tp).astype(F32) / (np.asarray(pred_pos).astype(F32) + eps)
    recall = np.asarray(tp).astype(F32) / (F32(gt_pos) + eps)
    return ((F32(1 + beta_square ** 2) * precision * recall)
            / (F32(beta_square ** 2) * precision + recall + eps)).astype(F32)


def binary_stats(counts: ImageCounts, rule: str) -> tuple[int, int, int, int]:
    """``(tp, |pred > 0.5|, |gt|, pixels)`` under a GT rule."""
    tp, pred_pos, gt_pos = threshold_counts(counts, np.array([BINARY_THRESHOLD]), rule)
    return int(tp[0]), int(pred_pos[0]), gt_pos, counts.pixels


def accuracy32(tp: int, pred_pos: int, gt_pos: int, pixels: int) -> float:
    """``mean((pred > 0.5) == gt)`` in float32 (sum of ones exact, one float32 division)."""
    correct = pixels - pred_pos - gt_pos + 2 * tp
    return float(_div32(correct, pixels))


def per_image(counts: ImageCounts, definition: str) -> dict[str, Any]:
    """The per-image numbers of one definition: ``iou``, ``acc``, ``f`` (float32 array over
    the definition's thresholds) and, for ``found``, ``f_half``."""
    if definition == "tokencut":
        tp, pp, gp, pixels = binary_stats(counts, "nonzero")
        t_tp, t_pp, t_gp = threshold_counts(counts, TOKENCUT_THRESHOLDS, "nonzero")
        return {"iou": float(_div32(tp, pp + gp - tp)), "acc": accuracy32(tp, pp, gp, pixels),
                "f": tokencut_f(t_tp, t_pp, t_gp)}
    if definition == "move":
        tp, pp, gp, pixels = binary_stats(counts, "half")
        t_tp, t_pp, t_gp = threshold_counts(counts, MOVE_THRESHOLDS, "half")
        union = F32(pp + gp - tp) + F32(1e-8)
        return {"iou": float(F32(tp) / union), "acc": accuracy32(tp, pp, gp, pixels),
                "f": tokencut_f(t_tp, t_pp, t_gp)}
    if definition == "found":
        tp, pp, gp, pixels = binary_stats(counts, "full")
        t_tp, t_pp, t_gp = threshold_counts(counts, FOUND_THRESHOLDS, "full")
        union = F32(pp + gp - tp) + F32(1e-7)
        return {"iou": float(F32(tp) / union), "acc": accuracy32(tp, pp, gp, pixels),
                "f": found_f(t_tp, t_pp, t_gp),
                "f_half": float(found_f(np.array([tp]), np.array([pp]), gp)[0])}
    raise LostregError(f"saliency definition {definition!r}: expected one of "
                       f"{', '.join(DEFINITIONS)}")


# --- aggregates --------------------------------------------------------------------------------


@dataclass
class SaliencyScores:
    """One definition's dataset numbers, its F-vs-threshold curve (mean F over images at each
    threshold) and the ``definition`` text naming the code it reproduces."""

    name: str
    definition: str
    n_images: int
    metrics: dict[str, float]
    thresholds: list[float]
    f_curve: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "definition": self.definition, "n_images": self.n_images,
                "metrics": dict(self.metrics), "thresholds": list(self.thresholds),
                "f_curve": list(self.f_curve)}


@dataclass
class SaliencyAccumulator:
    """Streaming aggregate of one definition: ``add`` one image's counts at a time (in dataset
    order: the references' sums are sequential), ``result`` at the end."""

    name: str = "tokencut"
    ious: list[float] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)
    f_rows: list[np.ndarray] = field(default_factory=list)
    f_half: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in DEFINITIONS:
            raise LostregError(f"saliency definition {self.name!r}: expected one of "
                               f"{', '.join(DEFINITIONS)}")

    def add(self, counts: ImageCounts) -> None:
        values = per_image(counts, self.name)
        self.ious.append(values["iou"])
        self.accs.append(values["acc"])
        self.f_rows.append(values["f"])
        if "f_half" in values:
            self.f_half.append(values["f_half"])

    def result(self) -> SaliencyScores:
        if not self.ious:
            raise LostregError(f"saliency {self.name}: no images to aggregate")
        table = np.stack(self.f_rows).astype(np.float64)
        curve = table.mean(axis=0)
        thresholds = {"tokencut": TOKENCUT_THRESHOLDS, "move": MOVE_THRESHOLDS,
                      "found": FOUND_THRESHOLDS}[self.name]
        best = int(np.argmax(curve))
        metrics = {"tokencut": tokencut_metrics, "move": move_metrics,
                   "found": found_metrics}[self.name](self, table, curve, best)
        metrics["argmax_threshold"] = float(thresholds[best])
        return SaliencyScores(self.name, DEFINITION_TEXT[self.name], len(self.ious), metrics,
                              [float(t) for t in thresholds], curve.tolist())


def sequential_mean(values: list[float]) -> float:
    """``total += v`` in order, then ``/ n``: the references' Python-float running sums."""
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


def tokencut_metrics(acc: SaliencyAccumulator, table: np.ndarray, curve: np.ndarray,
                     best: int) -> dict[str, float]:
    nan_images = sum(1 for v in acc.ious if math.isnan(v))
    fixed = [1.0 if math.isnan(v) else v for v in acc.ious]
    return {"acc": sequential_mean(acc.accs), "iou": sequential_mean(acc.ious),
            "max_f": float(curve[best]), "iou_nan_images": float(nan_images),
            "iou_empty_as_one": sequential_mean(fixed)}


def move_metrics(acc: SaliencyAccumulator, table: np.ndarray, curve: np.ndarray,
                 best: int) -> dict[str, float]:
    return {"acc": float(np.array(acc.accs).mean()), "iou": float(np.array(acc.ious).mean()),
            "max_f": float(curve[best]), "argmax_index": float(best),
            "max_f_per_image": float(table.max(axis=1).mean())}


def found_metrics(acc: SaliencyAccumulator, table: np.ndarray, curve: np.ndarray,
                  best: int) -> dict[str, float]:
    return {"acc": sequential_mean(acc.accs), "iou": sequential_mean(acc.ious),
            "iou_last_image": acc.ious[-1], "max_f_per_image": float(table.max(axis=1).mean()),
            "f_measure_at_half": sequential_mean(acc.f_half), "max_f_dataset": float(curve[best])}


def evaluate(counts: Iterable[ImageCounts], name: str = "tokencut") -> SaliencyScores:
    """Aggregate per-image counts (in dataset order) under one definition."""
    accumulator = SaliencyAccumulator(name)
    for record in counts:
        accumulator.add(record)
    return accumulator.result()


def evaluate_all(counts: Iterable[ImageCounts]) -> dict[str, SaliencyScores]:
    """Every definition from one pass over the counts."""
    accumulators = {name: SaliencyAccumulator(name) for name in DEFINITIONS}
    for record in counts:
        for accumulator in accumulators.values():
            accumulator.add(record)
    return {name: accumulator.result() for name, accumulator in accumulators.items()}

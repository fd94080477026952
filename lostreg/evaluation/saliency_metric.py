"""The ``saliency`` metric: Acc, IoU and maxFβ of predicted masks, under every published
definition at once (``lostreg.evaluation.saliency``), in the evaluation registry.

Per image, a predictions line holds

* ``sal_counts``: the compact integer record of ``saliency.image_counts`` (the prediction's
  histogram over every definition's thresholds, with the GT-foreground counts per bin): the
  GT mask and the predicted map are not stored, and every figure below is recomputed from
  these counts alone, so a run folder can be rescored without the dataset;
* ``sal_iou`` and ``sal_acc``: TokenCut's per-image IoU and accuracy (float32 as its
  ``metric.py``, rounded to 6 decimals for reading), recomputed from ``sal_counts`` whenever a
  line is read back. ``sal_iou`` is ``null`` for an image whose GT and prediction are both
  empty (TokenCut's 0/0); two runs are compared on it with a paired bootstrap.

``metrics.json`` (``SaliencyAggregate.result``), percentages to 4 decimals:

* ``acc``, ``iou``, ``max_f`` — TokenCut's definition, the default
  (``saliency_definition: "tokencut"``): F averaged over images at each of 255 thresholds,
  then the max over thresholds; ``max_f_threshold`` is where; ``f_curve`` the 255 mean F
  values (0..1) for figures. ``iou`` is ``null`` when some image is 0/0 (TokenCut's mean is
  NaN there): ``iou_nan_images`` counts them, ``iou_empty_as_one`` scores them 1;
* ``saliency_variants.move``: MOVE's ``segmentation_eval.py`` (GT >= 128, IoU with 1e-8,
  256 thresholds): ``acc``, ``iou``, ``max_f`` (dataset-level), ``max_f_per_image`` and its
  256-value ``f_curve``;
* ``saliency_variants.found``: FOUND's / SelfMask's code (GT == 255, effective beta² 0.09):
  ``acc``, ``iou`` (the mean its progress bar prints), ``iou_last_image`` (what its
  ``eval_batch`` returns), ``max_f_per_image`` (its ``f_max``) and ``max_f_dataset``;
* ``saliency_definitions``: the text naming each definition's repository, file and commit.

No JSON file holds NaN: a NaN figure is written as ``null``.

The aggregate streams: it keeps running sums (per-threshold F sums, sequential Python sums of
IoU and accuracy in dataset order, as the references sum them), never a per-image table, so a
run of any size is scored in constant memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lostreg.errors import LostregError
from lostreg.evaluation.registry import MetricSpec, register_metric
from lostreg.evaluation.rle import foreground, rle_problem
from lostreg.evaluation.saliency import (
    BINARY_THRESHOLD,
    DEFINITION_TEXT,
    DEFINITIONS,
    FOUND_THRESHOLDS,
    MOVE_THRESHOLDS,
    TOKENCUT_THRESHOLDS,
    ImageCounts,
    edges_for,
    per_image,
    threshold_counts,
)
from lostreg.evaluation.targets import LineField, MaskTarget
from lostreg.fields import is_int, is_number

THRESHOLDS = {"tokencut": TOKENCUT_THRESHOLDS, "move": MOVE_THRESHOLDS,
              "found": FOUND_THRESHOLDS}
_COUNT_KEYS = {"pixels", "precision", "bins", "pred", "gt", "grey"}
_RULE_KEYS = {"gt_half", "gt_full"}


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_int(v) and v >= 0 for v in value)


def counts_problem(value: Any) -> str | None:
    """Why ``value`` is not an ``ImageCounts`` record (``as_json``), or None: strict JSON
    types (no ``"3"`` for 3), bins strictly increasing and within the edges, each bin's GT
    counts at most its pixels, the pixels adding up."""
    if not isinstance(value, dict):
        return "expected an object"
    keys = set(value)
    if not _COUNT_KEYS <= keys or not keys <= _COUNT_KEYS | _RULE_KEYS \
            or (keys & _RULE_KEYS and not _RULE_KEYS <= keys):
        return "keys must be pixels, precision, bins, pred, gt, grey (and gt_half with gt_full)"
    if not (is_int(value["pixels"]) and value["pixels"] > 0 and is_int(value["grey"])
            and 0 <= value["grey"] <= value["pixels"]):
        return "pixels must be a positive integer and grey an integer in [0, pixels]"
    if value["precision"] not in ("float64", "float32"):
        return "precision must be float64 or float32"
    lists = [value[k] for k in ("bins", "pred", "gt", *sorted(keys & _RULE_KEYS))]
    if not all(_int_list(v) for v in lists) or len({len(v) for v in lists}) != 1:
        return "bins, pred, gt (gt_half, gt_full) must be integer lists of one length"
    bins = value["bins"]
    if any(b >= a for a, b in zip(bins[1:], bins, strict=False)) \
            or (bins and bins[-1] > len(edges_for(value["precision"]))):
        return "bins must increase strictly and stay within the edges"
    if sum(value["pred"]) != value["pixels"] or any(
            g > p for rule in lists[2:] for g, p in zip(rule, value["pred"], strict=True)):
        return "pred must add up to pixels, and no GT count may exceed its bin's pixels"
    return None


def _counts(line: Mapping[str, Any]) -> ImageCounts:
    problem = counts_problem(line["sal_counts"])
    if problem:
        raise LostregError(f"sal_counts: {problem}")
    return ImageCounts.from_json(line["sal_counts"])


def score_mask(line: Mapping[str, Any], target: MaskTarget) -> dict[str, Any]:
    """One image's TokenCut IoU (``None`` for 0/0) and accuracy, from its stored counts."""
    values = per_image(_counts(line), "tokencut")
    iou = values["iou"]
    return {"sal_iou": None if math.isnan(iou) else round(iou, 6),
            "sal_acc": round(values["acc"], 6)}


def line_problem(line: Mapping[str, Any]) -> str | None:
    """What in a (schema-checked) mask line disagrees with itself, or None: the counts cover
    the image, its GT size and grey pixels are the line's, the stored RLE is the image's size
    and sets exactly the pixels the counts put above 0.5."""
    counts = line["sal_counts"]
    width, height = line["width"], line["height"]
    if line["gt_size"] != [width, height]:
        return f"gt_size {line['gt_size']} is not the image's [{width}, {height}]"
    if counts["pixels"] != width * height or counts["grey"] != line["gt_grey_pixels"]:
        return "sal_counts do not cover the image or disagree with gt_grey_pixels"
    problem = rle_problem(line["pred_mask_rle"], height, width)
    if problem:
        return f"pred_mask_rle: {problem}"
    _, above, _ = threshold_counts(ImageCounts.from_json(counts), np.array([BINARY_THRESHOLD]))
    if foreground(line["pred_mask_rle"]) != int(above[0]):
        return "pred_mask_rle does not set the pixels sal_counts puts above 0.5"
    return None


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else round(100.0 * value, 4)


def _curve(values: np.ndarray) -> list[float]:
    return [round(float(v), 8) for v in values]


class _Running:
    """One definition's running sums over a run's images."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.iou = self.acc = self.max_f = self.iou_fixed = 0.0
        self.f_sum = np.zeros(len(THRESHOLDS[name]))
        self.nan_images = 0
        self.last_iou = math.nan

    def add(self, counts: ImageCounts) -> None:
        values = per_image(counts, self.name)
        iou, f = values["iou"], values["f"].astype(np.float64)
        self.iou += iou
        self.iou_fixed += 1.0 if math.isnan(iou) else iou
        self.nan_images += math.isnan(iou)
        self.last_iou = iou
        self.acc += values["acc"]
        self.f_sum += f
        self.max_f += float(f.max())


class SaliencyAggregate:
    """Every definition's running sums (see the module docstring); ``result`` at the end."""

    def __init__(self) -> None:
        self.n_images = 0
        self.running = {name: _Running(name) for name in DEFINITIONS}

    def update(self, scores: Mapping[str, Any]) -> None:
        counts = _counts(scores)
        self.n_images += 1
        for running in self.running.values():
            running.add(counts)

    def result(self) -> dict[str, Any]:
        n = self.n_images
        if n == 0:
            return {"n_images": 0, "acc": None, "iou": None, "max_f": None,
                    "saliency_definition": "tokencut"}
        tokencut, move, found = (self.running[name] for name in DEFINITIONS)
        curves = {name: r.f_sum / n for name, r in self.running.items()}
        best = {name: int(np.argmax(curve)) for name, curve in curves.items()}
        return {
            "n_images": n,
            "acc": _percent(tokencut.acc / n), "iou": _percent(tokencut.iou / n),
            "max_f": _percent(float(curves["tokencut"][best["tokencut"]])),
            "max_f_threshold": float(TOKENCUT_THRESHOLDS[best["tokencut"]]),
            "f_curve": _curve(curves["tokencut"]),
            "saliency_definition": "tokencut",
            "iou_nan_images": tokencut.nan_images,
            "iou_empty_as_one": _percent(tokencut.iou_fixed / n),
            "saliency_variants": {
                "move": {"acc": _percent(move.acc / n), "iou": _percent(move.iou / n),
                         "max_f": _percent(float(curves["move"][best["move"]])),
                         "max_f_per_image": _percent(move.max_f / n),
                         "f_curve": _curve(curves["move"])},
                "found": {"acc": _percent(found.acc / n), "iou": _percent(found.iou / n),
                          "iou_last_image": _percent(found.last_iou),
                          "max_f_per_image": _percent(found.max_f / n),
                          "max_f_dataset": _percent(float(curves["found"][best["found"]]))},
            },
            "saliency_definitions": dict(DEFINITION_TEXT),
        }


def describe(result: Mapping[str, Any]) -> str:
    """``maxF 80.30 IoU 71.20 Acc 91.80 (tokencut)``; an IoU that TokenCut's mean makes NaN
    says why and gives the 0/0-as-1 figure."""
    def shown(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else f"{value:.2f}"

    iou = shown("iou")
    if result.get("iou") is None and result.get("iou_nan_images"):
        iou += (f" ({result['iou_nan_images']} images 0/0; counted as 1: "
                f"{shown('iou_empty_as_one')})")
    return f"maxF {shown('max_f')} IoU {iou} Acc {shown('acc')} (tokencut)"


SALIENCY = register_metric(MetricSpec(
    name="saliency",
    title="Saliency (Acc / IoU / maxF)",
    target=MaskTarget.kind,
    reads=("mask",),
    fields={"sal_iou": LineField(lambda v: v is None or (is_number(v) and 0 <= v <= 1),
                                 "null or a number in [0, 1]"),
            "sal_acc": LineField(lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
            "sal_counts": LineField(lambda v: counts_problem(v) is None,
                                    "a saliency counts record (pixels, precision, bins, pred, "
                                    "gt, grey)")},
    score=score_mask,
    aggregate=SaliencyAggregate,
    per_image="sal_iou",
    paired_test="bootstrap",
    headline="max_f",
    describe=describe,
    definition="; ".join(DEFINITION_TEXT[name] for name in DEFINITIONS)
               + " (tokencut is the default; move and found are named variants)",
    check_line=line_problem,
))

"""The ``saliency`` metric in the evaluation registry: what a line holds, what metrics.json
holds, against the transcriptions of the published codes (``saliency_references``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from saliency_references import found_metrics, move_metrics, tokencut_metrics

from lostreg.evaluation import get_metric, metrics_for
from lostreg.evaluation.rle import decode, encode, mask_box, rle_problem
from lostreg.evaluation.saliency import image_counts
from lostreg.evaluation.saliency_metric import SALIENCY, counts_problem, line_problem
from lostreg.evaluation.targets import MaskTarget
from lostreg.runs.predictions import LineFormat

FMT = LineFormat(MaskTarget, (SALIENCY,))


def line_of(pred: np.ndarray, gray: np.ndarray) -> dict:
    """A predictions line as a run writes it (``LineFormat.line``'s fields, by hand)."""
    height, width = gray.shape
    counts = image_counts(pred, gray)
    binary = pred > 0.5
    line = {"image_id": "x", "file": "x.jpg", "width": width, "height": height,
            "box": mask_box(binary), "seed": None, "gt_size": [width, height],
            "gt_grey_pixels": counts.grey, "pred_mask_rle": encode(binary),
            "sal_counts": counts.as_json()}
    line.update(SALIENCY.score(line, MaskTarget.from_line(line)))
    return json.loads(json.dumps(line))


def sample(seed: int, count: int = 6) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Binary float64 maps (TokenCut's masks), soft float64 maps (the solver's, a little
    outside [0, 1]) and float32 maps on k/255; GTs with grey borders and one empty GT."""
    rng = np.random.default_rng(seed)
    preds, grays = [], []
    for i in range(count):
        h, w = rng.integers(9, 20, size=2)
        gray = np.zeros((h, w), dtype=np.uint8)
        gray[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = 255
        gray[h // 4, w // 5: 4 * w // 5] = rng.choice([128, 40, 200])
        if i == count - 1:
            gray[:] = 0
        kind = i % 3
        if kind == 0:
            pred = (rng.random((h, w)) > 0.6).astype(np.float64)
        elif kind == 1:
            pred = rng.uniform(-0.05, 1.05, size=(h, w))
        else:
            pred = (rng.integers(0, 256, size=(h, w)) / 255).astype(np.float32)
        preds.append(pred)
        grays.append(gray)
    return preds, grays


def test_registered_for_masks() -> None:
    spec = get_metric("saliency")
    assert spec is SALIENCY and metrics_for("mask") == [SALIENCY]
    assert (spec.target, spec.reads, spec.paired_test, spec.per_image, spec.headline) == (
        "mask", ("mask",), "bootstrap", "sal_iou", "max_f")
    assert set(spec.fields) == {"sal_iou", "sal_acc", "sal_counts"}
    for name in ("TokenCut", "move-seg", "FOUND", "ce70ed6", "6ea886d", "f9f2ef7"):
        assert name in spec.definition


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_json_figures_are_the_published_codes(seed: int) -> None:
    preds, grays = sample(seed)
    result = SALIENCY.evaluate(line_of(p, g) for p, g in zip(preds, grays, strict=True))
    json.dumps(result, allow_nan=False)  # never NaN in a JSON file
    tokencut = tokencut_metrics(preds, grays)
    move, found = move_metrics(preds, grays), found_metrics(preds, grays)
    close = pytest.approx
    assert result["n_images"] == len(preds) and result["saliency_definition"] == "tokencut"
    assert result["acc"] == close(100 * tokencut["accuracy"], abs=1e-4)
    assert result["iou"] == close(100 * tokencut["IoU"], abs=1e-4)
    assert result["max_f"] == close(100 * tokencut["F_max"], abs=2e-4)
    curve = tokencut["f_table"].astype(np.float64).mean(axis=0)
    assert len(result["f_curve"]) == 255 and np.allclose(result["f_curve"], curve, atol=1e-6)
    assert result["max_f_threshold"] == pytest.approx(np.arange(0, 1, 1 / 255)[curve.argmax()])
    variants = result["saliency_variants"]
    assert variants["move"]["acc"] == close(100 * move["acc"], abs=1e-4)
    assert variants["move"]["iou"] == close(100 * move["iou"], abs=1e-4)
    assert variants["move"]["max_f"] == close(100 * move["f_max"], abs=2e-4)
    assert variants["move"]["max_f_per_image"] == close(100 * move["f_max_per_image"], abs=2e-4)
    assert len(variants["move"]["f_curve"]) == 256
    assert variants["found"]["acc"] == close(100 * found["acc"], abs=1e-4)
    assert variants["found"]["iou"] == close(100 * found["iou"], abs=1e-4)
    assert variants["found"]["iou_last_image"] == close(100 * found["iou_last"], abs=1e-4)
    assert variants["found"]["max_f_per_image"] == close(100 * found["f_max"], abs=2e-4)
    assert variants["found"]["max_f_dataset"] == close(
        100 * found["all_f"].astype(np.float64).mean(axis=0).max(), abs=2e-4)
    assert set(result["saliency_definitions"]) == {"tokencut", "move", "found"}


def test_per_image_fields_are_tokencuts() -> None:
    preds, grays = sample(2)
    reference = tokencut_metrics(preds, grays)
    for pred, gray, iou, acc in zip(preds, grays, reference["ious"], reference["accs"],
                                    strict=True):
        line = line_of(pred, gray)
        if math.isnan(iou):
            assert line["sal_iou"] is None
        else:
            assert line["sal_iou"] == round(iou, 6)
        assert line["sal_acc"] == round(acc, 6)
        assert FMT.problem(line) is None


def test_empty_gt_and_prediction_is_tokencuts_nan_written_as_null() -> None:
    gray = np.zeros((6, 7), dtype=np.uint8)
    full = np.full((6, 7), 255, dtype=np.uint8)
    lines = [line_of(np.zeros((6, 7)), gray), line_of(np.ones((6, 7)), full)]
    assert lines[0]["sal_iou"] is None and lines[1]["sal_iou"] == 1.0
    result = SALIENCY.evaluate(lines)
    assert result["iou"] is None and result["iou_nan_images"] == 1
    assert result["iou_empty_as_one"] == 100.0
    assert result["saliency_variants"]["move"]["iou"] == 50.0  # MOVE's 1e-8: 0/0 scores 0
    assert json.loads(json.dumps(result, allow_nan=False))["iou"] is None
    assert SALIENCY.describe(result) == \
        "maxF 100.00 IoU n/a (1 images 0/0; counted as 1: 100.00) Acc 100.00 (tokencut)"


def test_aggregate_keeps_running_sums_and_the_last_image() -> None:
    preds, grays = sample(3)
    lines = [line_of(p, g) for p, g in zip(preds, grays, strict=True)]
    forward, backward = SALIENCY.evaluate(lines), SALIENCY.evaluate(lines[::-1])
    assert forward["max_f"] == backward["max_f"] and forward["acc"] == backward["acc"]
    assert forward["saliency_variants"]["found"]["iou_last_image"] == pytest.approx(
        100 * FOUND_LAST(preds[-1], grays[-1]), abs=1e-4)
    aggregate = SALIENCY.aggregate()
    for line in lines:
        aggregate.update(line)
    state = [v for v in vars(aggregate).values()] + [
        v for running in aggregate.running.values() for v in vars(running).values()]
    assert all(not isinstance(v, list) for v in state)  # running sums, no per-image list


def FOUND_LAST(pred: np.ndarray, gray: np.ndarray) -> float:  # noqa: N802 - a reference
    return found_metrics([pred], [gray])["iou_last"]


@pytest.mark.parametrize(("change", "needle"), [
    (lambda c: c.update(pixels=c["pixels"] + 1), "pred must add up"),
    (lambda c: c.update(pixels="12"), "pixels must be"),
    (lambda c: c.update(precision="float16"), "precision"),
    (lambda c: c.update(bins=c["bins"][::-1]), "increase strictly"),
    (lambda c: c.update(gt=[p + 1 for p in c["pred"]]), "no GT count"),
    (lambda c: c.update(gt=[True] * len(c["gt"])), "integer lists"),
    (lambda c: c.update(extra=1), "keys must be"),
    (lambda c: c.update(gt_half=[0] * len(c["gt"])), "keys must be"),
])
def test_a_malformed_counts_record_is_refused(change, needle) -> None:
    line = line_of(np.linspace(0, 1, 30).reshape(5, 6), np.full((5, 6), 255, np.uint8))
    assert counts_problem(line["sal_counts"]) is None
    change(line["sal_counts"])
    assert needle in counts_problem(line["sal_counts"])
    assert FMT.problem(line).startswith("sal_counts: expected a saliency counts record")


def test_line_fields_are_checked_against_each_other() -> None:
    pred = np.zeros((5, 6))
    pred[1:3, 2:5] = 0.9
    gray = np.zeros((5, 6), np.uint8)
    gray[0, 0] = 128
    line = line_of(pred, gray)
    assert line_problem(line) is None and line["box"] == [2, 1, 5, 3]
    assert np.array_equal(decode(line["pred_mask_rle"]), pred > 0.5)
    other = dict(line, pred_mask_rle=encode(np.zeros((5, 6), bool)))
    assert "does not set the pixels" in line_problem(other)
    assert "is not the image's" in line_problem(dict(line, pred_mask_rle=encode(pred.T > 0.5)))
    assert "gt_size" in line_problem(dict(line, gt_size=[5, 6]))
    assert "disagree with gt_grey_pixels" in line_problem(dict(line, gt_grey_pixels=0))
    assert FMT.problem(dict(line, gt_grey_pixels=0)) == \
        "sal_counts do not cover the image or disagree with gt_grey_pixels"


def test_rescore_recomputes_the_per_image_fields_from_the_counts() -> None:
    line = line_of(np.eye(6), np.eye(6, dtype=np.uint8) * 255)
    tampered = dict(line, sal_iou=0.5)
    fixed, note = FMT.rescore(tampered, MaskTarget.from_line(tampered))
    assert fixed["sal_iou"] == line["sal_iou"] == 1.0 and "sal_iou" in note


def test_rle_round_trip_and_bad_rles() -> None:
    mask = np.zeros((7, 9), bool)
    mask[2:5, 1:8] = True
    rle = encode(mask)
    assert rle["size"] == [7, 9] and isinstance(rle["counts"], str)
    assert np.array_equal(decode(json.loads(json.dumps(rle))), mask)
    assert rle_problem(rle, 7, 9) is None
    assert "not the image's" in rle_problem(rle, 9, 7)
    assert "cover" in rle_problem({"size": [7, 10], "counts": rle["counts"]})
    assert "malformed" in rle_problem({"size": [7, 9], "counts": "\x01"})
    assert rle_problem({"size": [7, 9]}) is not None

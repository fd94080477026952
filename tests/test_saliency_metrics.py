"""Saliency metrics and TokenCut's image protocol: hand-computed cases, edge conventions, and
every definition against the step-by-step transcriptions in ``saliency_references``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import saliency_references as R
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lostreg.errors import LostregError
from lostreg.evaluation import saliency as S
from lostreg.evaluation import saliency_protocol as P

GRAY_4X4 = np.array([[0, 0, 0, 0],
                     [0, 255, 255, 0],
                     [0, 255, 255, 0],
                     [0, 0, 0, 0]], dtype=np.uint8)
PRED_4X4 = np.array([[0.0, 0.2, 0.0, 0.0],
                     [0.0, 0.9, 0.6, 0.0],
                     [0.0, 0.7, 0.3, 0.0],
                     [0.0, 0.0, 0.0, 0.8]])


def scores(preds: list[np.ndarray], grays: list[np.ndarray]) -> dict[str, S.SaliencyScores]:
    """All definitions, counts taken through JSON as a run would store them."""
    records = [S.ImageCounts.from_json(json.loads(json.dumps(S.image_counts(p, g).as_json())))
               for p, g in zip(preds, grays, strict=True)]
    return S.evaluate_all(records)


# --- hand-computed -------------------------------------------------------------------------


def test_hand_computed_4x4() -> None:
    """pred > 0.5 keeps {0.9, 0.6, 0.7, 0.8}: 3 of the 4 GT pixels and one false positive."""
    out = scores([PRED_4X4], [GRAY_4X4])
    tokencut = out["tokencut"].metrics
    assert tokencut["iou"] == pytest.approx(3 / 5, rel=1e-7)  # tp 3, union 4 + 4 - 3
    assert tokencut["acc"] == pytest.approx(14 / 16, rel=1e-7)  # 3 tp + 11 tn
    # F per threshold band: (0.2, 0.3] keeps 5 pixels, tp 4: p 0.8, r 1 -> 1.04 / 1.24
    assert tokencut["max_f"] == pytest.approx(1.3 * 0.8 / (0.3 * 0.8 + 1.0), rel=1e-6)
    assert 0.2 <= tokencut["argmax_threshold"] < 0.3
    curve = np.array(out["tokencut"].f_curve)
    thresholds = np.array(out["tokencut"].thresholds)
    at = {0.0: 1.3 * (4 / 6) / (0.3 * 4 / 6 + 1), 0.5: 0.75,  # (0.3, 0.6]: p = r = 3/4
          0.65: 1.3 * (2 / 3) * 0.5 / (0.3 * 2 / 3 + 0.5), 0.95: 0.0}  # nothing kept: p 1, r 0
    for t, expected in at.items():
        assert curve[np.searchsorted(thresholds, t)] == pytest.approx(expected, rel=1e-6)
    move = out["move"].metrics
    assert move["iou"] == pytest.approx(0.6, rel=1e-7)
    assert move["max_f"] == move["max_f_per_image"] == pytest.approx(1.04 / 1.24, rel=1e-6)
    found = out["found"].metrics
    # effective beta^2 0.09: p 0.8, r 1 -> 1.09 * 0.8 / (0.072 + 1)
    assert found["max_f_per_image"] == pytest.approx(1.09 * 0.8 / (0.09 * 0.8 + 1.0), rel=1e-6)
    assert found["f_measure_at_half"] == pytest.approx(0.75, rel=1e-6)
    assert found["iou"] == found["iou_last_image"] == pytest.approx(0.6, rel=1e-6)


def test_hand_computed_matches_references() -> None:
    ref = R.tokencut_metrics([PRED_4X4], [GRAY_4X4])
    out = scores([PRED_4X4], [GRAY_4X4])
    assert out["tokencut"].metrics["iou"] == ref["IoU"]
    assert out["tokencut"].metrics["acc"] == ref["accuracy"]
    assert out["tokencut"].metrics["max_f"] == pytest.approx(ref["F_max"], abs=1e-7)


# --- edge conventions ----------------------------------------------------------------------


def test_empty_prediction_and_empty_gt_conventions() -> None:
    gt = np.zeros((3, 3), np.uint8)
    gt[1, 1] = 255
    empty_pred, empty_gt = np.zeros((3, 3)), np.zeros((3, 3), np.uint8)
    full_pred = np.ones((3, 3))
    # TokenCut: empty prediction has precision 1 (F = 0 since recall 0); empty GT recall 1
    out = scores([empty_pred], [gt])
    assert out["tokencut"].metrics["max_f"] == 0.0 and out["tokencut"].metrics["iou"] == 0.0
    out = scores([full_pred], [empty_gt])
    assert out["tokencut"].metrics["max_f"] == 0.0
    # both empty: TokenCut IoU 0/0 = NaN poisons the mean; MOVE and FOUND give 0 by epsilon;
    # F is 1 for TokenCut/MOVE (p = r = 1) and 0 for FOUND (p = 0 / eps)
    out = scores([empty_pred, full_pred], [empty_gt, gt])
    tokencut = out["tokencut"].metrics
    assert math.isnan(tokencut["iou"]) and tokencut["iou_nan_images"] == 1
    assert tokencut["iou_empty_as_one"] == pytest.approx((1.0 + 1 / 9) / 2)
    assert out["move"].metrics["iou"] == pytest.approx((0.0 + 1 / 9) / 2, rel=1e-6)
    assert out["found"].metrics["iou"] == pytest.approx((0.0 + 1 / 9) / 2, rel=1e-6)
    ref = R.tokencut_metrics([empty_pred], [empty_gt])
    assert math.isnan(ref["IoU"]) and ref["f_table"][0, 0] == 1.0
    assert R.found_metrics([empty_pred], [empty_gt])["f_max"] == 0.0
    assert scores([empty_pred], [empty_gt])["found"].metrics["max_f_per_image"] == 0.0


def test_all_foreground() -> None:
    gt = np.full((5, 4), 255, np.uint8)
    out = scores([np.ones((5, 4))], [gt])
    for name in ("tokencut", "move"):
        assert out[name].metrics["iou"] == 1.0 and out[name].metrics["acc"] == 1.0
        assert out[name].metrics["max_f"] == pytest.approx(1.0, abs=1e-7)
    assert out["found"].metrics["max_f_per_image"] == pytest.approx(1.0, abs=1e-6)


def test_grey_gt_pixels_follow_each_rule() -> None:
    gray = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    assert S.grey_pixel_count(gray) == 2
    assert S.gt_foreground(gray, "nonzero").tolist() == [[False, True, True, True]]
    assert S.gt_foreground(gray, "half").tolist() == [[False, False, True, True]]
    assert S.gt_foreground(gray, "full").tolist() == [[False, False, False, True]]
    pred = np.array([[0.0, 1.0, 1.0, 1.0]])
    counts = S.image_counts(pred, gray)
    assert counts.grey == 2 and counts.gt_half is not None
    out = scores([pred], [gray])
    assert out["tokencut"].metrics["iou"] == 1.0
    assert out["move"].metrics["iou"] == pytest.approx(2 / 3, rel=1e-6)
    assert out["found"].metrics["iou"] == pytest.approx(1 / 3, rel=1e-6)
    assert out["move"].metrics["iou"] == R.move_metrics([pred.astype(np.float32)], [gray])["iou"]
    assert out["found"].metrics["iou"] == R.found_metrics([pred], [gray])["iou"]
    with pytest.raises(LostregError, match="GT rule"):
        S.gt_foreground(gray, "strict")


def test_bad_input_raises_one_line() -> None:
    gray = np.zeros((4, 4), np.uint8)
    cases = [(np.zeros((4, 5)), gray, "does not match"),
             (np.zeros((4, 4), np.int64), gray, "float32, float64 or bool"),
             (np.zeros((4, 4)), gray.astype(np.float64), "uint8"),
             (np.full((4, 4), np.nan), gray, "NaN")]
    for pred, gt, message in cases:
        with pytest.raises(LostregError, match=message) as info:
            S.image_counts(pred, gt)
        assert "\n" not in str(info.value)
    with pytest.raises(LostregError, match="no images"):
        S.evaluate([], "tokencut")
    with pytest.raises(LostregError, match="definition"):
        S.evaluate([S.image_counts(np.zeros((4, 4)), gray)], "selfmask")
    with pytest.raises(LostregError, match="malformed"):
        S.ImageCounts.from_json({"pixels": 4})
    with pytest.raises(LostregError, match="disagree"):
        S.ImageCounts.from_json({"pixels": 4, "precision": "float64", "bins": [0],
                                 "pred": [3], "gt": [0]})


# --- thresholds, counts, storage ---------------------------------------------------------------


def test_threshold_arrays_are_the_references() -> None:
    assert S.TOKENCUT_THRESHOLDS.dtype == np.float64 and len(S.TOKENCUT_THRESHOLDS) == 255
    assert np.array_equal(S.TOKENCUT_THRESHOLDS, np.arange(0.0, 1.0, 1.0 / 255))
    assert len(S.MOVE_THRESHOLDS) == 256 and S.MOVE_THRESHOLDS[128] == 0.5
    found = torch.arange(0, 1, 1 / 255)
    assert found.dtype == torch.float32 and np.array_equal(found.numpy(), S.FOUND_THRESHOLDS)
    # float32 FOUND thresholds are not TokenCut's float64 ones: the merged edges keep both
    assert not np.array_equal(S.FOUND_THRESHOLDS.astype(np.float64)[1:], S.TOKENCUT_THRESHOLDS[1:])
    assert len(S.edges_for("float64")) == 764 and len(S.edges_for("float32")) == 510


def test_float32_prediction_is_compared_in_float32() -> None:
    """A float32 map quantised to k/255 sits exactly on float32(threshold): torch compares a
    float32 tensor with a Python-float threshold in float32, so ``pred > t`` is False there."""
    gray = np.array([[255, 0, 255, 0]], dtype=np.uint8)
    pred = (np.array([[10, 10, 200, 0]]) / 255).astype(np.float32)
    counts = S.image_counts(pred, gray)
    tp, pp, _ = S.threshold_counts(counts, S.TOKENCUT_THRESHOLDS[[10]])
    assert int(pp[0]) == 1 and int(tp[0]) == 1  # only 200/255 is above 10/255
    ref = R.tokencut_metrics([pred], [gray])
    out = S.SaliencyAccumulator("tokencut")
    out.add(counts)
    assert np.array_equal(out.f_rows[0], ref["f_table"][0])


def test_counts_are_compact_json() -> None:
    gray = (np.arange(400).reshape(20, 20) % 3 == 0).astype(np.uint8) * 255
    binary = S.image_counts((np.arange(400).reshape(20, 20) % 2).astype(np.float64), gray)
    assert len(binary.bins) == 2 and binary.gt_half is None
    record = json.loads(json.dumps(binary.as_json()))
    assert all(isinstance(v, int) for key in ("bins", "pred", "gt") for v in record[key])
    assert S.ImageCounts.from_json(record) == binary
    soft = S.image_counts(np.linspace(-0.1, 1.1, 400).reshape(20, 20), gray)
    assert len(soft.bins) <= len(S.edges_for("float64")) + 1
    assert sum(soft.pred) == 400 and soft.bins[0] == 0 and soft.bins[-1] == 764


def test_streaming_equals_one_pass() -> None:
    rng = np.random.default_rng(3)
    preds = [rng.random((6, 7)) for _ in range(4)]
    grays = [(rng.random((6, 7)) < 0.5).astype(np.uint8) * 255 for _ in range(4)]
    counts = [S.image_counts(p, g) for p, g in zip(preds, grays, strict=True)]
    together = S.evaluate_all(counts)
    for name in S.DEFINITIONS:
        alone = S.evaluate(iter(counts), name)
        assert alone.as_dict() == together[name].as_dict()
        assert alone.definition.startswith(name) and "@" in alone.definition


# --- property tests against the transcriptions -----------------------------------------------


@st.composite
def images(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["soft64", "quant32", "binary", "soft32"]))
    rng = np.random.default_rng(seed)
    gray = np.where(rng.random((h, w)) < 0.5, 255, 0).astype(np.uint8)
    if draw(st.booleans()):
        grey = rng.random((h, w)) < 0.2
        gray[grey] = rng.integers(1, 255, size=int(grey.sum()))
    if kind == "soft64":
        pred = rng.random((h, w)) * 1.2 - 0.1
    elif kind == "quant32":
        pred = (rng.integers(0, 256, (h, w)) / 255).astype(np.float32)
    elif kind == "soft32":
        pred = rng.random((h, w)).astype(np.float32)
    else:
        pred = (rng.random((h, w)) < 0.5).astype(np.float64)
    return pred, gray


@settings(max_examples=25, deadline=None)
@given(st.lists(images(), min_size=1, max_size=3))
def test_definitions_match_the_references(batch: list[tuple[np.ndarray, np.ndarray]]) -> None:
    preds, grays = [p for p, _ in batch], [g for _, g in batch]
    counts = [S.image_counts(p, g) for p, g in batch]
    accs = {name: S.SaliencyAccumulator(name) for name in S.DEFINITIONS}
    for record in counts:
        for accumulator in accs.values():
            accumulator.add(record)
    results = {name: accumulator.result().metrics for name, accumulator in accs.items()}
    tc = R.tokencut_metrics(preds, grays)
    same = [a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(accs["tokencut"].ious,
                                                                         tc["ious"], strict=True)]
    assert all(same) and accs["tokencut"].accs == tc["accs"]
    assert np.array_equal(np.stack(accs["tokencut"].f_rows), tc["f_table"])
    assert results["tokencut"]["max_f"] == pytest.approx(tc["F_max"], abs=1e-6)
    assert results["tokencut"]["acc"] == tc["accuracy"]
    assert math.isnan(tc["IoU"]) or results["tokencut"]["iou"] == tc["IoU"]
    mv = R.move_metrics(preds, grays)
    assert accs["move"].ious == mv["ious"] and accs["move"].accs == mv["accs"]
    assert results["move"]["iou"] == mv["iou"] and results["move"]["acc"] == mv["acc"]
    assert results["move"]["max_f"] == pytest.approx(mv["f_max"], abs=1e-6)
    assert results["move"]["max_f_per_image"] == pytest.approx(mv["f_max_per_image"], abs=1e-6)
    fd = R.found_metrics(preds, grays)
    assert accs["found"].ious == fd["ious"] and accs["found"].accs == fd["accs"]
    assert np.array_equal(np.stack(accs["found"].f_rows), fd["all_f"])
    assert results["found"]["max_f_per_image"] == pytest.approx(fd["f_max"], abs=1e-12)
    assert results["found"]["iou_last_image"] == fd["iou_last"]
    assert results["found"]["f_measure_at_half"] == pytest.approx(fd["f_measure"], abs=1e-12)


# --- TokenCut's image protocol ----------------------------------------------------------------


def test_resize_rounds_half_to_even_like_resize_pil() -> None:
    for width, expected in ((200, 192), (232, 224), (216, 224), (500, 496), (375, 368)):
        assert P.resized_size(width, 300, 16)[0] == expected == int(round(width / 16)) * 16
    assert P.feature_grid(500, 375, 16) == (23, 31)
    with pytest.raises(LostregError, match="no 16-px patch"):
        P.resized_size(8, 100, 16)  # round(0.5) == 0


def test_resize_is_pil_lanczos_pixel_for_pixel() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (131, 200, 3), dtype=np.uint8))
    ours = P.resize_to_patch_multiple(image, 16)
    w, h = image.size  # TokenCut: I.resize((new_w, new_h), resample=Image.LANCZOS)
    explicit = image.resize((int(round(w / 16)) * 16, int(round(h / 16)) * 16),
                            resample=Image.LANCZOS)
    assert ours.size == (192, 128) and np.array_equal(np.array(ours), np.array(explicit))


def test_nearest_upsampling_is_torch_float32_nearest() -> None:
    """torch's 'nearest' (float32 index arithmetic, as in torch 1.7's kernels, which TokenCut
    ran; today's CPU kernel still uses it for float32 tensors) vs our indices."""
    for in_size in range(1, 40):
        for out_size in range(in_size, 700, 11):
            src = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, in_size)
            torch_idx = F.interpolate(src, size=(1, out_size), mode="nearest").view(-1)
            assert np.array_equal(torch_idx.numpy().astype(np.int64),
                                  P.nearest_source_indices(in_size, out_size))
    # the float32 product is not the exact floor(i * in / out): (2 -> 282) at 141
    assert P.nearest_source_indices(2, 282)[141] == 0 and (141 * 2) // 282 == 1


def test_upsample_patch_mask_pixel_for_pixel() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((23, 31)) < 0.4
    ours = P.upsample_patch_mask(mask, (375, 500))
    reference = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None],
                              size=[375, 500], mode="nearest").squeeze().numpy()
    assert ours.dtype == np.float64 and np.array_equal(ours, reference)
    pil = np.array(Image.fromarray(mask.astype(np.uint8)).resize((500, 375), Image.NEAREST))
    assert not np.array_equal(pil, ours)  # PIL samples pixel centres: another convention


def test_seed_component_is_detect_box_mask() -> None:
    bipartition = np.array([[1, 1, 0, 0],
                            [0, 0, 0, 1],
                            [1, 0, 1, 1]], dtype=bool)
    assert P.seed_component(bipartition, 0).tolist() == [[True, True, False, False],
                                                         [False] * 4, [False] * 4]
    assert P.seed_component(bipartition, 7).sum() == 3  # (1,3), (2,2), (2,3): 4-connected
    assert P.seed_component(bipartition, 2).sum() == 6  # label 0: the background, as TokenCut
    with pytest.raises(LostregError, match="outside"):
        P.seed_component(bipartition, 12)


def test_read_gray_mask_is_pil_convert_l(tmp_path) -> None:
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[1, 1] = (255, 0, 0)
    rgb[2, 3] = (255, 255, 255)
    path = tmp_path / "gt.png"
    Image.fromarray(rgb).save(path)
    gray = S.read_gray_mask(path)
    assert gray.dtype == np.uint8 and gray[1, 1] == 76 and gray[2, 3] == 255
    with pytest.raises(LostregError, match="cannot read"):
        S.read_gray_mask(tmp_path / "missing.png")

"""Finished mask-run folders written by hand in the saliency contract's format, for report tests.

The contract (fixed by the lead for issue 19; ``lostreg.run`` on ``ecssd``/``duts_te``/
``dut_omron`` writes it): an ordinary run folder whose predictions lines hold ``gt_size``
``[width, height]``, ``gt_grey_pixels``, ``sal_iou`` (TokenCut's IoU, ``null`` for 0/0),
``sal_acc``, ``sal_counts`` (``ImageCounts.as_json()``) and ``pred_mask_rle`` (compressed RLE
of the ``> 0.5`` mask, ``counts`` as ASCII); ``metrics.json`` holds ``acc``, ``iou``, ``max_f``
(percent, 4 decimals), ``max_f_threshold``, ``f_curve`` (255 floats),
``saliency_definition``, ``iou_nan_images``, ``iou_empty_as_one`` and ``saliency_variants``;
``config.json`` records ``refine`` and ``mask_protocol`` (both in the identity). The scores
and figures are the saliency metric's own (``lostreg.evaluation.saliency_metric``: ``score``
per line, its aggregate for ``metrics.json``) on generated masks, as a run's are, so a folder
is what a run on those masks would write; ``tests/test_leaderboard_saliency.py`` also reads a
real smoke run's folders.

``scene`` makes one image: a GT rectangle (with grey border pixels when asked) and a predicted
rectangle shifted by ``shift`` pixels (a soft map for a refined run); ``write_mask_run`` writes
a folder from a list of shifts, and the images themselves under ``data_root`` when asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lostreg.evaluation import saliency
from lostreg.evaluation.rle import encode, mask_box
from lostreg.evaluation.saliency_metric import SALIENCY, SaliencyAggregate

WIDTH, HEIGHT = 32, 24
REG = {"model": "dinov2_vits14_reg4", "timm_name": "vit_small_patch14_reg4_dinov2.lvd142m",
       "registers": 4}
TTR = {"model": "dinov2_vits14+ttr", "ttr": 1}
ANCHOR = {"model": "dino_vits16", "timm_name": "vit_small_patch16_224.dino", "family": "dino"}
TOKENCUT_PARAMS = {"tau": 0.2, "eps": 1e-5, "binary_graph": True}


def scene(index: int, shift: int | None, *, soft: bool = False, grey: bool = False,
          width: int = WIDTH, height: int = HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """``(gt uint8, prediction)`` of image ``index``: a GT rectangle whose place depends on the
    index, the prediction the same rectangle moved ``shift`` pixels right (``None``: an empty
    prediction; with ``index`` < 0 the GT is empty too, TokenCut's 0/0 IoU)."""
    gt = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = 2 + index % 5, 3 + index % 4
    if index >= 0:
        gt[y0:y0 + 12, x0:x0 + 14] = 255
        if grey:
            gt[y0, x0:x0 + 14] = 128  # an anti-aliased border: grey pixels
    pred = np.zeros((height, width), dtype=np.float64 if soft else bool)
    if shift is not None and index >= 0:
        x = min(max(x0 + shift, 0), width - 1)
        pred[y0:y0 + 12, x:x + 14] = 0.9 if soft else True
        if soft:
            pred[y0 + 12:y0 + 14, x:x + 14] = 0.3  # soft map: a fringe below 0.5
    return gt, pred


def rle_of(pred: np.ndarray) -> dict[str, Any]:
    """The contract's ``pred_mask_rle``: the ``> 0.5`` mask (``evaluation.rle.encode``)."""
    return encode(pred > 0.5)


def prediction_line(index: int, image_id: str, gt: np.ndarray, pred: np.ndarray) -> dict:
    """One line as a mask run writes it: the saliency metric scores its counts."""
    counts = saliency.image_counts(pred, gt)
    height, width = gt.shape
    binary = pred > 0.5
    line = {"image_id": image_id, "file": f"img/{image_id}.jpg", "width": width,
            "height": height, "box": mask_box(binary), "seed": [0, 0],
            "gt_size": [width, height], "gt_grey_pixels": saliency.grey_pixel_count(gt),
            "sal_counts": counts.as_json(), "pred_mask_rle": rle_of(pred)}
    return {**line, **SALIENCY.score(line, None)}


def saliency_metrics(lines: list[dict]) -> dict[str, Any]:
    """``metrics.json``'s saliency keys: the metric's own aggregate over the lines."""
    aggregate = SaliencyAggregate()
    for line in lines:
        aggregate.update(line)
    result = aggregate.result()
    result.pop("n_images")
    return result


def write_mask_run(root: Path, name: str, shifts: list[int | None], *,
                   model: str = "dinov2_vits14",
                   timm_name: str = "vit_small_patch14_dinov2.lvd142m", family: str = "dinov2",
                   registers: int = 0, ttr: int = 0, dataset: str = "ecssd",
                   method: str = "tokencut", method_params: dict | None = None,
                   refine: str = "none", mask_protocol: str = "tokencut-saliency",
                   smoke: bool = False, limit: int | None = None,
                   dataset_images: int | None = None,
                   finished: str = "2026-01-02T00:00:00+00:00", data_root: Path | None = None,
                   write_images: bool = False, grey: bool = False,
                   empty_images: int = 0) -> Path:
    """A finished mask-run folder: image ``i`` predicted with ``shifts[i]`` (see ``scene``);
    the first ``empty_images`` images have an empty GT and an empty prediction (0/0 IoU)."""
    soft = refine == "bilateral"
    params = dict(TOKENCUT_PARAMS if method_params is None else method_params)
    data_root = data_root or root / "data"
    identity: dict[str, Any] = {
        "lostreg_version": "0.1.0", "model": model, "timm_name": timm_name,
        "weights": "random" if smoke else "sha256:" + "ab" * 32, "dataset": dataset,
        "split": "test", "no_hard": False, "limit": limit, "feature": "k", "precision": "fp32",
        "method": method, "method_params": params, "layer": -1, "normalize": "none",
        "pos_interp": "original", "refine": refine, "mask_protocol": mask_protocol}
    if dataset_images is not None:
        identity["dataset_images"] = dataset_images
    config = {"run_id": name, "identity": identity, "settings": {}, "model": model,
              "timm_name": timm_name, "family": family, "patch_size": 14,
              "num_registers": registers, "test_time_registers": ttr, "num_params": 1234,
              "weights": {"source": "random" if smoke else "hub", "path": None,
                          "sha256": None if smoke else "ab" * 32, "hub_id": None},
              "smoke_run": smoke, "dataset": dataset, "split": "test",
              "data_root": str(data_root), "no_hard": False, "feature": "k", "precision": "fp32",
              "device": "cpu", "device_name": "cpu", "lostreg_version": "0.1.0",
              "git_commit": "abc123", "created": "2026-01-01T00:00:00+00:00", "method": method,
              "method_params": params, "layer": -1, "normalize": "none",
              "pos_interp": "original", "refine": refine, "mask_protocol": mask_protocol}
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    lines, records = [], []
    for i, shift in enumerate(shifts):
        index = -1 if i < empty_images else i
        gt, pred = scene(index, None if index < 0 else shift, soft=soft, grey=grey)
        image_id = f"img_{i:04d}"
        line = prediction_line(index, image_id, gt, pred)
        records.append(line)
        lines.append(json.dumps(line) + "\n")
        if write_images:
            path = data_root / line["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            picture = np.stack([gt // 2 + 40, np.full_like(gt, 90), 200 - gt // 2], axis=-1)
            Image.fromarray(picture.astype(np.uint8)).save(path)
    (run_dir / "predictions.jsonl").write_text("".join(lines))
    metrics = {"run_id": name, "n_images": len(shifts), "smoke_run": smoke,
               "weights": "random" if smoke else "pretrained", "seconds": {"total": 1.5},
               "finished": finished, "model": model, "dataset": dataset, "feature": "k",
               "method": method, "method_params": params, "layer": -1, "normalize": "none",
               "pos_interp": "original", **saliency_metrics(records)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir

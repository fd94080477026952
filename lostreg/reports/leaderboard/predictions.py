"""A run's ``predictions.jsonl``, every line type-checked and every hit recomputed.

The stored ``hit`` and ``best_iou`` are not trusted: each image's best IoU is recomputed from
its ``box`` and ``gt_boxes`` exactly as ``lostreg.evaluation.corloc.best_iou`` computes it (the same
float64 operations, batched over every ground-truth box of the file at once, so a 20k-image
run reads in about the time its JSON takes to parse), and a line whose stored ``hit``
disagrees is damage, reported with its line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.evaluation.corloc import HIT_IOU
from lostreg.reports.leaderboard.fields import Fields

PREDICTION_COLUMNS = ["image_id", "file", "width", "height", "n_objects", "area_share",
                      "best_iou", "hit", "box", "gt_boxes"]


def batched_best_iou(boxes: np.ndarray, gt_boxes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Best IoU of each image's box ``(N, 4)`` with its ground truth: ``gt_boxes`` ``(M, 4)``
    holds every image's GT boxes in turn, ``counts`` ``(N,)`` how many each has. Equal, to the
    bit, to ``lostreg.evaluation.corloc.best_iou`` image by image (0.0 for an image without GT)."""
    owner = np.repeat(np.arange(len(boxes)), counts)
    box = boxes[owner]
    inter_w = np.clip(np.minimum(box[:, 2], gt_boxes[:, 2])
                      - np.maximum(box[:, 0], gt_boxes[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(box[:, 3], gt_boxes[:, 3])
                      - np.maximum(box[:, 1], gt_boxes[:, 1]), 0, None)
    inter = inter_w * inter_h
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    union = area + gt_areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    best = np.zeros(len(boxes), dtype=np.float64)
    np.maximum.at(best, owner, ious)
    return best


def _checked_line(record: Any, where: str) -> dict[str, Any]:
    """One predictions line with every field the leaderboard uses type-checked."""
    if not isinstance(record, dict):
        raise LostregError(f"{where}: not a JSON object")
    line = Fields(record, where)
    checked = {"image_id": line.text("image_id"), "file": line.text("file", None, optional=True),
               "width": line.integer("width", minimum=1),
               "height": line.integer("height", minimum=1),
               "box": line.box("box"), "gt_boxes": line.boxes("gt_boxes")}
    line.number("best_iou")
    checked["stored_hit"] = line.flag("hit")
    return checked


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LostregError(f"{path}: missing (a finished run needs predictions.jsonl)")
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise LostregError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    rows, seen = [], set()
    for number, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{number}"
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LostregError(f"{where}: not valid JSON ({exc})") from None
        row = _checked_line(record, where)
        if row["image_id"] in seen:
            raise LostregError(f"{where}: image_id {row['image_id']!r} appears more than once")
        seen.add(row["image_id"])
        rows.append(row)
    return rows


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Per-image predictions of one run (IoU and hit recomputed), plus ``n_objects`` and
    ``area_share`` (the largest GT box's share of the image) per image.

    Every line must be complete and valid (a finished run's file is; a torn last line means
    the run did not finish), and no ``image_id`` may repeat.
    """
    path = Path(path)
    rows = _read_lines(path)
    counts = np.array([len(row["gt_boxes"]) for row in rows], dtype=np.int64)
    boxes = np.array([row["box"] for row in rows], dtype=np.float64).reshape(-1, 4)
    gts = np.array([gt for row in rows for gt in row["gt_boxes"]],
                   dtype=np.float64).reshape(-1, 4)
    ious = batched_best_iou(boxes, gts, counts)
    hits = ious >= HIT_IOU
    stored = np.array([row["stored_hit"] for row in rows], dtype=bool)
    wrong = np.flatnonzero(hits != stored)
    if wrong.size:
        index = int(wrong[0])
        raise LostregError(f"{path}:{index + 1}: 'hit' is {str(bool(stored[index])).lower()} but "
                           f"the box's best IoU with the ground truth is {ious[index]:.4f} "
                           "(edited or damaged line)")
    largest = np.zeros(len(rows), dtype=np.float64)
    np.maximum.at(largest, np.repeat(np.arange(len(rows)), counts),
                  (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1]))
    sizes = np.array([row["width"] * row["height"] for row in rows], dtype=np.float64)
    frame = pd.DataFrame(rows, columns=[c for c in PREDICTION_COLUMNS
                                        if c not in ("n_objects", "area_share", "best_iou", "hit")])
    frame["n_objects"] = counts
    frame["area_share"] = np.where(counts > 0, largest / np.maximum(sizes, 1.0), np.nan)
    frame["best_iou"] = ious
    frame["hit"] = hits
    return frame[PREDICTION_COLUMNS]

"""Finished run folders written by hand in ``lostreg.run``'s format, for tests that read them.

``write_run`` writes config.json, predictions.jsonl and metrics.json for given per-image hits.
By default it writes a folder as the current schema has it (``method``, ``method_params``,
``layer``, ``normalize``, ``pos_interp``, ``test_time_registers``); ``legacy=True`` writes one
from before those keys existed. ``edit_json`` rewrites one key of a file (damage on purpose).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lostreg.evaluation.iou import best_iou

GT = [10.0, 10.0, 60.0, 50.0]  # a 50x40 box in a 100x80 image: area share 0.25
HIT_BOX, MISS_BOX = [12, 11, 60, 50], [70, 60, 99, 79]
REG = {"model": "dinov2_vits14_reg4", "timm_name": "vit_small_patch14_reg4_dinov2.lvd142m",
       "registers": 4}
TTR = {"model": "dinov2_vits14+ttr", "ttr": 1}
DEFAULT_PARAMS = {"k_patches": 100, "gram_bias": 0.0}


def write_run(root: Path, name: str, hits, *, model: str = "dinov2_vits14",
              timm_name: str = "vit_small_patch14_dinov2.lvd142m", family: str = "dinov2",
              registers: int = 0, ttr: int = 0, dataset: str = "voc07", feature: str = "k",
              precision: str = "fp32", limit: int | None = None, smoke: bool = False,
              finished: str = "2026-01-02T00:00:00+00:00", image_ids=None,
              sha: str = "ab" * 32, finish: bool = True, method: str = "lost",
              method_params: dict | None = None, layer: int = -1, normalize: str = "none",
              pos_interp: str = "original", pos_resolved: str | None = None,
              legacy: bool = False) -> Path:
    """A run folder in the format lostreg.run writes, with the given per-image hits."""
    hits = [bool(h) for h in hits]
    ids = image_ids or [f"{i:06d}" for i in range(len(hits))]
    params = dict(DEFAULT_PARAMS if method_params is None else method_params)
    lost_fields = {"k_patches": params.get("k_patches", 100),
                   "gram_bias": params.get("gram_bias", 0.0)}
    identity: dict[str, Any] = {
        "lostreg_version": "0.1.0", "model": model, "timm_name": timm_name, "pos_embed": "timm",
        "weights": "random" if smoke else f"sha256:{sha}", "dataset": dataset,
        "split": "trainval", "no_hard": False, "limit": limit, "feature": feature,
        "precision": precision}
    protocol = {"method": method, "method_params": params, "layer": layer,
                "normalize": normalize, "pos_interp": pos_interp,
                "test_time_registers": ttr}
    if legacy:
        identity.update(lost_fields)
    else:
        identity.update({key: value for key, value in protocol.items()
                         if key != "test_time_registers"})
    weights = {"source": "random" if smoke else "hub", "path": None,
               "sha256": None if smoke else sha, "hub_id": None}
    config = {"run_id": name, "identity": identity, "settings": {}, "model": model,
              "timm_name": timm_name, "family": family, "patch_size": 14,
              "num_registers": registers, "num_params": 1234, "weights": weights,
              "smoke_run": smoke, "dataset": dataset, "split": "trainval",
              "data_root": str(root / "data"), "no_hard": False, "feature": feature,
              **lost_fields, "precision": precision, "device": "cpu", "device_name": "cpu",
              "lostreg_version": "0.1.0", "git_commit": "abc123",
              "created": "2026-01-01T00:00:00+00:00"}
    if pos_resolved is not None:
        config["pos_embed_interpolation"] = pos_resolved
    if not legacy:
        config.update(protocol)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    lines = []
    for image_id, hit in zip(ids, hits, strict=True):
        box = HIT_BOX if hit else MISS_BOX
        line = {"image_id": image_id, "file": f"JPEGImages/{image_id}.jpg", "width": 100,
                "height": 80, "box": box, "seed": [1, 1], "gt_boxes": [GT],
                "best_iou": round(best_iou(box, [GT]), 6), "hit": hit}
        if smoke:
            line["weights"] = "random"
        lines.append(json.dumps(line) + "\n")
    (run_dir / "predictions.jsonl").write_text("".join(lines))
    if finish:
        metrics = {"run_id": name, "corloc": 100 * sum(hits) / len(hits), "n_images": len(hits),
                   "n_hits": sum(hits), "smoke_run": smoke,
                   "weights": "random" if smoke else "pretrained",
                   "seconds": {"total": 1.5}, "finished": finished, "model": model,
                   "dataset": dataset, "feature": feature}
        if not legacy:
            metrics.update({key: value for key, value in protocol.items()
                            if key != "test_time_registers"})
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def edit_json(path: Path, **changes: Any) -> None:
    """Set keys of a JSON file (damage on purpose)."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_line(path: Path, number: int, **changes: Any) -> None:
    """Set keys of line ``number`` (1-based) of a JSON-lines file."""
    lines = path.read_text().splitlines()
    record = json.loads(lines[number - 1])
    record.update(changes)
    lines[number - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def pair_hits(b: int, c: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    """base/other hits with b miss->hit and c hit->miss images."""
    base = [False] * b + [True] * c + [True] * both + [False] * neither
    other = [True] * b + [False] * c + [True] * both + [False] * neither
    return base, other

"""Read a ``lostreg.run`` folder and rebuild what produced it (model, weights, dataset).

The analyses explain one run, so they must see the same model: the weights are located from
``config.json`` and checked against the recorded sha256 before anything is computed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lostreg.backbones import Backbone, create_backbone
from lostreg.datasets import load_dataset
from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.errors import LostregError
from lostreg.features import padded_size
from lostreg.io import read_json_object, read_jsonl

CONFIG_KEYS = ("model", "patch_size", "dataset", "weights", "feature", "k_patches", "gram_bias")
PREDICTION_KEYS = ("image_id", "width", "height", "box", "seed", "hit")


@dataclass
class RunInfo:
    """A run folder's ``config.json`` and ``predictions.jsonl`` (dataset order)."""

    run_dir: Path
    config: dict
    predictions: list[dict]

    @property
    def run_id(self) -> str:
        return str(self.config.get("run_id", self.run_dir.name))

    @property
    def patch_size(self) -> int:
        return int(self.config["patch_size"])

    @property
    def analysis_dir(self) -> Path:
        return self.run_dir / "analysis"

    def grid(self, prediction: dict) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of a predicted image (padded to the patch size)."""
        height, width = padded_size(int(prediction["height"]), int(prediction["width"]),
                                    self.patch_size)
        return height // self.patch_size, width // self.patch_size


def _check_prediction(path: Path, number: int, line: dict) -> None:
    missing = [k for k in PREDICTION_KEYS if k not in line]
    if missing:
        raise LostregError(f"{path}: line {number} lacks {', '.join(missing)}")
    seed, box = line["seed"], line["box"]
    if not (isinstance(seed, list) and len(seed) == 2 and all(isinstance(v, int) for v in seed)):
        raise LostregError(f"{path}: line {number}: seed must be [row, col] integers, got {seed!r}")
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) for v in box)):
        raise LostregError(f"{path}: line {number}: box must be [x1, y1, x2, y2], got {box!r}")


def load_run(run_dir: str | Path) -> RunInfo:
    """Read and validate a run folder; raises ``LostregError`` naming the bad file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LostregError(f"{run_dir}: run folder not found")
    config_path = run_dir / "config.json"
    config = read_json_object(config_path, f"not found; is {run_dir} a lostreg.run folder?")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise LostregError(f"{config_path}: missing {', '.join(missing)}")
    predictions_path = run_dir / "predictions.jsonl"
    if not predictions_path.is_file():
        raise LostregError(f"{predictions_path}: not found; the run has no predictions yet")
    try:
        predictions = list(read_jsonl(predictions_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LostregError(f"{predictions_path}: not valid JSON lines ({exc})") from None
    if not predictions:
        raise LostregError(f"{predictions_path}: no predictions")
    for number, line in enumerate(predictions, start=1):
        if not isinstance(line, dict):
            raise LostregError(f"{predictions_path}: line {number} is not a JSON object")
        _check_prediction(predictions_path, number, line)
    if not (run_dir / "metrics.json").is_file():
        print(f"warning: {run_dir} is unfinished (no metrics.json); using its "
              f"{len(predictions)} predictions", file=sys.stderr)
    return RunInfo(run_dir, config, predictions)


def weights_argument(config: dict) -> str:
    """The ``--weights`` value that rebuilds the run's model."""
    weights = config["weights"] if isinstance(config["weights"], dict) else {}
    source = weights.get("source")
    if source == "random":
        return "random"
    if source == "hub":
        return "hub"
    if source == "file" and weights.get("path"):
        return str(weights["path"])
    raise LostregError(f"config.json: unknown weights record {config['weights']!r}")


def ttr_neurons_argument(info: RunInfo) -> str | None:
    """The ``--ttr-neurons`` file of a ``+ttr`` run (None: the shipped list, or no ``+ttr``),
    from ``config.json``'s ``ttr_neurons`` record (``BackboneSpec.describe()``)."""
    record = info.config.get("ttr_neurons")
    if not isinstance(record, dict) or str(record.get("source", "")).startswith("shipped:"):
        return None
    source = record.get("source")
    if not isinstance(source, str) or not Path(source).is_file():
        raise LostregError(f"{info.run_dir / 'config.json'}: the run's register-neuron list "
                           f"{source!r} is gone; put it back to rebuild the model")
    return source


def rebuild_backbone(info: RunInfo, device: torch.device, weights: str | None = None) -> Backbone:
    """The run's backbone with the run's weights (sha256-checked), or ``weights`` if given."""
    config = info.config
    backbone = create_backbone(config["model"], weights or weights_argument(config), device,
                               pos_interp=config.get("pos_interp") or None,
                               ttr_neurons=ttr_neurons_argument(info))
    recorded = config["weights"].get("sha256") if isinstance(config["weights"], dict) else None
    if (config["weights"].get("source") == "random") != backbone.weights.is_random:
        raise LostregError(f"{info.run_dir / 'config.json'}: the run used "
                           f"{weights_argument(config)!r} weights, not {weights!r}")
    if recorded and backbone.weights.sha256 and recorded != backbone.weights.sha256:
        raise LostregError(
            f"{info.run_dir / 'config.json'}: the run used weights sha256 {recorded[:12]}..., "
            f"but {backbone.weights.path} has {backbone.weights.sha256[:12]}...; pass --weights "
            "with the run's checkpoint")
    ttr = config.get("ttr_neurons")
    if isinstance(ttr, dict) and backbone.spec.ttr is not None \
            and ttr.get("sha256") != backbone.spec.ttr.sha256:
        raise LostregError(f"{info.run_dir / 'config.json'}: the register-neuron list "
                           f"{backbone.spec.ttr.source} changed since the run (sha256 differs)")
    if backbone.patch_size != info.patch_size:
        raise LostregError(f"{info.run_dir / 'config.json'}: patch size {info.patch_size} but "
                           f"model {config['model']} has {backbone.patch_size}")
    return backbone


def run_records(info: RunInfo, data_root: str | Path | None = None
                ) -> tuple[DatasetIndex, dict[str, ImageRecord]]:
    """The run's dataset (rebuilt from config) and the records of its images by image id."""
    config = info.config
    settings = config.get("settings") if isinstance(config.get("settings"), dict) else {}
    root = data_root if data_root is not None else settings.get("data_root")
    if root is None:
        raise LostregError(f"{info.run_dir / 'config.json'}: no settings.data_root; "
                           "pass --data-root")
    index = load_dataset(config["dataset"], Path(root), no_hard=bool(config.get("no_hard")),
                         download=config["dataset"] == "demo",
                         download_hint="or pass --data-root with the folder the run used")
    by_id = {record.image_id: record for record in index.records}
    missing = [p["image_id"] for p in info.predictions if p["image_id"] not in by_id]
    if missing:
        raise LostregError(f"{len(missing)} images of {info.run_dir} (e.g. {missing[0]!r}) are "
                           f"not in dataset {config['dataset']} under {root}; pass --data-root")
    return index, by_id

"""Read a ``lostreg.run`` folder and rebuild what produced it (model, weights, dataset, method).

The analyses explain one run, so they must see the same model: the weights are located from
``config.json`` and checked against the recorded sha256 before anything is computed. Folders
written before the method registry lack ``method``, ``method_params``, ``layer`` and
``normalize``; they are read with the defaults those runs used (LOST, its ``k_patches`` and
``gram_bias`` from the top level, the last block, no normalisation).

A run folder without ``metrics.json`` (killed, or still running) is analysed on the images
it has, with one warning line (``load_run``; the decision is made once, for box and mask runs
alike), and every output written from it says so, with the images it had then and the run's
total when its identity tells (``RunInfo.unfinished_mark``, wording in ``marks``). A mask run
(ECSSD, DUTS-TE, DUT-OMRON: ``lostreg.runs.store.run_target``) is read through the saliency
reports' checks: every line's ``sal_iou`` recomputed from its counts, its ``pred_mask_rle``
checked against them, and, for a finished run only, the run's figures in ``metrics.json``
against its lines (``load_mask_run``: a finished run whose files disagree is refused; an
unfinished one has no figures to disagree with). Its images were resized to a patch multiple
(TokenCut's saliency protocol), so its patch grid is the resized image's, not the padded one.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lostreg.backbones import Backbone, create_backbone
from lostreg.datasets import DATASETS, load_dataset
from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.errors import LostregError
from lostreg.evaluation.saliency_protocol import MASK_PROTOCOL, feature_grid
from lostreg.features.extract import FeatureRequest, padded_size
from lostreg.fields import Fields
from lostreg.methods import MethodSpec, get_method, list_methods
from lostreg.reports.analysis import marks
from lostreg.runs.legacy import config_value
from lostreg.runs.store import is_finished, read_config, read_lines, run_target

CONFIG_KEYS = ("model", "patch_size", "dataset", "weights", "feature")
PREDICTION_KEYS = ("image_id", "width", "height", "box", "seed", "hit")
MASK_PREDICTION_KEYS = ("image_id", "width", "height", "seed", "sal_iou", "pred_mask_rle")
NORMALIZATIONS = ("none", "l2")


@dataclass(frozen=True)
class RunMethod:
    """How a run turned features into boxes: the registry method, its parameters, and the
    features it read (kind of block ``layer``, optionally L2-normalised per patch)."""

    name: str
    params: dict[str, Any]
    feature: str
    layer: int = -1
    normalize: str = "none"

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.name)

    @property
    def request(self) -> FeatureRequest:
        return FeatureRequest(self.feature, self.layer)

    def describe(self) -> str:
        """``lost (k_patches=100, gram_bias=0.0) on k``: for notes and captions."""
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        text = f"{self.name} ({params})" if params else self.name
        text += f" on {self.request.label}"
        return text + (f", {self.normalize}-normalised" if self.normalize != "none" else "")


def method_of(config: dict, config_path: Path) -> RunMethod:
    """The run's :class:`RunMethod`, validated against the method registry."""
    name = config_value(config, "method")
    if not isinstance(name, str) or name not in list_methods():
        raise LostregError(f"{config_path}: method {name!r} is not known to this lostreg "
                           f"(known: {', '.join(list_methods())})")
    spec = get_method(name)
    stored = config.get("method_params")
    if stored is not None and not isinstance(stored, dict):
        raise LostregError(f"{config_path}: method_params must be an object, got {stored!r}")
    top_level = [p.name for p in spec.params if p.on_config]
    missing = [key for key in top_level if key not in config]
    if stored is None and missing:  # a folder from before the registry has them all
        raise LostregError(f"{config_path}: missing {', '.join(missing)}")
    values = {key: config[key] for key in top_level if key in config}
    values.update(stored or {})
    try:
        params = spec.resolve(values)
    except LostregError as exc:
        raise LostregError(f"{config_path}: {exc}") from None
    layer, normalize = config_value(config, "layer"), config_value(config, "normalize")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LostregError(f"{config_path}: layer must be an integer, got {layer!r}")
    if normalize not in NORMALIZATIONS:
        raise LostregError(f"{config_path}: normalize must be one of "
                           f"{', '.join(NORMALIZATIONS)}, got {normalize!r}")
    return RunMethod(name, params, str(config["feature"]), layer, normalize)


@dataclass
class RunInfo:
    """A run folder's ``config.json`` and ``predictions.jsonl`` (dataset order); ``target``
    is the ground-truth kind it was scored on (``boxes``, or ``mask`` for a saliency run);
    ``finished``: whether ``metrics.json`` was there when it was read (an unfinished run's
    outputs say so, ``unfinished_mark``)."""

    run_dir: Path
    config: dict
    predictions: list[dict]
    target: str = "boxes"
    finished: bool = True

    @property
    def is_mask(self) -> bool:
        return self.target == "mask"

    @property
    def refine(self) -> str:
        """A mask run's ``--refine`` (``none`` for a box run)."""
        return str(self.config.get("refine") or "none")

    @property
    def run_id(self) -> str:
        return str(self.config.get("run_id", self.run_dir.name))

    @property
    def patch_size(self) -> int:
        return int(self.config["patch_size"])

    @property
    def analysis_dir(self) -> Path:
        return self.run_dir / "analysis"

    @property
    def smoke(self) -> bool:
        """A run from random weights (never a result)."""
        weights = self.config["weights"] if isinstance(self.config["weights"], dict) else {}
        return bool(self.config.get("smoke_run")) or weights.get("source") == "random"

    @cached_property
    def method(self) -> RunMethod:
        return method_of(self.config, self.run_dir / "config.json")

    @cached_property
    def split_images(self) -> int | None:
        """How many images the run predicts once finished, from its ``config.json`` (see
        ``split_images``); None when it does not tell."""
        return split_images(self.config, self.run_dir / "config.json")

    def unfinished_mark(self, label: str = "") -> str:
        """The words every output of an unfinished run carries (``marks.unfinished_mark``:
        how many images it had predicted, of how many); '' for a finished run."""
        if self.finished:
            return ""
        return marks.unfinished_mark(len(self.predictions), self.split_images, label)

    def unfinished_fields(self) -> dict[str, Any]:
        """``{"unfinished_run": {...}}`` for a JSON output of an unfinished run (counts and
        words, ``marks.unfinished_record``); nothing for a finished one, whose files stay as
        they were."""
        if self.finished:
            return {}
        return {"unfinished_run": marks.unfinished_record(len(self.predictions),
                                                          self.split_images)}

    @property
    def image_protocol(self) -> str:
        """How the run fed its images to the model: ``pad`` (CorLoc), or ``resize`` to a
        patch multiple (a mask run: TokenCut's saliency protocol)."""
        return "resize" if self.is_mask else "pad"

    def grid(self, prediction: dict) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of a predicted image: padded to the patch size, or,
        for a mask run, of the image resized to the nearest patch multiple."""
        height, width = int(prediction["height"]), int(prediction["width"])
        if self.is_mask:
            return feature_grid(width, height, self.patch_size)
        height, width = padded_size(height, width, self.patch_size)
        return height // self.patch_size, width // self.patch_size


def _check_prediction(path: Path, number: int, line: dict, mask: bool = False) -> None:
    """The keys the analyses read, typed; a mask line's box may be null (an image whose
    features were not finite: its mask is empty)."""
    missing = [k for k in (MASK_PREDICTION_KEYS if mask else PREDICTION_KEYS) if k not in line]
    if missing:
        raise LostregError(f"{path}: line {number} lacks {', '.join(missing)}")
    seed, box = line["seed"], line.get("box")
    if seed is not None and not (isinstance(seed, list) and len(seed) == 2
                                 and all(type(v) is int for v in seed)):
        raise LostregError(f"{path}: line {number}: seed must be [row, col] integers or null, "
                           f"got {seed!r}")
    if mask and box is None:
        return
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise LostregError(f"{path}: line {number}: box must be [x1, y1, x2, y2], got {box!r}")


def prediction_seed(prediction: dict) -> tuple[int, int] | None:
    """The seed patch ``(row, col)`` of a prediction, ``None`` for a method without a seed."""
    seed = prediction.get("seed")
    return None if seed is None else (int(seed[0]), int(seed[1]))


def load_run(run_dir: str | Path) -> RunInfo:
    """Read and validate a run folder (through ``lostreg.runs.store``); raises
    ``LostregError`` naming the bad file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LostregError(f"{run_dir}: run folder not found")
    config = read_config(run_dir)
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise LostregError(f"{run_dir / 'config.json'}: missing {', '.join(missing)}")
    target = run_target(config)
    # decided before the lines are read: metrics.json is written last, so a finished run's
    # lines read after it are the ones its figures were computed from
    finished = is_finished(run_dir)
    predictions = read_lines(run_dir)
    if target == "mask":
        _check_mask_run(run_dir, config, predictions, finished)
    predictions_path = run_dir / "predictions.jsonl"
    if not predictions:
        raise LostregError(f"{predictions_path}: no predictions")
    for number, line in enumerate(predictions, start=1):
        _check_prediction(predictions_path, number, line, mask=target == "mask")
    if not finished:
        warn_unfinished(run_dir, len(predictions))
    info = RunInfo(run_dir, config, predictions, target, finished)
    info.method  # noqa: B018 (validates method, parameters, layer and normalize now)
    if not finished:  # the counts its marks give, validated now (a finished run needs none)
        info.split_images  # noqa: B018
    return info


def split_images(config: dict, config_path: Path) -> int | None:
    """How many images a run predicts once finished, from ``config.json``'s identity: its
    ``--limit`` (a limit beyond the split is refused by the run, so it is the count), else
    a partial dataset's recorded count, else the benchmark's count of a registered split
    (every run on it was checked to list exactly that many), except under ``--no-hard``
    (smaller by design, and not recorded). None when the identity does not tell (a folder
    without one, an unregistered dataset such as ``demo``): the marks then give the
    predicted count alone, never a guess."""
    identity = config.get("identity")
    if not isinstance(identity, dict):
        return None
    fields = Fields(identity, f"{config_path} (identity)")
    limit = fields.integer("limit", None, minimum=1, optional=True)
    if limit is not None:
        return limit
    partial = fields.integer("dataset_images", None, minimum=1, optional=True)
    if partial is not None:
        return partial
    spec = DATASETS.get(str(identity.get("dataset", config.get("dataset"))))
    if spec is None or identity.get("no_hard") is not False:
        return None
    return spec.expected_images


def run_kind(run_dir: str | Path) -> str:
    """The ground-truth kind a run folder was scored on (``boxes`` or ``mask``), from its
    ``config.json`` alone: which analysis reads it."""
    if not Path(run_dir).is_dir():
        raise LostregError(f"{run_dir}: run folder not found")
    return run_target(read_config(Path(run_dir)))


def unfinished_marks(infos: list[RunInfo], labels: list[str] | None = None) -> list[str]:
    """The unfinished marks of several runs (one per unfinished run, named by its label when
    ``labels`` are given), in run order; [] when every run is finished."""
    names = labels if labels is not None else [""] * len(infos)
    return [info.unfinished_mark(label) for info, label in zip(infos, names, strict=True)
            if not info.finished]


def warn_unfinished(run_dir: Path, n_images: int) -> None:
    """The one line an analysis of an unfinished run (box or mask) prints: results on the
    images predicted so far are not the run's. Once per command, since a command reads each
    run once (``load_run``, or ``load_runs`` for several)."""
    print(f"warning: {run_dir} is unfinished (no metrics.json); using the {n_images} images "
          "it has predicted so far", file=sys.stderr)


def _check_mask_run(run_dir: Path, config: dict, lines: list[dict], finished: bool) -> None:
    """A mask run is analysed only under the mask protocol this lostreg reproduces, with its
    files checked by the saliency reports' checks, on the very ``lines`` the analysis reads
    (the file is read once): a finished run's by its loader (scores recomputed, masks against
    counts, ``metrics.json``'s figures against the lines: files that disagree are one line,
    never an analysis); an unfinished run's config and lines in the same way, only the
    figures, not written yet, left out."""
    from lostreg.reports.leaderboard.saliency_runs import (
        check_unfinished_mask_run,
        load_mask_run,
    )

    if config.get("mask_protocol") != MASK_PROTOCOL:
        raise LostregError(f"{run_dir / 'config.json'}: mask_protocol "
                           f"{config.get('mask_protocol')!r} is not known to this lostreg "
                           f"(known: {MASK_PROTOCOL})")
    if finished:
        load_mask_run(run_dir, lines=lines)  # the lines read once, checked against its files
    else:
        check_unfinished_mask_run(run_dir, config, lines)


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


# --- several runs --------------------------------------------------------------------------


def _settings(info: RunInfo) -> dict[str, str]:
    """What tells runs apart besides the method and its parameters, as ``key: value`` text."""
    config = info.config
    weights = config["weights"] if isinstance(config["weights"], dict) else {}
    return {
        "model": str(config["model"]),
        "weights": str(weights.get("sha256") or weights.get("path") or weights.get("source")),
        "feature": info.method.request.label,
        "normalize": info.method.normalize,
        "pos_interp": str(config.get("pos_interp", "original")),
        "precision": str(config.get("precision", "fp32")),
        "no_hard": str(bool(config.get("no_hard"))),
        "test_time_registers": str(config.get("test_time_registers", 0)),
        "refine": info.refine,
    }


def run_labels(infos: list[RunInfo]) -> list[str]:
    """Short, distinct labels of runs compared side by side: the method's name, then only what
    differs between them (settings as ``key=value``, the model bare, and a method's parameters
    where two runs of that method differ in them); ``#n`` where nothing differs."""
    settings = [_settings(info) for info in infos]
    varying = [key for key in settings[0] if len({s[key] for s in settings}) > 1]
    labels = []
    for info, setting in zip(infos, settings, strict=True):
        method = info.method
        parts = [method.name]
        same_method = [other.method for other in infos if other.method.name == method.name]
        for key, value in sorted(method.params.items()):
            if len({repr(other.params.get(key)) for other in same_method}) > 1:
                parts.append(f"{key}={value}")
        for key in varying:
            if key == "weights":
                parts.append(f"weights {setting[key][:12]}")
            else:
                parts.append(setting[key] if key == "model" else f"{key}={setting[key]}")
        labels.append(" ".join(parts))
    return [f"{label} #{number + 1}" if labels.count(label) > 1 else label
            for number, label in enumerate(labels)]


def label_slug(label: str) -> str:
    """A label as a CSV column suffix: letters, digits, ``.``, ``=`` and ``_``."""
    return "".join(c if c.isalnum() or c in "._=" else "_" for c in label).strip("_")


def compare_dir(infos: list[RunInfo]) -> Path:
    """Default folder of a comparison of runs: ``results/analysis/compare-<dataset>-<hash>``
    (``smoke-`` in front when a run used random weights), the hash naming the set of runs."""
    digest = hashlib.sha256("\n".join(sorted(i.run_id for i in infos)).encode()).hexdigest()
    smoke = "smoke-" if any(i.smoke for i in infos) else ""
    return Path("results/analysis") / f"{smoke}compare-{infos[0].config['dataset']}-{digest[:10]}"


def load_runs(run_dirs: list[str | Path]) -> list[RunInfo]:
    """Several run folders over the same dataset, for a side-by-side comparison: each read
    once (a command hands these ``RunInfo`` on to every output it writes, never rereads)."""
    unique = list(dict.fromkeys(Path(d).resolve() for d in run_dirs))
    if len(unique) < 2:
        raise LostregError("--run: give at least two different run folders to compare")
    return check_comparable([load_run(d) for d in unique])


def check_comparable(infos: list[RunInfo]) -> list[RunInfo]:
    """``infos``, once checked to be runs of one kind over the same images (what
    ``load_runs`` checks; a table handed loaded runs checks them again, reading nothing)."""
    if len({info.run_dir.resolve() for info in infos}) < 2:
        raise LostregError("--run: give at least two different run folders to compare")
    first = infos[0]
    for info in infos[1:]:
        if info.target != first.target:
            raise LostregError(
                f"--run: {info.run_dir.name} was scored on {info.target} but "
                f"{first.run_dir.name} on {first.target}; a box run (CorLoc) and a mask run "
                "(saliency) never share images: compare runs of one kind")
        for key in ("dataset", "no_hard"):
            if info.config.get(key) != first.config.get(key):
                raise LostregError(
                    f"{info.run_dir / 'config.json'}: {key} {info.config.get(key)!r}, but "
                    f"{first.run_dir.name} has {first.config.get(key)!r}; compare runs on the "
                    "same images")
    return infos


def loaded_runs(runs: Sequence[str | Path | RunInfo]) -> list[RunInfo]:
    """Runs for a comparison table: those already loaded (``RunInfo``, checked again, read
    no more), else the folders read once (``load_runs``)."""
    runs = list(runs)
    if runs and all(isinstance(run, RunInfo) for run in runs):
        return check_comparable(runs)
    return load_runs(runs)


def common_predictions(infos: list[RunInfo]) -> tuple[list[str], list[dict[str, dict]]]:
    """Image ids predicted by every run (the first run's order) and each run's predictions by
    image id; no common image is one clear line."""
    by_run = [{str(p["image_id"]): p for p in info.predictions} for info in infos]
    common = [i for i in by_run[0] if all(i in other for other in by_run[1:])]
    if not common:
        raise LostregError(f"the runs share no image ({', '.join(i.run_id for i in infos)})")
    return common, by_run

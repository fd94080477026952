"""Reading run folders: the one reader every report uses (leaderboard, protocol, analysis).

A finished run folder holds ``config.json``, ``predictions.jsonl`` and ``metrics.json``. Nothing
in them is trusted: each value used is type-checked (``lostreg.fields``), each image's score is
recomputed from its prediction and the ground truth its line holds (``lostreg.evaluation``: a
line whose stored ``hit`` disagrees is damage, not data), and the three files must agree. A
folder that fails is *skipped* with one line saying why; the rest are still read
(``scan_runs``). Folders of earlier releases are read with what those runs used
(``lostreg.runs.legacy``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.evaluation import stats
from lostreg.evaluation.corloc import HIT_IOU
from lostreg.evaluation.iou import best_ious
from lostreg.fields import Fields, shown
from lostreg.io import JsonInputError, loads_bounded, read_json_object, read_jsonl
from lostreg.runs.legacy import CONFIG_DEFAULTS, LEGACY_METHOD

CONFIG, PREDICTIONS, METRICS = "config.json", "predictions.jsonl", "metrics.json"
# what to do about a finished folder whose config.json or metrics.json is damaged: the run's own
# command validates both against its predictions and rewrites them (``lostreg.runs.state``)
REWRITE_HINT = "rerun the same lostreg.run command (it validates the folder) to rewrite"

# settings read from config.json that metrics.json may repeat: the two must agree
CROSS_CHECKED = ("run_id", "model", "dataset", "feature", "method", "method_params", "layer",
                 "normalize", "pos_interp")


@dataclass(frozen=True)
class RunInfo:
    """The typed settings of one run (config.json, with the schema's defaults)."""

    run_id: str
    identity: dict
    model: str
    timm_name: str
    family: str
    num_registers: int
    test_time_registers: int
    dataset: str
    split: str
    no_hard: bool
    limit: int | None
    method: str
    method_params: dict
    feature: str
    layer: int
    normalize: str
    pos_interp: str
    pos_resolved: str | None  # the interpolation mode it resolved to (e.g. dinov2_reg)
    precision: str
    weights_source: str | None
    weights_sha256: str | None
    num_params: int | None
    patch_size: int | None
    lostreg_version: str | None
    git_commit: str | None
    device: str | None

    def identity_key(self, **extra: Any) -> str:
        """What makes two finished runs one entry (the newest wins): equal identities and
        equal resolved method and protocol; a report with more settings (a mask run's refine
        and protocol) passes them as ``extra``."""
        resolved = {"method": self.method, "method_params": self.method_params,
                    "feature": self.feature, "layer": self.layer, "normalize": self.normalize,
                    "pos_interp": self.pos_interp, "ttr": self.test_time_registers, **extra}
        return json.dumps({"identity": self.identity, "resolved": resolved}, sort_keys=True)


# --- one folder's files, as the tools that explain a run read them ------------------------


def read_config(run_dir: Path) -> dict:
    """A run folder's ``config.json`` (a JSON object), or one line saying what is wrong."""
    return read_json_object(Path(run_dir) / CONFIG,
                            f"not found; is {run_dir} a lostreg.run folder?")


def read_lines(run_dir: Path) -> list[dict]:
    """The lines of a run's ``predictions.jsonl`` in file order, each a JSON object, or one line
    naming the file and line. Their scores are not recomputed here: the analyses and verify
    read boxes and seeds (``load_run`` and the writer's reader recompute scores)."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        raise LostregError(f"{path}: not found; the run has no predictions yet")
    try:
        lines = list(read_jsonl(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LostregError(f"{path}: not valid JSON lines ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not isinstance(line, dict):
            raise LostregError(f"{path}: line {number} is not a JSON object")
    return lines


def is_finished(run_dir: Path) -> bool:
    """Whether a folder holds a finished run (``metrics.json`` is written last)."""
    return (Path(run_dir) / METRICS).is_file()


# --- config.json -----------------------------------------------------------------------------


def _method_params(config: Fields, method: str) -> dict:
    """``method_params``; a LOST run written before the registry keeps them on the config."""
    if "method_params" in config.data or method != LEGACY_METHOD:
        params = dict(config.scalars("method_params", {}))
    else:
        params = {"k_patches": config.integer("k_patches", minimum=1),
                  "gram_bias": config.number("gram_bias")}
    if method == LEGACY_METHOD:
        checked = Fields(params, f"{config.where} (method_params)")
        params["k_patches"] = checked.integer("k_patches", minimum=1)
        params["gram_bias"] = checked.number("gram_bias")
    return dict(sorted(params.items()))


def _weights(config: Fields) -> tuple[str | None, str | None]:
    weights = config.data.get("weights")
    if isinstance(weights, str):
        return weights, None
    described = Fields(config.mapping("weights"), f"{config.where} (weights)")
    return (described.text("source", None, optional=True),
            described.text("sha256", None, optional=True))


def parse_config(data: dict, where: str) -> RunInfo:
    """Every setting the leaderboard uses, type-checked, with the schema's defaults."""
    config = Fields(data, where)
    identity = config.mapping("identity")
    method = config.text("method", CONFIG_DEFAULTS["method"])
    source, sha256 = _weights(config)
    return RunInfo(
        run_id=config.text("run_id", None, optional=True) or "",
        identity=identity,
        model=config.text("model"), timm_name=config.text("timm_name"),
        family=config.text("family"),
        num_registers=config.integer("num_registers", minimum=0),
        test_time_registers=config.integer("test_time_registers",
                                           CONFIG_DEFAULTS["test_time_registers"], minimum=0),
        dataset=config.text("dataset"), split=config.text("split"),
        no_hard=config.flag("no_hard"),
        limit=Fields(identity, f"{where} (identity)").integer("limit", None, minimum=1,
                                                               optional=True),
        method=method, method_params=_method_params(config, method),
        feature=config.text("feature"), layer=config.integer("layer", CONFIG_DEFAULTS["layer"]),
        normalize=config.text("normalize", CONFIG_DEFAULTS["normalize"]),
        pos_interp=config.text("pos_interp", CONFIG_DEFAULTS["pos_interp"]),
        pos_resolved=config.text("pos_embed_interpolation", None, optional=True),
        precision=config.text("precision"),
        weights_source=source, weights_sha256=sha256,
        num_params=config.integer("num_params", None, minimum=0, optional=True),
        patch_size=config.integer("patch_size", None, minimum=1, optional=True),
        lostreg_version=config.text("lostreg_version", None, optional=True),
        git_commit=config.text("git_commit", None, optional=True),
        device=config.text("device_name", None, optional=True)
        or config.text("device", None, optional=True),
    )


@dataclass
class RunData:
    """One finished run as the leaderboard sees it (predictions with recomputed hits)."""

    run_dir: Path
    config: dict
    metrics: dict
    predictions: pd.DataFrame
    smoke: bool
    finished: datetime
    info: RunInfo = field(repr=False, default=None)  # type: ignore[assignment]
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.info is None:  # built by hand (notebooks): parse what was given
            self.info = parse_config(self.config, str(self.run_dir / "config.json"))

    @property
    def run_id(self) -> str:
        return self.info.run_id or self.run_dir.name

    @property
    def identity_key(self) -> str:
        """Runs with equal identities (and equal method/protocol) are one entry."""
        return self.info.identity_key()

    @property
    def limit(self) -> int | None:
        return self.info.limit

    @cached_property
    def summary(self) -> dict[str, Any]:
        """CorLoc and its bootstrap interval, computed once (leaderboard and pairs share it)."""
        hits = self.predictions["hit"].to_numpy(dtype=bool)
        low, high = stats.bootstrap_corloc_ci(hits)
        return {"n": int(hits.size), "n_hits": int(hits.sum()),
                "corloc": stats.corloc_percent(hits), "low": low, "high": high}

    def settings(self) -> dict[str, Any]:
        """Everything that must be equal for two runs to be compared in one cell: dataset and
        images, method and its parameters, and the protocol (feature, layer, normalisation,
        position-embedding interpolation, precision)."""
        info = self.info
        return {"dataset": info.dataset, "split": info.split, "no_hard": info.no_hard,
                "limit": info.limit, "method": info.method,
                "method_params": json.dumps(info.method_params, sort_keys=True),
                "feature": info.feature, "layer": info.layer, "normalize": info.normalize,
                "k": info.method_params.get("k_patches"),
                "gram_bias": info.method_params.get("gram_bias"),
                "pos_interp": info.pos_interp, "precision": info.precision,
                "smoke": self.smoke}


def is_smoke(config: dict, metrics: dict) -> bool:
    """Random weights in any of the places a run records them: a smoke run, not a result."""
    weights = config.get("weights") or {}
    source = weights.get("source") if isinstance(weights, dict) else weights
    identity = config.get("identity")
    return bool(config.get("smoke_run") is True or metrics.get("smoke_run") is True
                or metrics.get("weights") == "random" or source == "random"
                or (isinstance(identity, dict) and identity.get("weights") == "random"))


def is_scratch(config: dict, metrics: dict) -> bool:
    """A scratch run (``lostreg.evaluate(..., scratch=True)``, a look during training) in any
    of the places it records it: never a leaderboard row, whatever its weights."""
    identity = config.get("identity")
    return bool(config.get("scratch_run") is True or metrics.get("scratch_run") is True
                or (isinstance(identity, dict) and identity.get("scratch") is True))


def finished_time(metrics: Fields) -> datetime:
    """metrics.json's ``finished`` (an ISO timestamp; UTC when it names no zone)."""
    value = metrics.text("finished")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise LostregError(f"{metrics.where}: 'finished' is not an ISO timestamp: "
                           f"{shown(value)}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def run_seconds(metrics: Fields) -> float | None:
    """``seconds`` is a number or ``{"total": number, ...}``; absent is fine."""
    value = metrics.data.get("seconds")
    if isinstance(value, dict):
        return Fields(value, f"{metrics.where} (seconds)").number("total", None, optional=True)
    return metrics.number("seconds", None, optional=True)


def _cross_check(config: dict, metrics: dict, path: Path) -> None:
    """metrics.json repeats some settings; a disagreement means files from two runs."""
    for key in CROSS_CHECKED:
        if key in metrics and key in config and metrics[key] != config[key]:
            raise LostregError(f"{path}: '{key}' is {shown(metrics[key])} but config.json says "
                               f"{shown(config[key])} (files from two different runs?)")
    for key in ("smoke_run",):
        for name, data in (("config.json", config), ("metrics.json", metrics)):
            if key in data and not isinstance(data[key], bool):
                raise LostregError(f"{path.parent / name}: '{key}' must be true or false, not "
                                   f"{shown(data[key])}")


@dataclass
class RunHeader:
    """A finished run's ``config.json`` and ``metrics.json``, checked and agreeing with each
    other: everything of a run but its predictions (``load_run`` adds them; the per-run
    summaries of ``lostreg.runs.summaries`` stand in for them)."""

    run_dir: Path
    config: dict
    metrics: dict
    info: RunInfo
    smoke: bool
    finished: datetime
    seconds: float | None
    n_images: int
    n_hits: int

    def check_counts(self, n_images: int, n_hits: int) -> None:
        """The predictions' image and hit counts must be those ``metrics.json`` states."""
        if n_images != self.n_images or n_hits != self.n_hits:
            raise LostregError(
                f"{self.run_dir / PREDICTIONS}: {n_hits}/{n_images} hits/images but "
                f"metrics.json says {self.n_hits}/{self.n_images}; {REWRITE_HINT} metrics.json "
                "from its predictions")


def read_run_files(run_dir: Path) -> tuple[dict, dict]:
    """A finished run's ``metrics.json`` and ``config.json``, each a JSON object. Either one
    missing or unreadable (truncated, ``[]``, NaN, too deep) is one line that ends with what
    fixes it, the same for both: the run's own command validates the folder and rewrites an
    unreadable ``config.json`` and a ``metrics.json`` that is not its predictions' (``lostreg
    .runs.state``), so the line the leaderboard prints when it skips the folder is true."""
    missing = "missing (a finished run needs config.json and predictions.jsonl beside metrics.json)"
    read: dict[str, dict] = {}
    for name, fix in ((METRICS, "metrics.json from its predictions"), (CONFIG, "config.json")):
        try:
            read[name] = read_json_object(run_dir / name, missing)
        except LostregError as exc:
            raise LostregError(f"{exc}; {REWRITE_HINT} {fix}") from None
    return read[METRICS], read[CONFIG]


def read_header(run_dir: str | Path) -> RunHeader:
    """Read and check a finished run's ``config.json`` and ``metrics.json`` (not its
    predictions): every value typed, the settings both repeat equal."""
    run_dir = Path(run_dir)
    metrics_path, config_path = run_dir / METRICS, run_dir / CONFIG
    metrics_data, config = read_run_files(run_dir)
    info = parse_config(config, str(config_path))
    metrics = Fields(metrics_data, str(metrics_path))
    n_images, n_hits = metrics.integer("n_images", minimum=0), metrics.integer("n_hits", minimum=0)
    if n_images == 0:
        raise LostregError(f"{metrics_path}: n_images is 0: a run of no image has no figures "
                           "(lostreg now refuses a split that lists no image)")
    finished = finished_time(metrics)
    seconds = run_seconds(metrics)
    _cross_check(config, metrics_data, metrics_path)
    return RunHeader(run_dir, config, metrics_data, info, is_smoke(config, metrics_data),
                     finished, seconds, n_images, n_hits)


def load_run(run_dir: str | Path) -> RunData:
    """Read one finished run folder, check every value and that its three files agree."""
    header = read_header(run_dir)
    predictions = read_predictions(header.run_dir / PREDICTIONS)
    header.check_counts(len(predictions), int(predictions["hit"].sum()))
    return RunData(header.run_dir, header.config, header.metrics, predictions, header.smoke,
                   header.finished, header.info, header.seconds)


@dataclass
class ScanResult:
    """What ``scan_runs`` found: the runs, and what it left out and why."""

    runs: list[Any]  # RunData (or what the ``load`` given to ``scan_runs`` returns)
    skipped: list[str] = field(default_factory=list)  # one line per unreadable folder
    smoke_excluded: int = 0  # smoke runs left out (no --include-smoke)
    unfinished: int = 0  # folders without metrics.json
    scratch_excluded: int = 0  # scratch runs left out (always: they are looks during training)
    other_targets: int = 0  # finished runs scored on another target kind (masks: see run_target)


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def scan_runs(runs_dir: str | Path, include_smoke: bool = False,
              report: Callable[[str], None] | None = _stderr,
              load: Callable[[Path], Any] = load_run, target: str = "boxes") -> ScanResult:
    """Finished runs under ``runs_dir`` (folders with metrics.json), one per identity.

    A folder that cannot be read is skipped with one line (``report``, stderr by default)
    naming it and the reason; the others are still read. Two folders with the same identity
    are the same experiment: the newest by ``finished`` is kept (ties broken by run id, so the
    choice never depends on disk order). Scratch runs (looks during training) are never read:
    their folders (``scratch-...``) are counted in ``scratch_excluded``. A hidden folder
    (``.summaries``, ``lostreg.runs.summaries``' store) is never a run. ``load`` reads one
    folder (``load_run``; the leaderboard passes a reader of per-run summaries). Only runs
    scored on ``target`` are read (``boxes``, or ``mask`` with the saliency reports' loader);
    the others are counted in ``other_targets``. A folder whose config.json cannot be read
    counts as a box run, so the box reader is the one that says why.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise LostregError(f"{runs_dir}: runs folder not found (run python -m lostreg.run first)")
    folders = sorted(path for path in runs_dir.iterdir()
                     if path.is_dir() and not path.name.startswith("."))
    result = ScanResult(runs=[])
    runs: list[RunData] = []
    for folder in folders:
        if not (folder / "metrics.json").exists():
            result.unfinished += 1
            continue
        kind, scratch = _classify(folder)
        if scratch:
            result.scratch_excluded += 1
            continue
        if kind != target:
            result.other_targets += 1  # e.g. a mask run: the saliency reports read it
            continue
        try:
            runs.append(load(folder))
        except LostregError as exc:
            result.skipped.append(f"skipped {folder}: {exc}")
            if report is not None:
                report(result.skipped[-1])
    if not include_smoke:
        result.smoke_excluded = sum(run.smoke for run in runs)
        runs = [run for run in runs if not run.smoke]
    result.runs = _newest_per_identity(runs)
    return result


def run_target(config: dict) -> str:
    """The ground-truth kind a run was scored on: its dataset's registered target (``boxes``,
    ``mask``); for a dataset this install does not register, ``mask`` when its config names a
    mask protocol (the saliency contract: every mask run records ``mask_protocol``), else
    ``boxes``. ``load_run`` reads box runs; ``lostreg.reports.leaderboard.saliency_runs`` reads
    mask runs."""
    from lostreg.datasets import DATASETS

    dataset = config.get("dataset")
    spec = DATASETS.get(dataset) if isinstance(dataset, str) else None
    if spec is not None:
        return spec.target
    return "mask" if config.get("mask_protocol") is not None else "boxes"


def _classify(folder: Path) -> tuple[str, bool]:
    """A finished folder's target kind and whether it is a scratch run, from one read of its
    config.json and metrics.json; a folder they cannot be read from is a box run (its loader
    then says why) and not scratch."""
    try:
        config = read_json_object(folder / CONFIG, "missing")
        metrics = read_json_object(folder / METRICS, "missing")
    except LostregError:
        return "boxes", False
    return run_target(config), is_scratch(config, metrics)


def _newest_per_identity(runs: Sequence[RunData]) -> list[RunData]:
    newest: dict[str, RunData] = {}
    for run in runs:
        kept = newest.get(run.identity_key)
        if kept is None or (run.finished, run.run_id) > (kept.finished, kept.run_id):
            newest[run.identity_key] = run
    return sorted(newest.values(), key=lambda run: run.run_id)


# --- predictions.jsonl --------------------------------------------------------------------


PREDICTION_COLUMNS = ["image_id", "file", "width", "height", "n_objects", "area_share",
                      "best_iou", "hit", "box", "gt_boxes"]


def _checked_line(record: Any, where: str) -> dict[str, Any]:
    """One predictions line with every field the leaderboard uses type-checked."""
    if not isinstance(record, dict):
        raise LostregError(f"{where}: not a JSON object")
    line = Fields(record, where)
    # an image whose features were not finite has no box (``nonfinite``): a miss
    no_box = record.get("nonfinite") is True and record.get("box") is None
    checked = {"image_id": line.text("image_id"), "file": line.text("file", None, optional=True),
               "width": line.integer("width", minimum=1),
               "height": line.integer("height", minimum=1),
               "box": None if no_box else line.box("box"), "gt_boxes": line.boxes("gt_boxes")}
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
        try:  # bounded: a line nested 200,000 deep is one line, not a RecursionError
            record = loads_bounded(raw, where, max_bytes=None)
        except JsonInputError as exc:
            raise LostregError(f"{where}: not valid JSON ({exc.reason})") from None
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
    boxes = np.array([row["box"] or [0, 0, 0, 0] for row in rows],
                     dtype=np.float64).reshape(-1, 4)
    gts = np.array([gt for row in rows for gt in row["gt_boxes"]],
                   dtype=np.float64).reshape(-1, 4)
    ious = best_ious(boxes, gts, counts)
    ious[[row["box"] is None for row in rows]] = 0.0  # no box (non-finite features): a miss
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

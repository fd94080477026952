"""``python -m lostreg.leaderboard``: every finished run in one table, register pairs compared.

The leaderboard only *reads* run folders (``config.json``, ``predictions.jsonl``,
``metrics.json``); it never runs a model, so it can be rebuilt at any time and gives the same
files for the same runs (fixed bootstrap seed, deterministic order, no timestamps).

Outputs under ``--out`` (default ``results/``), each written atomically:

- ``leaderboard.csv``: one row per distinct run identity (the newest finished run wins), with a
  95% percentile-bootstrap interval over images. Random-weight smoke runs are left out unless
  ``--include-smoke`` (then they are kept and flagged in ``smoke``).
- ``comparison.csv`` / ``comparison.md``: each non-register model beside its register twin
  (same family, timm name differing only by ``_regN``, same dataset and LOST settings), with the
  exact McNemar test and a paired bootstrap interval of the difference, and the figures the
  papers published in separate columns (``results/reference/published_corloc.csv``).
- ``figures/corloc_registers.png`` and ``figures/iou/<run_id>.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg import stats
from lostreg.cli import HelpFormatter
from lostreg.errors import LostregError, error_line
from lostreg.io import atomic_write_bytes, atomic_write_text, read_json_object, read_jsonl

PAPER_DATASETS = ("voc07", "voc12", "coco20k")
PAPER_MODELS = ("dino_vits16", "dinov2_vitl14", "dinov2_vitl14_reg4", "deit3_vitb16",
                "openclip_vitb16")
# (model short name, dataset) runs that fill the comparison table with public weights
PAPER_SUITE: list[tuple[str, str]] = [(m, d) for m in PAPER_MODELS for d in PAPER_DATASETS]

DATASET_LABELS = {"voc07": "VOC07", "voc12": "VOC12", "coco20k": "COCO20k"}
FAMILY_LABELS = {"dino": "DINO", "dinov2": "DINOv2", "deit3": "DeiT-III", "openclip": "OpenCLIP"}
DEFAULT_PUBLISHED = (Path(__file__).resolve().parent.parent / "results" / "reference"
                     / "published_corloc.csv")

LEADERBOARD_COLUMNS = [
    "run_id", "model", "timm_name", "family", "registers", "params", "patch_size", "dataset",
    "split", "no_hard", "limit", "feature", "k", "gram_bias", "precision", "n_images", "n_hits",
    "corloc", "ci_low", "ci_high", "weights_source", "weights_sha256", "lostreg_version",
    "git_commit", "date", "seconds", "device", "smoke",
]
SETTING_COLUMNS = ["dataset", "split", "no_hard", "limit", "feature", "k", "gram_bias",
                   "precision", "smoke"]
COMPARISON_COLUMNS = [
    "family", "backbone", "model", "model_reg", "dataset", "split", "no_hard", "limit",
    "feature", "k", "gram_bias", "precision", "smoke", "n_images", "n_images_reg", "n_paired",
    "corloc", "ci_low", "ci_high", "corloc_reg", "ci_low_reg", "ci_high_reg", "diff",
    "diff_ci_low", "diff_ci_high", "miss_to_hit", "hit_to_miss", "mcnemar_p", "run_id",
    "run_id_reg", "published_backbone", "published_corloc", "published_corloc_reg",
    "published_diff", "published_source",
]
PUBLISHED_COLUMNS = ["paper", "method", "family", "backbone", "compare_with", "with_registers",
                     "dataset", "corloc", "source", "note"]
REQUIRED_CONFIG_KEYS = ("identity", "model", "timm_name", "family", "num_registers", "dataset",
                        "split", "no_hard", "feature", "k_patches", "gram_bias", "precision",
                        "weights")
REQUIRED_METRICS_KEYS = ("n_images", "n_hits", "finished")
REQUIRED_PREDICTION_KEYS = ("image_id", "width", "height", "gt_boxes", "best_iou", "hit")
IOU_BINS = np.linspace(0.0, 1.0, 21)


# --- reading run folders -------------------------------------------------------------------


@dataclass
class RunData:
    """One finished run as the leaderboard sees it."""

    run_dir: Path
    config: dict
    metrics: dict
    predictions: pd.DataFrame
    smoke: bool
    finished: datetime

    @property
    def run_id(self) -> str:
        return str(self.config.get("run_id") or self.run_dir.name)

    @property
    def identity_key(self) -> str:
        """Runs with equal identity dicts produce the same results: they are one entry."""
        return json.dumps(self.config["identity"], sort_keys=True)

    @property
    def limit(self) -> int | None:
        limit = self.config["identity"].get("limit")
        return None if limit is None else int(limit)

    @cached_property
    def summary(self) -> dict[str, Any]:
        """CorLoc and its bootstrap interval, computed once (leaderboard and pairs share it)."""
        hits = self.predictions["hit"].to_numpy(dtype=bool)
        low, high = stats.bootstrap_corloc_ci(hits)
        return {"n": int(hits.size), "n_hits": int(hits.sum()),
                "corloc": stats.corloc_percent(hits), "low": low, "high": high}

    def settings(self) -> dict[str, Any]:
        """The settings a register pair must share (besides family and base timm name)."""
        c = self.config
        return {"dataset": c["dataset"], "split": c["split"], "no_hard": bool(c["no_hard"]),
                "limit": self.limit, "feature": c["feature"], "k": int(c["k_patches"]),
                "gram_bias": float(c["gram_bias"]), "precision": c["precision"],
                "smoke": self.smoke}


def _read_json(path: Path) -> dict:
    return read_json_object(path, "missing (a finished run needs config.json and "
                                  "predictions.jsonl beside metrics.json)")


def _require(data: dict, keys: Sequence[str], path: Path) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise LostregError(f"{path}: missing key(s) {', '.join(missing)}")


def _parse_time(value: Any, path: Path) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise LostregError(f"{path}: 'finished' is not an ISO timestamp: {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _area_share(gt_boxes: list, width: float, height: float) -> float:
    """Largest GT box's share of the image: the size of the object LOST most likely finds."""
    boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if not boxes.size or width <= 0 or height <= 0:
        return float("nan")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0,
                                                                    None)
    return float(areas.max() / (float(width) * float(height)))


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Per-image predictions of one run, plus ``n_objects`` and ``area_share`` per image."""
    path = Path(path)
    if not path.is_file():
        raise LostregError(f"{path}: missing (a finished run needs predictions.jsonl)")
    try:
        records = list(read_jsonl(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LostregError(f"{path}: a line is not valid JSON ({exc})") from None
    rows = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise LostregError(f"{path}: line {number} is not a JSON object")
        _require(record, REQUIRED_PREDICTION_KEYS, Path(f"{path}:{number}"))
        rows.append({
            "image_id": str(record["image_id"]),
            "file": record.get("file"),
            "width": int(record["width"]),
            "height": int(record["height"]),
            "n_objects": len(record["gt_boxes"]),
            "area_share": _area_share(record["gt_boxes"], record["width"], record["height"]),
            "best_iou": float(record["best_iou"]),
            "hit": bool(record["hit"]),
            "box": record.get("box"),
            "gt_boxes": record["gt_boxes"],
        })
    frame = pd.DataFrame(rows, columns=["image_id", "file", "width", "height", "n_objects",
                                        "area_share", "best_iou", "hit", "box", "gt_boxes"])
    duplicated = frame["image_id"][frame["image_id"].duplicated()]
    if len(duplicated):
        raise LostregError(f"{path}: image_id {duplicated.iloc[0]!r} appears more than once")
    return frame


def is_smoke(config: dict, metrics: dict) -> bool:
    """Random weights in any of the places a run records them: a smoke run, not a result."""
    weights = config.get("weights") or {}
    source = weights.get("source") if isinstance(weights, dict) else weights
    return bool(config.get("smoke_run") or metrics.get("smoke_run")
                or metrics.get("weights") == "random" or source == "random"
                or config.get("identity", {}).get("weights") == "random")


def load_run(run_dir: str | Path) -> RunData:
    """Read one finished run folder and check that its three files agree."""
    run_dir = Path(run_dir)
    metrics_path, config_path = run_dir / "metrics.json", run_dir / "config.json"
    metrics = _read_json(metrics_path)
    config = _read_json(config_path)
    _require(metrics, REQUIRED_METRICS_KEYS, metrics_path)
    _require(config, REQUIRED_CONFIG_KEYS, config_path)
    if not isinstance(config["identity"], dict):
        raise LostregError(f"{config_path}: 'identity' must be a JSON object")
    predictions_path = run_dir / "predictions.jsonl"
    predictions = read_predictions(predictions_path)
    n_hits = int(predictions["hit"].sum())
    if len(predictions) != int(metrics["n_images"]) or n_hits != int(metrics["n_hits"]):
        raise LostregError(
            f"{predictions_path}: {n_hits}/{len(predictions)} hits/images but metrics.json "
            f"says {metrics['n_hits']}/{metrics['n_images']}; rerun the run to rewrite it")
    return RunData(run_dir, config, metrics, predictions, is_smoke(config, metrics),
                   _parse_time(metrics["finished"], metrics_path))


def scan_runs(runs_dir: str | Path, include_smoke: bool = False) -> list[RunData]:
    """Finished runs under ``runs_dir`` (folders with metrics.json), one per identity.

    Two folders with the same identity dict are the same experiment: the newest by
    ``finished`` is kept (ties broken by run id, so the choice never depends on disk order).
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise LostregError(f"{runs_dir}: runs folder not found (run python -m lostreg.run first)")
    runs = [load_run(path.parent) for path in sorted(runs_dir.glob("*/metrics.json"))]
    if not include_smoke:
        runs = [run for run in runs if not run.smoke]
    newest: dict[str, RunData] = {}
    for run in runs:
        kept = newest.get(run.identity_key)
        if kept is None or (run.finished, run.run_id) > (kept.finished, kept.run_id):
            newest[run.identity_key] = run
    return sorted(newest.values(), key=lambda run: run.run_id)


# --- tables --------------------------------------------------------------------------------


def _dataset_rank(name: str) -> tuple[int, str]:
    return (PAPER_DATASETS.index(name) if name in PAPER_DATASETS else len(PAPER_DATASETS), name)


def leaderboard_row(run: RunData) -> dict[str, Any]:
    """The leaderboard's row for one run, CorLoc recomputed from its predictions."""
    c, m = run.config, run.metrics
    summary = run.summary
    weights = c["weights"] if isinstance(c["weights"], dict) else {"source": c["weights"]}
    seconds = m.get("seconds")
    total = seconds.get("total") if isinstance(seconds, dict) else seconds
    return {
        "run_id": run.run_id,
        "model": c["model"],
        "timm_name": c["timm_name"],
        "family": c["family"],
        "registers": int(c["num_registers"]),
        "params": c.get("num_params"),
        "patch_size": c.get("patch_size"),
        **{key: value for key, value in run.settings().items() if key != "smoke"},
        "n_images": summary["n"],
        "n_hits": summary["n_hits"],
        "corloc": round(summary["corloc"], 4),
        "ci_low": round(summary["low"], 4),
        "ci_high": round(summary["high"], 4),
        "weights_source": weights.get("source"),
        "weights_sha256": weights.get("sha256"),
        "lostreg_version": c.get("lostreg_version"),
        "git_commit": c.get("git_commit"),
        "date": run.finished.isoformat(),
        "seconds": total,
        "device": c.get("device_name") or c.get("device"),
        "smoke": run.smoke,
    }


def leaderboard_frame(runs: Sequence[RunData]) -> pd.DataFrame:
    """Rows sorted by dataset (paper order first), then CorLoc from best, then run id."""
    rows = sorted((leaderboard_row(run) for run in runs),
                  key=lambda r: (_dataset_rank(r["dataset"]), -r["corloc"], r["run_id"]))
    frame = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    for column in ("limit", "params", "patch_size"):
        frame[column] = frame[column].astype("Int64")
    return frame.reset_index(drop=True)


def base_timm_name(timm_name: str) -> str:
    """The timm name with its register tag removed: twins share it."""
    return re.sub(r"_reg\d+", "", timm_name)


def _pair_key(run: RunData) -> tuple:
    settings = run.settings()
    return (run.config["family"], base_timm_name(run.config["timm_name"]),
            *(settings[key] for key in SETTING_COLUMNS))


def find_pairs(runs: Sequence[RunData]) -> tuple[list[tuple[RunData, RunData]], list[RunData]]:
    """Register pairs, and the runs without registers that found no twin.

    A twin has the same family, timm name equal but for ``_regN``, ``num_registers > 0`` against
    0, and the same dataset and LOST settings. Where several runs fit one side (other weights
    files or versions), the newest finished one is used.
    """
    def newest(candidates: list[RunData]) -> RunData:
        return max(candidates, key=lambda run: (run.finished, run.run_id))

    plain: dict[tuple, list[RunData]] = {}
    registered: dict[tuple, dict[str, list[RunData]]] = {}
    for run in runs:
        key = _pair_key(run)
        if int(run.config["num_registers"]) > 0:
            registered.setdefault(key, {}).setdefault(run.config["timm_name"], []).append(run)
        else:
            plain.setdefault(key, []).append(run)
    pairs, unpaired = [], []
    for key in sorted(plain, key=repr):
        base = newest(plain[key])
        twins = registered.get(key, {})
        for timm_name in sorted(twins):
            pairs.append((base, newest(twins[timm_name])))
        if not twins:
            unpaired.append(base)
    return pairs, unpaired


def pair_row(base: RunData, reg: RunData) -> dict[str, Any]:
    """Our side of one comparison cell: both CorLocs and the paired statistics.

    Statistics use the images both runs scored (joined on ``image_id``); for runs of the same
    dataset and settings that is every image.
    """
    joined = base.predictions[["image_id", "hit"]].merge(
        reg.predictions[["image_id", "hit"]], on="image_id", suffixes=("", "_reg"))
    a = joined["hit"].to_numpy(dtype=bool)
    b = joined["hit_reg"].to_numpy(dtype=bool)
    test = stats.mcnemar_exact(a, b)
    low, high = stats.paired_bootstrap_diff_ci(a, b)
    mine, theirs = base.summary, reg.summary
    return {
        "family": base.config["family"],
        "backbone": FAMILY_LABELS.get(base.config["family"], base.config["family"]),
        "model": base.config["model"],
        "model_reg": reg.config["model"],
        **base.settings(),
        "n_images": mine["n"], "n_images_reg": theirs["n"], "n_paired": int(a.size),
        "corloc": mine["corloc"], "ci_low": mine["low"], "ci_high": mine["high"],
        "corloc_reg": theirs["corloc"], "ci_low_reg": theirs["low"], "ci_high_reg": theirs["high"],
        "diff": theirs["corloc"] - mine["corloc"],
        "diff_ci_low": low, "diff_ci_high": high,
        "miss_to_hit": test.miss_to_hit, "hit_to_miss": test.hit_to_miss,
        "mcnemar_p": test.p_value,
        "run_id": base.run_id, "run_id_reg": reg.run_id,
    }


def single_row(run: RunData) -> dict[str, Any]:
    """A run without registers and without a twin: only its own CorLoc."""
    mine = run.summary
    return {
        "family": run.config["family"],
        "backbone": FAMILY_LABELS.get(run.config["family"], run.config["family"]),
        "model": run.config["model"], **run.settings(),
        "n_images": mine["n"], "corloc": mine["corloc"], "ci_low": mine["low"],
        "ci_high": mine["high"], "run_id": run.run_id,
    }


# --- published figures ---------------------------------------------------------------------


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """Published CorLoc figures (one per paper, backbone, registers, dataset); empty if the
    default file is absent (an installed package without the repository)."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PUBLISHED
    if not path.is_file():
        if explicit:
            raise LostregError(f"{path}: published figures file not found")
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LostregError(f"{path}: not a readable CSV ({exc})") from None
    missing = [column for column in PUBLISHED_COLUMNS if column not in frame.columns]
    if missing:
        raise LostregError(f"{path}: missing column(s) {', '.join(missing)}")
    values = pd.to_numeric(frame["corloc"].replace("", np.nan), errors="coerce")
    bad = frame["corloc"].ne("") & values.isna()
    if bad.any():
        raise LostregError(f"{path}: corloc {frame['corloc'][bad].iloc[0]!r} is not a number")
    flags = frame["with_registers"].str.lower()
    if not flags.isin(["true", "false"]).all():
        raise LostregError(f"{path}: with_registers must be true or false")
    frame = frame[PUBLISHED_COLUMNS].copy()
    frame["corloc"] = values.astype(float)
    frame["with_registers"] = flags.eq("true")
    return frame


def _published_pairs(published: pd.DataFrame) -> list[dict[str, Any]]:
    """Registers-paper figures as without/with pairs per backbone and dataset, file order."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in published[published["paper"] == "registers"].to_dict("records"):
        key = (record["backbone"], record["compare_with"], record["dataset"])
        row = rows.setdefault(key, {
            "family": record["family"], "published_backbone": record["backbone"],
            "compare_with": record["compare_with"], "dataset": record["dataset"],
            "published_corloc": np.nan, "published_corloc_reg": np.nan,
            "published_source": record["source"]})
        row["published_corloc_reg" if record["with_registers"] else "published_corloc"] = (
            record["corloc"])
    for row in rows.values():
        row["published_diff"] = row["published_corloc_reg"] - row["published_corloc"]
    return list(rows.values())


# --- the comparison ------------------------------------------------------------------------


@dataclass
class Leaderboard:
    """Everything the leaderboard writes, in memory (the notebook uses this directly)."""

    runs: list[RunData]
    table: pd.DataFrame
    comparison: pd.DataFrame
    singles: pd.DataFrame
    published: pd.DataFrame


def comparison_frame(runs: Sequence[RunData], published: pd.DataFrame) -> tuple[pd.DataFrame,
                                                                              pd.DataFrame]:
    """(register comparison rows, rows of runs without registers and without a twin).

    Comparison rows: our pairs, our twin-less runs of a model the registers paper published
    (its register model is not public), and published-only rows; published figures sit in
    their own columns beside ours, matched by model and dataset.
    """
    pairs, unpaired = find_pairs(runs)
    ours = [pair_row(base, reg) for base, reg in pairs]
    singles = pd.DataFrame([single_row(run) for run in unpaired])
    paper = _published_pairs(published)
    cited = {row["compare_with"] for row in paper}
    ours += [row for row in singles.to_dict("records") if row["model"] in cited]
    by_model_dataset = {(row["compare_with"], row["dataset"]): row for row in paper}
    used: set[tuple[str, str]] = set()
    rows = []
    for row in ours:
        figures = by_model_dataset.get((row["model"], row["dataset"]))
        if figures is not None and not row["smoke"]:
            used.add((row["model"], row["dataset"]))
            row = {**row, **{k: v for k, v in figures.items()
                             if k.startswith("published_")}}
        rows.append(row)
    for figures in paper:
        if (figures["compare_with"], figures["dataset"]) in used:
            continue
        rows.append({"family": figures["family"],
                     "backbone": FAMILY_LABELS.get(figures["family"], figures["family"]),
                     "model": figures["compare_with"], "dataset": figures["dataset"],
                     **{k: v for k, v in figures.items() if k.startswith("published_")}})
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    family_order = {family: i for i, family in enumerate(dict.fromkeys(
        [row["family"] for row in paper] + sorted(frame["family"].dropna().unique())))}
    frame["_family"] = frame["family"].map(family_order)
    frame["_dataset"] = frame["dataset"].map(lambda name: _dataset_rank(name))
    frame["_ours"] = frame["run_id"].isna()
    frame = frame.sort_values(
        ["_family", "model", "model_reg", "_ours", "feature", "k", "gram_bias", "precision",
         "no_hard", "limit", "smoke", "_dataset"], kind="stable", na_position="first",
        key=lambda column: column.map(repr) if column.name in (
            "limit", "gram_bias", "k", "no_hard", "smoke", "model_reg") else column,
    ).drop(columns=["_family", "_dataset", "_ours"]).reset_index(drop=True)
    for column in ("limit", "n_images", "n_images_reg", "n_paired", "k", "miss_to_hit",
                   "hit_to_miss"):
        frame[column] = frame[column].astype("Int64")
    return frame, singles


def collect(runs_dir: str | Path, include_smoke: bool = False,
            published: str | Path | None = None) -> Leaderboard:
    """Read every finished run and compute all tables without writing anything."""
    runs = scan_runs(runs_dir, include_smoke)
    figures = load_published(published)
    comparison, singles = comparison_frame(runs, figures)
    return Leaderboard(runs, leaderboard_frame(runs), comparison, singles, figures)


# --- markdown ------------------------------------------------------------------------------


def _present(value: Any) -> bool:
    return value is not None and value is not pd.NA and not (
        isinstance(value, float) and math.isnan(value))


def _true(value: Any) -> bool:
    return _present(value) and bool(value)


def _cell(without: Any, with_: Any) -> str:
    """``35.3 → 55.4 (+20.1)``; one side missing shows as ``—``, both missing as empty."""
    if _present(without) and _present(with_):
        return f"{without:.1f} → {with_:.1f} ({with_ - without:+.1f})"
    if _present(without):
        return f"{without:.1f} → —"
    if _present(with_):
        return f"— → {with_:.1f}"
    return ""


def settings_label(row: dict[str, Any]) -> str:
    parts = [f"{row['feature']}", f"k={row['k']}", f"bias={float(row['gram_bias']):g}",
             str(row["precision"])]
    if _true(row.get("no_hard")):
        parts.append("no_hard")
    if _present(row.get("limit")):
        parts.append(f"first {row['limit']}")
    if _true(row.get("smoke")):
        parts.append("SMOKE (random weights)")
    return ", ".join(parts)


def _format_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def _datasets(frame: pd.DataFrame) -> list[str]:
    return sorted(set(PAPER_DATASETS) | set(frame["dataset"].dropna()), key=_dataset_rank)


def comparison_markdown(board: Leaderboard) -> str:
    """The registers paper's Table 3 layout, ours and published side by side, then details."""
    frame, datasets = board.comparison, _datasets(board.comparison)
    labels = [DATASET_LABELS.get(name, name) for name in datasets]
    paper = {(row["compare_with"], row["dataset"]): row
             for row in _published_pairs(board.published)}
    lines = [
        "# Do registers help LOST? CorLoc without → with registers",
        "",
        "CorLoc (%) of LOST on last-layer attention features, "
        "`without → with (difference in points)`. **ours**: this suite, public weights; "
        "**published**: figures as printed in the papers. The two are never blended.",
        "",
        "| Backbone | Models (ours) | Settings | "
        + " | ".join(f"{label} ours | {label} published" for label in labels) + " |",
        "|---|---|---|" + "---|---|" * len(datasets),
    ]
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in frame[frame["run_id"].notna()].to_dict("records"):
        key = (row["backbone"], row["model"], row["model_reg"], settings_label(row),
               bool(row["smoke"]))
        groups.setdefault(key, {})[row["dataset"]] = row
    for (backbone, model, model_reg, settings, smoke), cells in groups.items():
        models = f"{model} vs {model_reg}" if _present(model_reg) else f"{model} only"
        parts = []
        for name in datasets:
            row = cells.get(name, {})
            figures = {} if smoke else paper.get((model, name), {})
            parts += [_cell(row.get("corloc"), row.get("corloc_reg")),
                      _cell(figures.get("published_corloc"), figures.get("published_corloc_reg"))]
        lines.append(f"| {backbone} | {models} | {settings} | " + " | ".join(parts) + " |")
    covered = {key[1] for key in groups if not key[4]}
    published_only: dict[tuple[str, str], dict[str, dict]] = {}
    for (model, name), figures in paper.items():
        if model not in covered:
            label = FAMILY_LABELS.get(figures["family"], figures["family"])
            title = f"{label} (paper: {figures['published_backbone']})"
            published_only.setdefault((title, model), {})[name] = figures
    for (title, model), cells in published_only.items():
        parts = []
        for name in datasets:
            figures = cells.get(name, {})
            parts += ["", _cell(figures.get("published_corloc"),
                                figures.get("published_corloc_reg"))]
        lines.append(f"| {title} | none run ({model}) | — | " + " | ".join(parts) + " |")
    lines += ["", *_published_notes(board.published), "", *_statistics_section(frame),
              "", *_single_model_section(board)]
    return "\n".join(lines).rstrip() + "\n"


def _published_notes(published: pd.DataFrame) -> list[str]:
    lines = []
    notes = published[published["paper"] == "registers"][["backbone", "note", "source"]]
    for record in notes.drop_duplicates().to_dict("records"):
        note = f" {record['note']}" if record["note"] else ""
        lines.append(f"- Published {record['backbone']}: {record['source']}.{note}")
    if not lines:
        lines.append("- No published figures file was found; published columns are empty.")
    return lines


def _statistics_section(frame: pd.DataFrame) -> list[str]:
    pairs = frame[frame["model_reg"].notna() & frame["run_id"].notna()]
    lines = ["## Paired statistics (ours)", ""]
    if pairs.empty:
        return lines + ["No register pairs among the runs yet (a pair needs a model and its "
                        "`_reg` twin on the same dataset with the same settings)."]
    lines += [
        "Same images for both runs (joined on `image_id`). Difference: with − without, 95% "
        "paired percentile bootstrap over images (10000 resamples, seed 0). p: exact two-sided "
        "McNemar test (binomial on the images where exactly one run hits).",
        "",
        "| Backbone | Models | Dataset | Settings | Images | Without | With | "
        "Difference [95% CI] | Miss→hit | Hit→miss | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in pairs.to_dict("records"):
        images = f"{row['n_paired']}"
        if row["n_paired"] != row["n_images"] or row["n_paired"] != row["n_images_reg"]:
            images += f" (of {row['n_images']} / {row['n_images_reg']})"
        lines.append(
            f"| {row['backbone']} | {row['model']} vs {row['model_reg']} | "
            f"{DATASET_LABELS.get(row['dataset'], row['dataset'])} | {settings_label(row)} | "
            f"{images} | {row['corloc']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}] | "
            f"{row['corloc_reg']:.1f} [{row['ci_low_reg']:.1f}, {row['ci_high_reg']:.1f}] | "
            f"{row['diff']:+.1f} [{row['diff_ci_low']:+.1f}, {row['diff_ci_high']:+.1f}] | "
            f"{row['miss_to_hit']} | {row['hit_to_miss']} | {_format_p(row['mcnemar_p'])} |")
    return lines


def _single_model_section(board: Leaderboard) -> list[str]:
    """LOST paper figures (one model each) beside our runs of the same model."""
    published = board.published[board.published["paper"] == "lost"]
    lines = ["## Single models: ours vs the LOST paper", ""]
    if published.empty:
        return lines + ["No single-model published figures."]
    datasets = _datasets(published)
    labels = [DATASET_LABELS.get(name, name) for name in datasets]
    lines += ["CorLoc (%) with 95% bootstrap interval (ours, non-smoke runs only).", "",
              "| Published backbone | Ours | Settings | "
              + " | ".join(f"{label} ours | {label} published" for label in labels) + " |",
              "|---|---|---|" + "---|---|" * len(datasets)]
    table = board.table[~board.table["smoke"].astype(bool)] if len(board.table) else board.table
    for (backbone, model), group in published.groupby(["backbone", "compare_with"], sort=False):
        figures = {row["dataset"]: row["corloc"] for row in group.to_dict("records")}
        mine = table[table["model"] == model] if len(table) else table
        variants: dict[str, dict[str, dict]] = {}
        for row in mine.to_dict("records"):
            variants.setdefault(settings_label({**row, "smoke": False}), {})[row["dataset"]] = row
        for settings, cells in (variants or {"—": {}}).items():
            parts = []
            for name in datasets:
                row = cells.get(name)
                ours = (f"{row['corloc']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"
                        if row else "")
                value = figures.get(name)
                parts += [ours, f"{value:.1f}" if _present(value) else ""]
            lines.append(f"| {backbone} | {model} | {settings} | " + " | ".join(parts) + " |")
    sources = sorted(set(published["source"]))
    lines += ["", *(f"- Published: {source}." for source in sources)]
    return lines


# --- figures -------------------------------------------------------------------------------


def figure_png(figure: Any) -> bytes:
    """PNG bytes of a matplotlib figure (Agg canvas, no pyplot state, no timestamp)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def register_bar_figure(comparison: pd.DataFrame) -> Any:
    """Grouped bars of CorLoc without / with registers, one panel per dataset."""
    from matplotlib.figure import Figure

    pairs = comparison[comparison["model_reg"].notna() & comparison["run_id"].notna()]
    datasets = [name for name in _datasets(comparison) if name in set(pairs["dataset"])]
    figure = Figure(figsize=(max(5.0, 4.0 * len(datasets)), 4.2), layout="constrained")
    if pairs.empty:
        axis = figure.add_subplot()
        axis.axis("off")
        axis.text(0.5, 0.5, "no register pairs among the runs yet", ha="center", va="center")
        return figure
    axes = figure.subplots(1, len(datasets), sharey=True, squeeze=False)[0]
    for axis, name in zip(axes, datasets, strict=True):
        rows = pairs[pairs["dataset"] == name].to_dict("records")
        x = np.arange(len(rows))
        for offset, suffix, label, hatch in ((-0.2, "", "without registers", "//"),
                                             (0.2, "_reg", "with registers", "")):
            values = np.array([row[f"corloc{suffix}"] for row in rows], dtype=float)
            errors = np.array([[v - row[f"ci_low{suffix}"], row[f"ci_high{suffix}"] - v]
                               for v, row in zip(values, rows, strict=True)]).T
            axis.bar(x + offset, values, 0.4, yerr=errors, capsize=3, label=label, hatch=hatch,
                     color="#c6dbef" if hatch else "#2171b5", edgecolor="#08306b")
        axis.set_xticks(x, [f"{row['model']}\n{settings_label(row)}" for row in rows],
                        fontsize=7)
        axis.set_title(DATASET_LABELS.get(name, name))
        axis.set_xlim(-0.75, len(rows) - 0.25)
        axis.set_ylim(0, 100)
    axes[0].set_ylabel("CorLoc (%) with 95% bootstrap CI")
    axes[0].legend(loc="upper left", fontsize=8)
    if pairs["smoke"].astype(bool).any():
        figure.suptitle("includes SMOKE runs (random weights): not results", color="red")
    return figure


def iou_figure(run: RunData) -> Any:
    """Histogram of each image's best IoU, with the 0.5 hit threshold."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 3.6), layout="constrained")
    axis = figure.add_subplot()
    ious = run.predictions["best_iou"].to_numpy(dtype=float)
    axis.hist(ious, bins=IOU_BINS, color="#2171b5", edgecolor="white")
    axis.axvline(0.5, color="red", linestyle="--", label="hit threshold 0.5")
    corloc = stats.corloc_percent(run.predictions["hit"].to_numpy(dtype=bool))
    smoke = "  SMOKE (random weights)" if run.smoke else ""
    axis.set_title(f"{run.run_id}\nCorLoc {corloc:.1f} on {ious.size} images{smoke}", fontsize=8)
    axis.set_xlabel("best IoU with a ground-truth box")
    axis.set_ylabel("images")
    axis.set_xlim(0, 1)
    axis.legend(fontsize=8)
    return figure


# --- writing -------------------------------------------------------------------------------


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def write_outputs(board: Leaderboard, out_dir: str | Path) -> None:
    """Write every output atomically; IoU figures of runs no longer listed are removed."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "leaderboard.csv", _csv(board.table))
    comparison = board.comparison.copy()
    for column in comparison.columns:
        if comparison[column].dtype == float and column != "mcnemar_p":
            comparison[column] = comparison[column].round(4)
    atomic_write_text(out_dir / "comparison.csv", _csv(comparison))
    atomic_write_text(out_dir / "comparison.md", comparison_markdown(board))
    figures = out_dir / "figures"
    atomic_write_bytes(figures / "corloc_registers.png",
                       figure_png(register_bar_figure(board.comparison)))
    iou_dir = figures / "iou"
    written = set()
    for run in board.runs:
        name = f"{run.run_id}.png"
        atomic_write_bytes(iou_dir / name, figure_png(iou_figure(run)))
        written.add(name)
    for stale in iou_dir.glob("*.png") if iou_dir.is_dir() else ():
        if stale.name not in written:
            stale.unlink()


def build_leaderboard(runs_dir: str | Path, out_dir: str | Path, include_smoke: bool = False,
                      published: str | Path | None = None) -> pd.DataFrame:
    """Rebuild every leaderboard output from the run folders; returns the leaderboard table."""
    board = collect(runs_dir, include_smoke, published)
    write_outputs(board, out_dir)
    return board.table


# --- CLI -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lostreg.leaderboard",
        description="Collect finished runs into leaderboard.csv and compare each model with its "
                    "register twin (comparison.md/.csv, figures/).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--runs", type=Path, default=Path("results/runs"),
                        help="folder of run folders")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where outputs go")
    parser.add_argument("--include-smoke", action="store_true",
                        help="keep random-weight smoke runs (flagged in the smoke column)")
    parser.add_argument("--published", type=Path, default=None,
                        help=f"published figures CSV (default: {DEFAULT_PUBLISHED})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        board = collect(args.runs, args.include_smoke, args.published)
        write_outputs(board, args.out)
    except (LostregError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    pairs = board.comparison["model_reg"].notna() & board.comparison["run_id"].notna()
    smoke = int(board.table["smoke"].astype(bool).sum()) if len(board.table) else 0
    print(f"{len(board.table)} runs ({smoke} smoke) -> {args.out / 'leaderboard.csv'}; "
          f"{int(pairs.sum())} register pairs -> {args.out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

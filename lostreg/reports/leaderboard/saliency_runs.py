"""Mask runs (ECSSD, DUTS-TE, DUT-OMRON) as the reports read them: one summary per run folder.

A mask run is an ordinary run folder (``lostreg.runs.store.run_target`` says which runs are):
``config.json`` (read by the store's ``parse_config``, plus ``refine`` and ``mask_protocol``),
``predictions.jsonl`` and ``metrics.json`` with the saliency metric's figures. Nothing read
back is trusted, as for box runs: every line's ``sal_iou`` and ``sal_acc`` (the per-image
scores the paired test uses) are recomputed from its ``sal_counts`` bit for bit (TokenCut's
definition, ``lostreg.evaluation.saliency``), its ``pred_mask_rle`` must have the GT's size and
as many pixels as the counts' ``> 0.5`` prediction, and the run's Acc, IoU, ``iou_nan_images``
and ``iou_empty_as_one`` must equal the means of its lines (to ``metrics.json``'s 4
decimals). The F curve, maxF and the MOVE/FOUND variants are checked for type, range and
agreement with each other (maxF is the curve's maximum, at its threshold), not recomputed:
recomputing every definition's F table costs about 1.4 ms an image here (7 s for one
DUTS-TE run, minutes for a suite), ``recompute_check`` does it where wanted (the tests do). A
folder that fails is skipped with one line naming the file, line and key. An unfinished folder
(no ``metrics.json``) is never a ``MaskRun``; ``analyze`` reads one with its config and every
line checked the same way, only the figures left out (``check_unfinished_mask_run``).

Only what the reports need is kept (``MaskRun``): the run's figures under each definition, its
F curve, and per image the scores and where its line is; the masks themselves are read again,
a few lines at a time, when a figure draws them (``read_masks``), so fifty runs of DUT-OMRON
never sit in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.evaluation import saliency
from lostreg.evaluation.rle import decode as decode_rle
from lostreg.evaluation.rle import foreground, rle_problem
from lostreg.evaluation.saliency_metric import counts_problem
from lostreg.fields import Fields, is_int, is_number, shown
from lostreg.io import jsonl_records, read_jsonl
from lostreg.reports.leaderboard.published import REFINES
from lostreg.runs.store import (
    CONFIG,
    CROSS_CHECKED,
    METRICS,
    PREDICTIONS,
    REWRITE_HINT,
    RunInfo,
    ScanResult,
    finished_time,
    is_smoke,
    parse_config,
    read_run_files,
    run_seconds,
    scan_runs,
)
from lostreg.runs.summaries import (
    SummaryStore,
    current_key,
    decode_vector,
    encode_vector,
    payload_digest,
)

F_CURVE_POINTS = len(saliency.TOKENCUT_THRESHOLDS)  # 255
# metrics.json's rounding: percent with 4 decimals, so a recomputed figure is equal within this
PERCENT_TOLERANCE = 1.5e-4
# the F curve is stored rounded to 8 decimals: two thresholds may tie there, not before
CURVE_TOLERANCE = 1e-6
SCORE_DECIMALS = 6  # sal_iou and sal_acc as the saliency metric writes them
# each definition's (Acc, IoU, maxF) keys (the tokencut ones at metrics.json's top level; the
# others in saliency_variants and in ``lostreg.evaluation.saliency``'s results)
DEFINITION_KEYS = {"tokencut": ("acc", "iou", "max_f"), "move": ("acc", "iou", "max_f"),
                   "found": ("acc", "iou", "max_f_per_image")}
# every figure ``saliency_variants`` must hold (percentages or null)
VARIANT_KEYS = {"move": ("acc", "iou", "max_f", "max_f_per_image"),
                "found": ("acc", "iou", "iou_last_image", "max_f_per_image", "max_f_dataset")}
IMAGE_COLUMNS = ["image_id", "file", "width", "height", "sal_iou", "sal_acc", "gt_share",
                 "pred_share", "gt_grey_pixels", "line"]


@dataclass
class MaskRun:
    """One finished mask run as the reports see it (see the module docstring)."""

    run_dir: Path
    config: dict
    info: RunInfo
    smoke: bool
    finished: datetime
    seconds: float | None
    refine: str
    mask_protocol: str
    # definition -> {"acc", "iou", "max_f"} in percent (None where the figure is NaN, as
    # TokenCut's IoU is when one image has an empty GT and an empty prediction)
    figures: dict[str, dict[str, float | None]]
    max_f_threshold: float
    iou_nan_images: int
    iou_empty_as_one: float | None
    f_curve: np.ndarray  # mean F at each of TokenCut's 255 thresholds, in [0, 1]
    images: pd.DataFrame = field(repr=False)  # IMAGE_COLUMNS, one row per line, file order

    @property
    def run_id(self) -> str:
        return self.info.run_id or self.run_dir.name

    @property
    def identity_key(self) -> str:
        """Runs with equal identities (refine and mask protocol are in it) are one entry."""
        return self.info.identity_key(refine=self.refine, mask_protocol=self.mask_protocol)

    @property
    def limit(self) -> int | None:
        return self.info.limit

    @property
    def dataset_images(self) -> int | None:
        """The image count of a run on a partial dataset (its identity records it)."""
        identity = Fields(self.info.identity, f"{self.run_dir / CONFIG} (identity)")
        return identity.integer("dataset_images", None, minimum=0, optional=True)

    def settings(self) -> dict[str, Any]:
        """What must be equal for two mask runs to be compared: the box runs' settings
        (``RunData.settings``), the part of the dataset, the refinement and the mask
        protocol."""
        info = self.info
        return {"dataset": info.dataset, "split": info.split, "no_hard": info.no_hard,
                "limit": info.limit, "dataset_images": self.dataset_images,
                "method": info.method,
                "method_params": json.dumps(info.method_params, sort_keys=True),
                "feature": info.feature, "layer": info.layer, "normalize": info.normalize,
                "k": info.method_params.get("k_patches"),
                "gram_bias": info.method_params.get("gram_bias"),
                "pos_interp": info.pos_interp, "precision": info.precision,
                "refine": self.refine, "mask_protocol": self.mask_protocol,
                "smoke": self.smoke}


# --- one line -------------------------------------------------------------------------------


def _rle_area(rle: Any, where: str, size: tuple[int, int]) -> int:
    """The pixel count of a line's ``pred_mask_rle``, checked (``evaluation.rle``: its runs
    parsed and covering exactly the GT's size, nothing decoded)."""
    problem = rle_problem(rle, *size)
    if problem:
        raise LostregError(f"{where}: 'pred_mask_rle': {problem}")
    return foreground(rle)


def _same(stored: Any, computed: float) -> bool:
    """A stored per-image score is the recomputed one as the metric writes it (rounded to
    ``SCORE_DECIMALS``; ``null`` for NaN)."""
    if math.isnan(computed):
        return stored is None
    return is_number(stored) and float(stored) == round(computed, SCORE_DECIMALS)


def tokencut_iou(tp: int, predicted: int, gt: int) -> float:
    """TokenCut's per-image IoU from the counts at 0.5: ``intersection.float() / union`` in
    float32, NaN for an empty GT and an empty prediction (as ``saliency.per_image`` gives it;
    the tests hold the two equal), without the F table ``per_image`` also computes."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float32(tp) / np.float32(predicted + gt - tp))


def _checked_line(record: Any, where: str) -> dict[str, Any]:
    """One predictions line of a mask run, every field the reports use checked and its scores
    recomputed from its counts."""
    if not isinstance(record, dict):
        raise LostregError(f"{where}: not a JSON object")
    line = Fields(record, where)
    row = {"image_id": line.text("image_id"), "file": line.text("file", None, optional=True),
           "width": line.integer("width", minimum=1),
           "height": line.integer("height", minimum=1),
           "gt_grey_pixels": line.integer("gt_grey_pixels", minimum=0)}
    gt_size = record.get("gt_size")
    if (not isinstance(gt_size, list) or len(gt_size) != 2
            or not all(is_int(v) and v >= 1 for v in gt_size)):
        raise line.fail("gt_size", "[width, height] (two whole numbers >= 1)")
    if gt_size != [row["width"], row["height"]]:
        raise LostregError(f"{where}: 'gt_size' {gt_size} is not the image's size "
                           f"[{row['width']}, {row['height']}]")
    problem = counts_problem(record.get("sal_counts"))
    if problem:
        raise LostregError(f"{where}: 'sal_counts': {problem}")
    counts = saliency.ImageCounts.from_json(record["sal_counts"])
    pixels = row["width"] * row["height"]
    if counts.pixels != pixels or counts.grey != row["gt_grey_pixels"]:
        raise LostregError(f"{where}: 'sal_counts' holds {counts.pixels} pixels ({counts.grey} "
                           f"grey) but the GT has {pixels} ({row['gt_grey_pixels']} grey)")
    tp, predicted, gt_pixels, _ = saliency.binary_stats(counts, "nonzero")
    iou = tokencut_iou(tp, predicted, gt_pixels)
    acc = saliency.accuracy32(tp, predicted, gt_pixels, pixels)
    for key, computed in (("sal_iou", iou), ("sal_acc", acc)):
        if not _same(record.get(key), computed):
            raise LostregError(f"{where}: '{key}' is {shown(record.get(key))} but its "
                               f"sal_counts give {computed!r} (edited or damaged line)")
    area = _rle_area(record.get("pred_mask_rle"), where, (row["height"], row["width"]))
    if area != predicted:
        raise LostregError(f"{where}: 'pred_mask_rle' has {area} pixels but sal_counts has "
                           f"{predicted} above 0.5 (the mask is not the one scored)")
    return {**row, "sal_iou": iou, "sal_acc": acc, "gt_share": gt_pixels / pixels,
            "pred_share": predicted / pixels}


def checked_mask_lines(records: Iterable[Any], path: Path) -> pd.DataFrame:
    """Mask-run lines (``path``'s, in file order), each checked and its scores recomputed from
    its counts (``_checked_line``), no image twice, a line number each. What a run's own lines
    must pass whether or not a ``metrics.json`` exists to hold them against: the finished
    run's loader reads them from the file, ``analyze`` hands an unfinished run's lines in."""
    rows, seen = [], set()
    for number, record in enumerate(records, start=1):
        row = _checked_line(record, f"{path}:{number}")
        if row["image_id"] in seen:
            raise LostregError(f"{path}:{number}: image_id {row['image_id']!r} appears more "
                               "than once")
        seen.add(row["image_id"])
        rows.append({**row, "line": number})
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def _read_images(path: Path, data: bytes | None = None) -> pd.DataFrame:
    """Every line of a mask run's predictions, checked, in file order (a line number each):
    parsed from ``data`` (the file's bytes, read and hashed by the caller) when given, so the
    table is the hashed content's, else read from the file."""
    if data is not None:
        return checked_mask_lines(jsonl_records(data, path), path)
    if not path.is_file():
        raise LostregError(f"{path}: missing (a finished run needs predictions.jsonl)")
    return checked_mask_lines(read_jsonl(path), path)


# --- metrics.json -----------------------------------------------------------------------------


def _percent_or_null(data: dict, key: str, where: str) -> float | None:
    if key not in data:
        raise LostregError(f"{where}: missing key '{key}'")
    value = data[key]
    if value is None:
        return None
    if not is_number(value) or not 0.0 <= float(value) <= 100.0:
        raise LostregError(f"{where}: '{key}' must be a percentage in [0, 100] or null, not "
                           f"{shown(value)}")
    return float(value)


def _agrees(stored: float | None, computed: float, where: str, key: str,
            source: str = "the predictions give") -> None:
    """A stored percentage equals the one recomputed (NaN is stored as null)."""
    percent = 100.0 * computed
    if (stored is None) != math.isnan(percent) or (
            stored is not None and abs(stored - percent) > PERCENT_TOLERANCE):
        raise LostregError(f"{where}: '{key}' is {shown(stored)} but {source} "
                           f"{percent:.4f} (files from two runs, or edited)")


def _variant_figures(metrics: dict, where: str) -> dict[str, dict[str, float | None]]:
    """The MOVE and FOUND figures of ``saliency_variants`` (percentages or null), as
    ``{"acc", "iou", "max_f"}`` per definition (FOUND's maxF is its per-image max)."""
    variants = Fields(metrics, where).mapping("saliency_variants")
    figures = {}
    for name, keys in VARIANT_KEYS.items():
        data, here = variants.get(name), f"{where} (saliency_variants.{name})"
        if not isinstance(data, dict):
            raise LostregError(f"{where}: 'saliency_variants.{name}' must be a JSON object")
        values = {key: _percent_or_null(data, key, here) for key in keys}
        acc_key, iou_key, f_key = DEFINITION_KEYS[name]
        figures[name] = {"acc": values[acc_key], "iou": values[iou_key], "max_f": values[f_key]}
    return figures


def _curve(metrics: Fields) -> tuple[np.ndarray, float | None, float]:
    """``f_curve``, ``max_f`` and ``max_f_threshold``, checked against each other: maxF is the
    curve's maximum (TokenCut's dataset-level max) at its threshold."""
    curve, where = metrics.data.get("f_curve"), metrics.where
    if (not isinstance(curve, list) or len(curve) != F_CURVE_POINTS
            or not all(is_number(v) and 0.0 <= v <= 1.0 for v in curve)):
        raise LostregError(f"{where}: 'f_curve' must be {F_CURVE_POINTS} numbers in [0, 1] "
                           "(mean F at each of TokenCut's thresholds)")
    values = np.asarray(curve, dtype=np.float64)
    max_f = _percent_or_null(metrics.data, "max_f", where)
    best = int(np.argmax(values))
    _agrees(max_f, float(values[best]), where, "max_f", "its f_curve gives")
    threshold = metrics.number("max_f_threshold")
    at = np.flatnonzero(saliency.TOKENCUT_THRESHOLDS == threshold)
    if not at.size or values[at[0]] < values[best] - CURVE_TOLERANCE:
        raise LostregError(f"{where}: 'max_f_threshold' is {threshold!r} but its f_curve peaks "
                           f"at {float(saliency.TOKENCUT_THRESHOLDS[best])!r}")
    return values, max_f, threshold


def _mask_config(config: dict, config_path: Path) -> tuple[RunInfo, str, str]:
    """A mask run's ``config.json`` as the store parses every run's, with its ``refine`` and
    ``mask_protocol``."""
    where = str(config_path)
    info = parse_config(config, where)
    fields = Fields(config, where)
    refine = fields.text("refine")
    if refine not in REFINES:
        raise LostregError(f"{where}: 'refine' must be one of {', '.join(REFINES)}, not "
                           f"{shown(refine)}")
    return info, refine, fields.text("mask_protocol")


# --- one folder, and a folder of folders ------------------------------------------------------


def _run_means(images: pd.DataFrame, metrics: Fields) -> dict[str, Any]:
    """TokenCut's Acc and IoU (sequential sums, NaN-propagating), the 0/0 count and the
    corrected IoU, from the lines, checked against ``metrics.json``."""
    where, ious = metrics.where, images["sal_iou"].tolist()
    nan_images = sum(math.isnan(value) for value in ious)
    computed = {"acc": saliency.sequential_mean(images["sal_acc"].tolist()),
                "iou": saliency.sequential_mean(ious),
                "iou_empty_as_one": saliency.sequential_mean(
                    [1.0 if math.isnan(value) else value for value in ious])}
    stored = {key: _percent_or_null(metrics.data, key, where) for key in computed}
    for key, value in computed.items():
        _agrees(stored[key], value, where, key)
    if metrics.integer("iou_nan_images", minimum=0) != nan_images:
        raise LostregError(f"{where}: 'iou_nan_images' is {metrics.data['iou_nan_images']} "
                           f"but the predictions have {nan_images}")
    return {**stored, "iou_nan_images": nan_images}


def load_mask_run(run_dir: str | Path, store: SummaryStore | None = None,
                  lines: Iterable[Any] | None = None) -> MaskRun:
    """Read one finished mask-run folder, check every value and that its files agree; its
    lines from ``store``'s summary of it when its files did not change (``mask_images``), or
    ``lines``: its predictions as the caller read them (``analyze``, which analyses exactly
    these), checked the same way instead of reading the file again (no store is used then).
    A summary is stored only once every check has passed, as for box runs: a run skipped
    (its metrics.json disagrees) leaves none, so no build rewrites one and ``--reread``
    counts it once (``SummaryStore.unreadable_run``)."""
    run_dir = Path(run_dir)
    metrics_path, config_path = run_dir / METRICS, run_dir / CONFIG
    metrics_data, config = read_run_files(run_dir)
    info, refine, mask_protocol = _mask_config(config, config_path)
    metrics = Fields(metrics_data, str(metrics_path))
    for key in CROSS_CHECKED:
        if key in metrics_data and key in config and metrics_data[key] != config[key]:
            raise LostregError(f"{metrics_path}: '{key}' is {shown(metrics_data[key])} but "
                               f"config.json says {shown(config[key])} (files from two runs?)")
    if metrics.text("saliency_definition") != "tokencut":
        raise metrics.fail("saliency_definition", "'tokencut' (the contract's default)")
    n_images = metrics.integer("n_images", minimum=1)
    read = (mask_images(run_dir, n_images, metrics, store) if lines is None
            else MaskImages(checked_mask_lines(lines, run_dir / PREDICTIONS)))
    images = read.images
    if len(images) != n_images:
        raise LostregError(f"{run_dir / PREDICTIONS}: {len(images)} images but metrics.json "
                           f"says {n_images}; {REWRITE_HINT} metrics.json from its predictions")
    means = _run_means(images, metrics)
    curve, max_f, threshold = _curve(metrics)
    figures = {"tokencut": {"acc": means["acc"], "iou": means["iou"], "max_f": max_f},
               **_variant_figures(metrics_data, str(metrics_path))}
    if store is not None and read.payload is not None:
        store.write_payload(run_dir.name, read.payload)  # every check passed: only now
    return MaskRun(run_dir, config, info, is_smoke(config, metrics_data), finished_time(metrics),
                   run_seconds(metrics), refine, mask_protocol, figures, threshold,
                   means["iou_nan_images"], means["iou_empty_as_one"], curve, images)


def check_unfinished_mask_run(run_dir: Path, config: dict, lines: Iterable[Any]) -> int:
    """Check an unfinished mask run (no ``metrics.json`` yet: killed, or still running) as far
    as it can be checked: its config as a finished run's, and ``lines`` (the predictions read
    once by the caller, which analyses exactly these) one by one (``checked_mask_lines``).
    Only the figures are left out, having nothing to be compared with; returns how many
    images the lines hold."""
    _mask_config(config, run_dir / CONFIG)
    return len(checked_mask_lines(lines, run_dir / PREDICTIONS))


def recompute_check(run: MaskRun) -> None:
    """Recompute every definition's figures and the F curve from the lines' counts
    (``saliency.evaluate_all``) and raise one line where ``metrics.json`` disagrees: the check
    ``load_mask_run`` leaves out for speed (see the module docstring)."""
    counts = [saliency.ImageCounts.from_json(record["sal_counts"])
              for record in read_jsonl(run.run_dir / PREDICTIONS)]
    scores = saliency.evaluate_all(counts)
    where = str(run.run_dir / METRICS)
    for name, keys in DEFINITION_KEYS.items():
        for figure, key in zip(("acc", "iou", "max_f"), keys, strict=True):
            _agrees(run.figures[name][figure], scores[name].metrics[key], where,
                    f"{name} {key}", "the predictions give")
    if np.abs(run.f_curve - np.asarray(scores["tokencut"].f_curve)).max() > CURVE_TOLERANCE:
        raise LostregError(f"{where}: 'f_curve' differs from the one the predictions give")


def scan_mask_runs(runs_dir: str | Path, include_smoke: bool = False,
                   report: Callable[[str], None] | None = None,
                   store: SummaryStore | None = None) -> ScanResult:
    """Finished mask runs under ``runs_dir``, one per identity (the newest by ``finished``,
    then run id): ``scan_runs``'s rules with the mask runs' loader; each folder that cannot be
    read is skipped with one line (``report``). ``store``: the summaries' store to use (the
    leaderboard's ``--reread`` passes one that rereads every run), else a plain one."""
    if store is None:
        store = SummaryStore(Path(runs_dir), report)

    def load(folder: Path) -> MaskRun:
        try:
            return load_mask_run(folder, store)
        except LostregError:
            store.unreadable_run(folder.name)
            raise

    return scan_runs(runs_dir, include_smoke, report, target="mask", load=load)


# --- summaries: a mask run's lines read once per content of its files ----------------------
#
# Reading a mask run's lines checks and recomputes every image (0.24-0.31 s per 1000 images):
# a leaderboard did it for every mask run on every build (issue 19). Its per-image table is
# kept instead in the runs' summary store (``lostreg.runs.summaries``: ``<runs>/.summaries/
# <run folder>.json``, keyed by the sha256 of the run's three files, with its own digest),
# with the float columns as exact float64 bits. Nothing read back is trusted: the format,
# digest and key must hold, every column must have the run's image count and its types, and
# the run's Acc, IoU and 0/0 count recomputed from the stored columns must be what
# ``metrics.json`` states (``_run_means``, the check the lines themselves pass); anything else
# and the lines are read again. They are parsed from the very bytes that were hashed for the
# key (``summaries.current_key``: the file read once), so the table is the hashed lines'.

MASK_SUMMARY_FORMAT = "lostreg-mask-summary/1"
_FLOAT_COLUMNS = ("sal_iou", "sal_acc", "gt_share", "pred_share")
_INT_COLUMNS = {"width": 1, "height": 1, "gt_grey_pixels": 0}  # name -> smallest value


def _images_payload(images: pd.DataFrame) -> dict[str, Any]:
    payload: dict[str, Any] = {"image_id": images["image_id"].tolist(),
                               "file": [None if pd.isna(v) else v for v in images["file"]]}
    payload.update({name: [int(v) for v in images[name]] for name in _INT_COLUMNS})
    payload.update({name: encode_vector(images[name].to_numpy(dtype=np.float64), "float")
                    for name in _FLOAT_COLUMNS})
    return payload


def _images_from_payload(data: Any, n: int) -> pd.DataFrame | None:
    """The per-image table ``_images_payload`` stored, or None unless every column holds
    ``n`` values of its type (ids unique and non-empty, files text or null)."""
    if not isinstance(data, dict):
        return None
    ids, files = data.get("image_id"), data.get("file")
    if (not isinstance(ids, list) or len(ids) != n or len(set(map(str, ids))) != n
            or not all(type(v) is str and v for v in ids)
            or not isinstance(files, list) or len(files) != n
            or not all(v is None or (type(v) is str and v) for v in files)):
        return None
    # lists, as the lines give them: pandas types each column as it types ``_read_images``'
    columns: dict[str, Any] = {"image_id": ids, "file": files}
    for name, smallest in _INT_COLUMNS.items():
        values = data.get(name)
        if (not isinstance(values, list) or len(values) != n
                or not all(type(v) is int and v >= smallest for v in values)):
            return None
        columns[name] = np.asarray(values, dtype=np.int64)
    for name in _FLOAT_COLUMNS:
        columns[name] = decode_vector(data.get(name), "float", n)
        if columns[name] is None:
            return None
    columns["line"] = np.arange(1, n + 1, dtype=np.int64)
    return pd.DataFrame(columns)[IMAGE_COLUMNS]


def _stored_images(stored: Any, key: dict[str, str], n_images: int,
                   metrics: Fields) -> pd.DataFrame | None:
    """A stored mask summary's table, when every check holds (see above)."""
    if not isinstance(stored, dict) or stored.get("format") != MASK_SUMMARY_FORMAT:
        return None
    payload = {name: value for name, value in stored.items() if name != "digest"}
    if (stored.get("digest") != payload_digest(payload) or stored.get("files") != key
            or stored.get("n_images") != n_images):
        return None
    images = _images_from_payload(stored.get("images"), n_images)
    if images is None:
        return None
    try:
        _run_means(images, metrics)
    except LostregError:
        return None
    return images


@dataclass
class MaskImages:
    """A mask run's per-image table, and the summary to store for it (``payload``: None when
    the stored one stands as it is) once every check of the run has passed: a run skipped for
    its metrics.json stores nothing (``load_mask_run``)."""

    images: pd.DataFrame
    payload: dict[str, Any] | None = None


def mask_images(run_dir: Path, n_images: int, metrics: Fields,
                store: SummaryStore | None) -> MaskImages:
    """A mask run's per-image table: from ``store``'s summary when the run's files are the
    summarised ones (its predictions by the stat recorded, else by hash), else parsed from
    the very bytes its key hashed (the file read once), with the summary to store."""
    path = run_dir / PREDICTIONS
    if store is None or not path.is_file():
        return MaskImages(_read_images(path))  # says what is missing
    stored = store.lookup(run_dir.name)  # none under --reread: read as a first build
    current = current_key(run_dir, stored)
    images = _stored_images(stored, current.key, n_images, metrics)
    if images is not None:
        store.reused += 1
        if current.stat is None or current.stat == stored.get("predictions_stat"):
            return MaskImages(images)
        # hashed now and settled: later builds know it by its stat
        payload = {name: value for name, value in stored.items() if name != "digest"}
        return MaskImages(images, {**payload, "predictions_stat": current.stat})
    current = current.read(run_dir)  # the bytes the key hashed, read once
    images = _read_images(path, current.data)
    store.recomputed.append(run_dir.name)
    return MaskImages(images, {
        "format": MASK_SUMMARY_FORMAT, "files": current.key,
        "predictions_stat": current.stat, "n_images": len(images),
        "images": _images_payload(images)})


# --- masks, read again for the figures ------------------------------------------------------


def read_masks(run: MaskRun, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """The predicted binary masks (``bool`` HxW) of ``image_ids``, decoded from their lines'
    ``pred_mask_rle`` (checked first: pycocotools' decoder trusts its input): the file is read
    again, line by line, and only these are kept."""
    wanted = set(image_ids)
    path = run.run_dir / PREDICTIONS
    masks: dict[str, np.ndarray] = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        if not isinstance(record, dict) or record.get("image_id") not in wanted:
            continue
        fields = Fields(record, f"{path}:{number}")
        size = (fields.integer("height", minimum=1), fields.integer("width", minimum=1))
        _rle_area(record.get("pred_mask_rle"), fields.where, size)
        masks[record["image_id"]] = decode_rle(record["pred_mask_rle"])
        if len(masks) == len(wanted):
            break
    return masks

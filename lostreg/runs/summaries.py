"""Per-run summaries: what the reports need of a finished run, computed once from its validated
predictions and stored keyed by the content of the run's files.

Reading a VOC07 run's 5011 prediction lines, checking every value and recomputing every
score takes tens of milliseconds, and bootstrap intervals over them more; a leaderboard of
hundreds of runs did that for every run on every build and held every run's lines in memory
(issue 20: 500 runs, 313 s and 3.9 GB). A summary holds instead, per run:

* ``files``: the sha256 of ``config.json``, ``metrics.json`` and ``predictions.jsonl``, the
  key: a run whose files changed in any byte is read again, one that did not never is;
* for every registered metric whose per-image value the validated predictions give (the
  registry's ``per_image``: CorLoc's ``hit``, a mask run's ``sal_iou``): the run's result
  (``aggregate().result()``) and the per-image vector, compact (``bool``: one bit per image;
  ``float``: float64, NaN for a JSON ``null``), in image order, with the sha256 of the image
  ids so two runs are paired without their lines;
* for a hit/miss metric (``paired_test="mcnemar"``), each bootstrap resample's hit total
  (``stats.resample_indices``: the same resamples, seed and count, as every interval of the
  suite). A run's interval and the paired interval of two runs on the same images both come
  from these totals, to the bit: a resample's mean is its exact integer total over ``n``, and
  the paired difference's total is the difference of the two totals;
* the histogram of ``best_iou`` (box runs) that the run's IoU figure draws.

Summaries live in ``<runs>/.summaries/<run folder>.json`` (a hidden folder: never a run),
written atomically without following a link. Nothing read back is trusted: the file is read
through the bounded JSON reader, its own sha256 (``digest``) and format are checked, its key
must equal the run's files now, and its figures must agree with ``metrics.json`` and with
themselves; any mismatch and the run is read and summarised again. These checks catch damage
and stale files, not a forgery: the digest has no secret, so a summary forged together with
``metrics.json`` passes them; the leaderboard's ``--reread`` (``SummaryStore.reread``) reads
every run as on a first build and names each stored summary that differs. A store that cannot be
written (read-only runs folder) costs speed, never a result. The same store keeps mask runs'
per-image tables (``reports.leaderboard.saliency_runs``, their own format) and, under a dot
name no run folder has, the pairs' McNemar p-values (``lostreg.runs.pvalues``).

Speed (issue 20): a VOC07 run's summary takes about 50 ms of one core (the JSON parse 22 ms,
``fastlines``' checks, the metric's aggregate, the hashes); the bootstrap totals of 500 runs
about 1.5 s (float32 products of 800 resamples at a time, exact).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.evaluation import stats
from lostreg.evaluation.registry import METRICS, MetricSpec
from lostreg.io import MAX_JSON_BYTES, JsonInputError, dumps_strict, loads_bounded, read_bounded
from lostreg.runs import pvalues
from lostreg.runs import store as store_module
from lostreg.runs.fastlines import box_columns
from lostreg.runs.store import (
    CONFIG,
    PREDICTIONS,
    RunData,
    RunHeader,
    ScanResult,
    is_scratch,
    read_header,
    read_predictions,
    run_target,
    scan_runs,
)
from lostreg.workers import ordered_map

STORE_FOLDER = ".summaries"
SUMMARY_FORMAT = "lostreg-run-summary/1"
METRICS_FILE = store_module.METRICS
RUN_FILES = (CONFIG, METRICS_FILE, PREDICTIONS)
IOU_BINS = np.linspace(0.0, 1.0, 21)  # the per-run IoU figure's bins
MAX_SUMMARY_BYTES = 64 << 20
# hit vectors of at most this many bytes (as float64) per block of runs whose bootstrap
# totals are computed together: bounds memory whatever the number of runs
_BLOCK_BYTES = 64 << 20


# --- compact vectors ---------------------------------------------------------------------------


def encode_vector(values: np.ndarray, kind: str) -> str:
    """``bool``: packed bits; ``float``: little-endian float64 (NaN for null); base64 text."""
    if kind == "bool":
        raw = np.packbits(np.asarray(values, dtype=bool)).tobytes()
    else:
        raw = np.asarray(values, dtype="<f8").tobytes()
    return base64.b64encode(raw).decode("ascii")


def _base64_bytes(text: Any) -> bytes | None:
    """The bytes of strict base64 text, or None for anything else (a damaged summary)."""
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None


def decode_vector(text: Any, kind: str, n: int) -> np.ndarray | None:
    """The vector ``encode_vector`` wrote, or None if ``text`` is not one of ``n`` entries
    (wrong length, bits set past the end, text that is not base64)."""
    raw = _base64_bytes(text)
    if raw is None:
        return None
    if kind == "bool":
        if len(raw) != (n + 7) // 8:
            return None
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
        return None if bits[n:].any() else bits[:n].astype(bool)
    if kind == "float" and len(raw) == 8 * n:
        values = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        return None if np.isinf(values).any() else values
    return None


def _totals_dtype(n: int) -> np.dtype:
    return np.dtype("<u2") if n <= np.iinfo(np.uint16).max else np.dtype("<u4")


def _json_safe(value: Any) -> Any:
    """A metric's result as JSON: NaN (and inf) as null, numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- one metric's summary ----------------------------------------------------------------------


@dataclass
class MetricSummary:
    """One metric of one run: its result, its per-image vector and (hit/miss) bootstrap
    totals."""

    name: str
    per_image: str
    kind: str  # "bool" or "float"
    values: np.ndarray
    result: dict
    totals: np.ndarray | None = None

    @property
    def interval(self) -> tuple[float, float]:
        """95% percentile bootstrap interval of the mean, in percent (hit/miss metrics):
        ``stats.bootstrap_corloc_ci`` of the vector, to the bit."""
        if self.totals is None:
            raise LostregError(f"metric {self.name}: no bootstrap totals ({self.kind} values)")
        n = self.values.size
        if not n:
            return float("nan"), float("nan")
        # the plain path's percentile (tail computed the same way), hence stats' own helper
        return stats._percentile_interval(100.0 * (self.totals.astype(np.float64) / n), 0.95)


def metric_columns(spec: MetricSpec, columns: Mapping[str, Any]) -> bool:
    """Whether the validated predictions give this metric's per-image values and scores."""
    return spec.per_image in columns and all(name in columns for name in spec.fields)


def summarise_metric(spec: MetricSpec, columns: Mapping[str, Any]) -> MetricSummary:
    """A metric's summary from the validated per-image columns (the registry's aggregate
    over every image, so the result is the one ``metrics.json`` holds)."""
    values = np.asarray(columns[spec.per_image])
    kind = "bool" if values.dtype == bool else "float"
    if kind == "float":
        values = pd.to_numeric(pd.Series(values), errors="raise").to_numpy(dtype=np.float64)
    names = list(spec.fields)
    rows = zip(*(np.asarray(columns[name]).tolist() for name in names), strict=True)
    # one dict of the metric's fields per image, made in C (each row has len(names) values)
    result = spec.evaluate(map(dict, map(zip, repeat(names), rows)))
    return MetricSummary(spec.name, spec.per_image, kind, values, _json_safe(result))


# --- the summary of one run --------------------------------------------------------------------


class RunSummary(RunData):
    """A finished run as the reports see it, from its summary: ``RunData`` whose predictions
    are read only when asked for (``predictions``, e.g. by the notebook), never to build a
    leaderboard."""

    def __init__(self, header: RunHeader, key: dict[str, str], image_digest: str,
                 metrics: dict[str, MetricSummary], histograms: dict[str, list[int]]) -> None:
        self.run_dir, self.smoke, self.finished = header.run_dir, header.smoke, header.finished
        self.info, self.seconds = header.info, header.seconds
        # the parsed settings stay (``info``); the files' dicts are read again if asked for,
        # so thousands of runs do not hold thousands of config and metrics dicts
        self.header = dataclasses.replace(header, config={}, metrics={})
        self.key, self.image_digest = key, image_digest
        self.metric_summaries, self.histograms = metrics, histograms
        self._predictions: pd.DataFrame | None = None
        self.predictions_stat: list[int] | None = None  # see ``file_stat``

    __eq__ = object.__eq__
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RunSummary({str(self.run_dir)!r})"

    @cached_property
    def config(self) -> dict:  # type: ignore[override]
        """The run's ``config.json`` (read again on first use)."""
        return read_header(self.run_dir).config

    @cached_property
    def metrics(self) -> dict:  # type: ignore[override]
        """The run's ``metrics.json`` (read again on first use)."""
        return read_header(self.run_dir).metrics

    @property
    def n_images(self) -> int:
        return self.header.n_images

    @property
    def hits(self) -> np.ndarray:
        """Per-image hits (CorLoc's ``hit``), in image order."""
        return self.metric("hit").values

    def metric(self, per_image: str) -> MetricSummary:
        for summary in self.metric_summaries.values():
            if summary.per_image == per_image:
                return summary
        raise LostregError(f"{self.run_dir}: its predictions give no per-image {per_image!r}")

    @cached_property
    def summary(self) -> dict[str, Any]:  # type: ignore[override]
        """CorLoc and its interval, as ``RunData.summary`` gives them from the predictions
        (``100.0 * n_hits / n``: ``stats.corloc_percent``'s arithmetic on the same ints)."""
        hits = self.hits
        low, high = self.metric("hit").interval
        n, n_hits = int(hits.size), int(hits.sum())
        return {"n": n, "n_hits": n_hits, "corloc": 100.0 * n_hits / n if n else float("nan"),
                "low": low, "high": high}

    @property
    def predictions(self) -> pd.DataFrame:  # type: ignore[override]
        """The run's validated predictions, read on first use; they must still be what was
        summarised (the same images and hits)."""
        if self._predictions is None:
            frame = read_predictions(self.run_dir / PREDICTIONS)
            if (image_ids_digest(frame["image_id"].tolist()) != self.image_digest
                    or not np.array_equal(frame["hit"].to_numpy(dtype=bool), self.hits)):
                raise LostregError(f"{self.run_dir / PREDICTIONS}: changed while it was being "
                                   "read; build again")
            self._predictions = frame
        return self._predictions


def image_ids_digest(image_ids: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(image_ids)).encode("utf-8")).hexdigest()


def _payload(summary: RunSummary) -> dict[str, Any]:
    """What the store keeps of a summary (without its ``digest``)."""
    metrics = {}
    for name, metric in summary.metric_summaries.items():
        totals = None if metric.totals is None else base64.b64encode(
            metric.totals.astype(_totals_dtype(metric.values.size)).tobytes()).decode("ascii")
        metrics[name] = {"per_image": metric.per_image, "kind": metric.kind,
                         "values": encode_vector(metric.values, metric.kind),
                         "result": metric.result, "totals": totals}
    return {"format": SUMMARY_FORMAT, "files": summary.key,
            "predictions_stat": summary.predictions_stat, "n_images": summary.n_images,
            "image_ids_sha256": summary.image_digest,
            "resamples": [stats.DEFAULT_RESAMPLES, stats.DEFAULT_SEED],
            "metrics": metrics, "histograms": summary.histograms}


def payload_digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _decode_totals(text: Any, n: int) -> np.ndarray | None:
    raw = _base64_bytes(text)
    if raw is None:
        return None
    dtype = _totals_dtype(n)
    if len(raw) != dtype.itemsize * stats.DEFAULT_RESAMPLES:
        return None
    totals = np.frombuffer(raw, dtype=dtype)  # kept compact: 2 bytes a resample up to 65535
    return totals if int(totals.max(initial=0)) <= n else None


def _metric_from_payload(name: str, entry: Any, n: int) -> MetricSummary | None:
    """One stored metric, checked: a known metric, its vector of ``n`` entries, its totals."""
    spec = METRICS.get(name)
    if spec is None or not isinstance(entry, dict) or entry.get("per_image") != spec.per_image:
        return None
    kind, result = entry.get("kind"), entry.get("result")
    values = decode_vector(entry.get("values"), kind, n) if kind in ("bool", "float") else None
    if values is None or not isinstance(result, dict):
        return None
    totals = None
    if kind == "bool":
        totals = _decode_totals(entry.get("totals"), n)
        if totals is None:
            return None
    elif entry.get("totals") is not None:
        return None
    return MetricSummary(name, spec.per_image, kind, values, result, totals)


def _histograms_from_payload(value: Any, n: int) -> dict[str, list[int]] | None:
    if not isinstance(value, dict):
        return None
    for counts in value.values():
        if (not isinstance(counts, list) or len(counts) != len(IOU_BINS) - 1
                or not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != n):
            return None
    return value


def summary_from_payload(data: Any, header: RunHeader, key: dict[str, str]
                         ) -> RunSummary | None:
    """A stored summary if every check holds (format, digest, key, sizes, counts against
    ``metrics.json``), else None: the caller summarises the run again."""
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        return None
    payload = {name: value for name, value in data.items() if name != "digest"}
    if data.get("digest") != payload_digest(payload) or data.get("files") != key:
        return None
    n = data.get("n_images")
    if (type(n) is not int or n != header.n_images
            or data.get("resamples") != [stats.DEFAULT_RESAMPLES, stats.DEFAULT_SEED]
            or not isinstance(data.get("image_ids_sha256"), str)
            or not isinstance(data.get("metrics"), dict)):
        return None
    metrics = {}
    for name, entry in data["metrics"].items():
        metric = _metric_from_payload(name, entry, n)
        if metric is None:
            return None
        metrics[name] = metric
    histograms = _histograms_from_payload(data.get("histograms"), n)
    if histograms is None or not _agrees(metrics, header):
        return None
    summary = RunSummary(header, key, data["image_ids_sha256"], metrics, histograms)
    stat = data.get("predictions_stat")
    if stat is not None and not (isinstance(stat, list) and len(stat) == len(STAT_FIELDS)
                                 and all(type(v) is int for v in stat)):
        return None
    summary.predictions_stat = stat
    return summary


def _agrees(metrics: Mapping[str, MetricSummary], header: RunHeader) -> bool:
    """At least one metric, every vector of ``metrics.json``'s image count, and a hit vector
    of its hit count (the check ``load_run`` makes)."""
    if not metrics or any(m.values.size != header.n_images for m in metrics.values()):
        return False
    hits = [metric for metric in metrics.values() if metric.per_image == "hit"]
    return all(int(metric.values.sum()) == header.n_hits for metric in hits)


# --- summarising a run from its files ----------------------------------------------------------


def validated_columns(path: Path, data: bytes, target: str) -> dict[str, Any]:
    """A run's per-image columns from its predictions bytes, every line checked and every
    score recomputed: the box runs' fast path (``fastlines``; the same checks as
    ``store.read_predictions``, which says what is wrong when one fails), else the reader."""
    if target == "boxes":
        columns = box_columns(data)
        if columns is not None:
            return columns
    frame = read_predictions(path)
    return {name: frame[name].to_numpy() for name in frame.columns} | {
        "image_id": frame["image_id"].tolist()}


def summarise(header: RunHeader, key: dict[str, str], data: bytes) -> RunSummary:
    """A run's summary from its predictions (``data``: the bytes ``key`` hashed), without
    bootstrap totals yet (``add_totals`` computes them for many runs at once)."""
    path = header.run_dir / PREDICTIONS
    target = run_target(header.config)
    columns = validated_columns(path, data, target)
    metrics = {spec.name: summarise_metric(spec, columns) for spec in METRICS.values()
               if spec.target == target and metric_columns(spec, columns)}
    image_ids = columns["image_id"]
    if not metrics:
        raise LostregError(f"{path}: no registered metric's per-image values to summarise")
    hits = next((m.values for m in metrics.values() if m.per_image == "hit"), None)
    header.check_counts(len(image_ids), header.n_hits if hits is None else int(hits.sum()))
    histograms = {}
    if "best_iou" in columns:
        counts = np.histogram(np.asarray(columns["best_iou"], dtype=np.float64), IOU_BINS)[0]
        histograms["best_iou"] = [int(c) for c in counts]
    return RunSummary(header, key, image_ids_digest(image_ids), metrics, histograms)


# --- bootstrap totals, many runs at once --------------------------------------------------------


def add_totals(summaries: Iterable[RunSummary]) -> None:
    """Fill in the bootstrap hit totals of every hit/miss metric lacking them.

    Runs with the same image count share the resamples (``stats.resample_indices``: seed 0),
    so each chunk of resampled indices is drawn once per block of runs, turned into counts per
    image, and multiplied with the block's hit vectors: exact integer totals (float64 sums of
    0/1 terms), equal to what each run's own resampling gives.
    """
    pending: dict[int, list[MetricSummary]] = {}
    for summary in summaries:
        for metric in summary.metric_summaries.values():
            if metric.kind == "bool" and metric.totals is None:
                pending.setdefault(metric.values.size, []).append(metric)
    for n, metrics in pending.items():
        width = max(1, _BLOCK_BYTES // (8 * max(n, 1)))
        for start in range(0, len(metrics), width):
            block = metrics[start:start + width]
            totals = resampled_totals(np.stack([m.values for m in block], axis=1), n)
            for column, metric in enumerate(block):
                metric.totals = totals[:, column].astype(_totals_dtype(n))


# resamples turned into per-image counts at once: at most this many cells (bounds memory:
# 12 bytes a cell, counts and their float copy), and as many rows as that allows: OpenBLAS
# multiplies 800 rows (a VOC07 run's 5011 images) about 5x faster per row than 128
_CELLS_PER_PRODUCT = 4_000_000


def _exact_dtype(n: int) -> np.dtype:
    """The float type whose sums of ``n`` small whole numbers are exact: float32 while every
    partial sum stays below 2**24 (twice the speed of float64 in the product), else float64."""
    return np.dtype(np.float32) if n < 2**24 else np.dtype(np.float64)


def resampled_totals(hits: np.ndarray, n: int) -> np.ndarray:
    """``(n_resamples, columns)`` hit totals of each bootstrap resample of ``n`` images: the
    resamples' per-image counts (a few rows at a time) times the hit vectors. Every product
    and partial sum is a whole number below ``n + 1``, so the float product is exact."""
    columns = hits.shape[1]
    if not n:
        return np.zeros((stats.DEFAULT_RESAMPLES, columns), dtype=np.int64)
    dtype = _exact_dtype(n)
    values = hits.astype(dtype)
    totals = np.empty((stats.DEFAULT_RESAMPLES, columns), dtype=np.int64)
    done = 0
    step = max(1, _CELLS_PER_PRODUCT // n)
    for idx in stats.resample_indices(n, stats.DEFAULT_RESAMPLES, stats.DEFAULT_SEED):
        for start in range(0, idx.shape[0], step):
            rows = idx[start:start + step]
            m = rows.shape[0]
            flat = (rows + n * np.arange(m)[:, None]).ravel()
            counts = np.bincount(flat, minlength=m * n).reshape(m, n).astype(dtype)
            totals[done:done + m] = counts @ values  # exact: sums of whole numbers
            done += m
    return totals


# --- paired statistics over summaries ----------------------------------------------------------


@dataclass(frozen=True)
class PairedStatistics:
    """Two runs compared on the images both scored: McNemar's exact test and the 95% paired
    bootstrap interval of the CorLoc difference (other - base, points)."""

    n_paired: int
    miss_to_hit: int
    hit_to_miss: int
    p_value: float
    diff_low: float
    diff_high: float


def paired_statistics(base: RunData, other: RunData) -> PairedStatistics:
    """The paired comparison of two runs' hits, joined on ``image_id``.

    Two summaries of the same image list (the usual case: one dataset) are compared from
    their vectors and bootstrap totals alone; otherwise (another image list, or runs built by
    hand) the two runs' predictions are joined as before. Both give the same numbers, to the
    bit (``tests/test_leaderboard_summaries.py``).
    """
    if (isinstance(base, RunSummary) and isinstance(other, RunSummary)
            and base.image_digest == other.image_digest):
        a, b = base.metric("hit"), other.metric("hit")
        n = a.values.size
        low = high = float("nan")
        if n:
            difference = (b.totals.astype(np.float64) - a.totals) / n  # exact integers
            low, high = stats._percentile_interval(100.0 * difference, 0.95)
        hits_a, hits_b = a.values, b.values
    else:
        joined = base.predictions[["image_id", "hit"]].merge(
            other.predictions[["image_id", "hit"]], on="image_id", suffixes=("", "_reg"))
        hits_a = joined["hit"].to_numpy(dtype=bool)
        hits_b = joined["hit_reg"].to_numpy(dtype=bool)
        low, high = stats.paired_bootstrap_diff_ci(hits_a, hits_b)
    test = pvalues.mcnemar(hits_a, hits_b)  # stats.mcnemar_exact's, SciPy only when new
    return PairedStatistics(int(hits_a.size), test.miss_to_hit, test.hit_to_miss, test.p_value,
                            low, high)


# --- the store and the scan --------------------------------------------------------------------


@dataclass
class SummaryStore:
    """``<runs>/.summaries``: one summary file per run folder. Written without following a
    link (a linked store folder is not used; a linked file is replaced, not written through);
    a store that cannot be written is said once (``report``) and the build goes on."""

    runs_dir: Path
    report: Callable[[str], None] | None = None
    usable: bool = True
    written: int = 0
    reused: int = 0
    recomputed: list[str] = field(default_factory=list)
    # ``--reread``: no stored summary is used (``lookup``), every run is summarised from its
    # predictions as on a first build, and each stored summary is compared with the one its
    # predictions give before it is replaced (``compared``; the runs whose summary differed,
    # each named in one line, in ``differing``). The digest has no secret, so a summary
    # forged consistently with a forged metrics.json passes every check: only this finds it.
    reread: bool = False
    compared: int = 0
    differing: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.runs_dir / STORE_FOLDER

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def read(self, name: str) -> Any:
        """The stored JSON of a run's summary, or None (absent, a link, unreadable)."""
        return _load_stored(self.path(name)) if self.usable else None

    def lookup(self, name: str) -> Any:
        """The stored summary a build may use for run ``name``: ``read``'s, and none at all
        under ``--reread`` (the run is then read as on a first build, by the same code)."""
        return None if self.reread else self.read(name)

    def _stored(self, name: str) -> bool:
        """Whether anything is stored under run ``name``'s summary path (a usable store)."""
        path = self.path(name)
        return not self.folder.is_symlink() and (path.is_symlink() or path.exists())

    def _difference(self, name: str, payload: Mapping[str, Any]) -> str | None:
        """How run ``name``'s stored summary differs from ``payload`` (what its files give
        now), or None when it does not or nothing is stored. Where the files were read is
        not compared (``predictions_stat``: a copied folder has new inodes)."""
        if not self._stored(name):
            return None
        self.compared += 1
        stored = _load_stored(self.path(name))
        if not isinstance(stored, dict):
            return "cannot be read as a summary (damaged)"
        body = {key: value for key, value in stored.items() if key != "digest"}
        if stored.get("digest") != payload_digest(body):
            return "does not match its own digest (damaged)"
        if stored.get("files") != payload.get("files"):
            return "summarises other contents of the run's files (stale)"
        if _comparable(body) != _comparable(payload):
            return "differs from what the predictions give (forged or damaged)"
        return None

    def _compare(self, name: str, payload: Mapping[str, Any]) -> None:
        """``--reread``: name (one line) a stored summary that differs from ``payload``."""
        reason = self._difference(name, payload)
        if reason is None:
            return
        self.differing.append(name)
        if self.report is not None:
            self.report(f"{self.path(name)}: {reason}; this build uses what "
                        f"{self.runs_dir / name / PREDICTIONS} gives")

    def unreadable_run(self, name: str) -> None:
        """A run whose files give no summary (its folder is skipped with its own line):
        under ``--reread`` its stored summary, if any, is named and removed, since one
        consistent with a forged metrics.json would be trusted again by the next build.
        Outside ``--reread`` nothing is done (a stored summary was not used anyway)."""
        if not self.reread or not self._stored(name):
            return
        path = self.path(name)
        try:
            path.unlink()
            done = "removed"
        except OSError as exc:
            done = f"could not be removed ({exc.strerror or exc})"
        self.compared += 1
        self.differing.append(name)
        if self.report is not None:
            self.report(f"{path}: a stored summary, but the run's files give none (the line "
                        f"skipping {self.runs_dir / name} says why); {done}")

    def _disable(self, reason: str) -> None:
        self.usable = False
        if self.report is not None:
            self.report(f"{self.folder}: run summaries not stored ({reason}); every build "
                        "reads every run again")

    def write(self, summary: RunSummary) -> None:
        """Store a summary atomically (temp file, then rename over the old one)."""
        self.write_payload(summary.run_dir.name, _payload(summary))

    def write_payload(self, name: str, payload: dict[str, Any]) -> None:
        """Store run ``name``'s summary ``payload`` (its ``digest`` added) atomically: a temp
        file renamed over the old one, which replaces a link and never writes through it.
        Mask runs' summaries (``reports.leaderboard.saliency_runs``) come this way too."""
        if self.reread:
            self._compare(name, payload)
        if not self.usable:
            return
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            return self._disable("it is a link or not a folder")
        payload = {**payload, "digest": payload_digest(payload)}
        text = dumps_strict(payload, self.path(name), sort_keys=True)  # no NaN: strict JSON
        try:
            self.folder.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                os.replace(tmp, self.path(name))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            return self._disable(exc.strerror or str(exc))
        self.written += 1

    def load_p_values(self) -> None:
        """The McNemar p-values earlier builds kept (``pvalues``: each checked before use)."""
        if self.usable and not self.folder.is_symlink() and self.folder.is_dir():
            pvalues.P_VALUES.load(self.folder)

    def save_p_values(self) -> None:
        """Keep this build's new McNemar p-values for the next build."""
        if self.usable:
            pvalues.P_VALUES.save(self.folder)

    def prune(self) -> None:
        """Remove the summaries of run folders that no longer exist."""
        if not self.usable or self.folder.is_symlink() or not self.folder.is_dir():
            return
        for path in self.folder.glob("*.json"):
            if path.name.startswith("."):  # the store's own files (``pvalues``), never a run's
                continue
            if not (self.runs_dir / path.stem).is_dir() and not path.is_symlink():
                path.unlink(missing_ok=True)


def _load_stored(path: Path) -> Any:
    """The JSON stored at ``path`` (bounded reader), or None (absent, a link, unreadable)."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return loads_bounded(read_bounded(path, MAX_SUMMARY_BYTES, "run summary"), str(path),
                             max_bytes=None)
    except (LostregError, JsonInputError):
        return None


def _comparable(payload: Mapping[str, Any]) -> str:
    """A summary's content as canonical JSON, without where its predictions were read
    (``predictions_stat``) or its digest: equal for the same files' summaries."""
    body = {key: value for key, value in payload.items()
            if key not in ("digest", "predictions_stat")}
    return json.dumps(body, sort_keys=True)


STAT_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
# a file changed less than this before it was read may change again within one tick of its
# timestamps (Linux stamps files from a coarse clock) without its stat changing
RACY_NS = 2_000_000_000


def file_stat(path: Path) -> list[int]:
    """What changes whenever a file's content can have changed: size, modification and
    status-change times (``ctime``: set by the system on every write, and by any ``utime``;
    no user can set it back), inode and device (a file replaced or copied elsewhere)."""
    stat = os.stat(path)
    return [int(getattr(stat, name)) for name in STAT_FIELDS]


def settled(stat: list[int], before_ns: int) -> bool:
    """Whether a file whose ``stat`` was taken before a read starting at ``before_ns`` had not
    changed in the last ``RACY_NS`` before it: only then does an equal stat later prove the
    same content (git's rule for racily clean index entries)."""
    return max(stat[1], stat[2]) < before_ns - RACY_NS


def run_file_key(run_dir: Path, predictions: bytes) -> dict[str, str]:
    """The sha256 of each of a run's files (``predictions``: the bytes read from it)."""
    key = {}
    for name in (CONFIG, METRICS_FILE):
        key[name] = hashlib.sha256(read_bounded(run_dir / name, MAX_JSON_BYTES)).hexdigest()
    key[PREDICTIONS] = hashlib.sha256(predictions).hexdigest()
    return key


@dataclass
class Pending:
    """A run whose stored summary is missing or failed a check: summarised from its files."""

    run_dir: Path
    header: RunHeader
    key: dict[str, str]


def read_settled(path: Path) -> tuple[bytes, list[int] | None]:
    """A predictions file's bytes, and its stat when it proves them later (it did not change
    while read, nor in the ``RACY_NS`` before): else None."""
    before = time.time_ns()
    try:
        stat = file_stat(path)
    except OSError:
        stat = None
    data = read_bounded(path, MAX_JSON_BYTES, "predictions file")
    try:
        same = stat is not None and file_stat(path) == stat
    except OSError:
        same = False
    return data, (stat if same and settled(stat, before) else None)


def recorded_key(run_dir: Path, stored: Any) -> dict[str, str] | None:
    """The key of a run whose predictions file has the stat its stored summary recorded (the
    same file, untouched since it was hashed: its recorded hash is its hash), else None."""
    if not isinstance(stored, dict) or not isinstance(stored.get("files"), dict):
        return None
    recorded = stored.get("predictions_stat")
    try:
        unchanged = recorded is not None and recorded == file_stat(run_dir / PREDICTIONS)
    except OSError:
        return None
    if not unchanged:
        return None
    return {**run_file_key(run_dir, b""), PREDICTIONS: stored["files"].get(PREDICTIONS)}


@dataclass
class CurrentKey:
    """The key of a run's files as they are now, and the predictions' bytes when they had to
    be read for it (with their stat when it proves them later, ``read_settled``): a caller
    that must read the lines parses these bytes, so what it summarises is what was hashed."""

    key: dict[str, str]
    data: bytes | None = None
    stat: list[int] | None = None

    def read(self, run_dir: Path) -> CurrentKey:
        """This key with the predictions' bytes: itself when they were read for it, else the
        file read now (a key known by the stat: its stored summary failed a check), its
        predictions hash taken from these bytes and the other files' hashes kept."""
        if self.data is not None:
            return self
        data, stat = read_settled(run_dir / PREDICTIONS)
        return CurrentKey({**self.key, PREDICTIONS: hashlib.sha256(data).hexdigest()}, data,
                          stat)


def current_key(run_dir: Path, stored: Any) -> CurrentKey:
    """A run's key now: from the stat ``stored`` (its stored summary, or None) recorded when
    its predictions file still has it (not read then), else hashed from the file's bytes,
    read once. ``config.json`` and ``metrics.json`` are hashed once either way."""
    key = recorded_key(run_dir, stored)
    if key is not None:
        return CurrentKey(key)
    data, stat = read_settled(run_dir / PREDICTIONS)
    return CurrentKey(run_file_key(run_dir, data), data, stat)


def prepare(run_dir: Path, store: SummaryStore, header: RunHeader | None = None
            ) -> RunSummary | Pending:
    """A finished run's stored summary when it passes every check, else what summarising it
    needs (``header``: its ``read_header``, if read already). Raises what ``load_run`` raises
    for a bad folder. The predictions file is not read when its stat is the one recorded."""
    header = header or read_header(run_dir)
    path = run_dir / PREDICTIONS
    if not path.is_file():
        read_predictions(path)  # says what is missing, as load_run does
    stored = store.lookup(run_dir.name)
    current = current_key(run_dir, stored)
    key, stat = current.key, current.stat
    summary = summary_from_payload(stored, header, key) if stored is not None else None
    if summary is None:
        return Pending(run_dir, header, key)
    store.reused += 1
    if stat is not None and stat != summary.predictions_stat:
        summary.predictions_stat = stat  # hashed now and settled: later builds need not
        store.write(summary)
    return summary


def summarise_pending(job: Pending) -> RunSummary | LostregError:
    """``summarise`` of one run (in a worker process when there are many); a bad file is
    returned, not raised, to be reported where ``scan_runs`` reaches the folder."""
    try:
        data, stat = read_settled(job.run_dir / PREDICTIONS)
        key = {**job.key, PREDICTIONS: hashlib.sha256(data).hexdigest()}  # as read now
        summary = summarise(job.header, key, data)
    except LostregError as exc:
        return exc
    summary.predictions_stat = stat
    return summary


def load_summary(run_dir: Path, store: SummaryStore) -> tuple[RunSummary, bool]:
    """A finished run's summary: the stored one when it passes every check, else computed
    from its files (second item True). Raises what ``load_run`` raises for a bad folder."""
    ready = prepare(run_dir, store)
    if isinstance(ready, RunSummary):
        return ready, False
    store.recomputed.append(run_dir.name)
    summary = summarise_pending(ready)
    if isinstance(summary, LostregError):
        raise summary
    return summary, True


PARALLEL_FROM = 8  # runs to summarise before worker processes are worth starting


def _ready_summaries(runs_dir: Path, store: SummaryStore
                     ) -> dict[Path, RunSummary | LostregError]:
    """Every finished folder's summary (or the error reading it gives), the ones to compute
    computed together (``lostreg.workers``: in parallel when many), their totals at once."""
    ready: dict[Path, RunSummary | LostregError] = {}
    pending: list[Pending] = []
    folders = sorted(path for path in runs_dir.iterdir() if path.is_dir()
                     and not path.name.startswith(".") and (path / METRICS_FILE).exists())
    for folder in folders:
        try:
            header = read_header(folder)
            if is_scratch(header.config, header.metrics) or run_target(header.config) != "boxes":
                continue  # never read by scan_runs (a look during training; a mask run)
            item = prepare(folder, store, header)
        except LostregError as exc:
            ready[folder] = exc
            continue
        if isinstance(item, Pending):
            pending.append(item)
        else:
            ready[folder] = item
    computed = ordered_map(summarise_pending, pending, PARALLEL_FROM)
    add_totals(summary for summary in computed if isinstance(summary, RunSummary))
    for job, summary in zip(pending, computed, strict=True):
        ready[job.run_dir] = summary
        if isinstance(summary, RunSummary):
            store.recomputed.append(job.run_dir.name)
            store.write(summary)
    return ready


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def scan_summaries(runs_dir: str | Path, include_smoke: bool = False,
                   report: Callable[[str], None] | None = _stderr, reread: bool = False
                   ) -> tuple[ScanResult, SummaryStore]:
    """``store.scan_runs`` over summaries: the same runs, skips and counts, each run read from
    its files only when they changed since it was last summarised; the new summaries are
    computed together (their bootstrap totals at once), then stored. ``reread``: every run
    is read from its files, and each stored summary checked against them (``SummaryStore``)."""
    runs_dir = Path(runs_dir)
    store = SummaryStore(runs_dir, report, reread=reread)
    ready = _ready_summaries(runs_dir, store) if runs_dir.is_dir() else {}

    def load(folder: Path) -> RunSummary:
        item = ready.get(folder)
        try:
            if item is None:  # appeared since: read it now
                item = load_summary(folder, store)[0]
            if isinstance(item, LostregError):
                raise item
        except LostregError:
            store.unreadable_run(folder.name)
            raise
        return item

    result = scan_runs(runs_dir, include_smoke, report, load=load)
    store.prune()
    store.load_p_values()
    return result, store

"""The grid's runs as one table: per-image hits of every point, CorLoc with its 95% interval.

The run folders are read back with the leaderboard's reader (``lostreg.reports.leaderboard.load_run``:
every value type-checked, every hit recomputed from box and ground truth), and must form
exactly the grid asked for: one finished LOST run per point, all of one model, weights,
dataset and image list. ``protocol.csv`` has one row per point; ``read_protocol_csv`` reads
one back (another dataset's, for cross-dataset selection) with every cell checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.evaluation import stats
from lostreg.fields import read_text_csv
from lostreg.reports.protocol.grid import GridPoint, ProtocolGrid, clean_bias
from lostreg.runs.config import NORMALIZATIONS
from lostreg.runs.store import RunData, load_run

POINT_COLUMNS = ["pos_interp", "normalize", "feature", "layer", "gram_bias"]
PROTOCOL_COLUMNS = ["model", "registers", "test_time_registers", "dataset", "split",
                    *POINT_COLUMNS, "k_patches", "n_images", "n_hits", "corloc", "ci_low",
                    "ci_high", "run_id", "smoke"]
# settings every run of one protocol shares (RunInfo attribute names)
SHARED = ("model", "timm_name", "dataset", "split", "no_hard", "limit", "precision",
          "weights_sha256", "num_registers", "test_time_registers")


def bootstrap_cis(hits: np.ndarray, n_resamples: int = stats.DEFAULT_RESAMPLES,
                  confidence: float = 0.95, seed: int = stats.DEFAULT_SEED) -> np.ndarray:
    """``(n_settings, 2)`` percentile intervals of CorLoc, equal to the bit to
    ``stats.bootstrap_corloc_ci`` on each column (the same resampled images for every setting,
    as there), but one matrix product per chunk of resamples instead of one gather per setting:
    the resample's image counts times the hits are the resampled hit totals, exact integers."""
    hits = np.asarray(hits, dtype=bool)
    n, settings = hits.shape
    if not n:
        return np.full((settings, 2), np.nan)
    values = hits.astype(np.float64)
    means = []
    for idx in stats.resample_indices(n, n_resamples, seed):
        m = idx.shape[0]
        flat = (idx + n * np.arange(m)[:, None]).ravel()
        counts = np.bincount(flat, minlength=m * n).reshape(m, n).astype(np.float64)
        means.append((counts @ values) / n)
    percent = 100.0 * np.concatenate(means)
    tail = 100.0 * (1.0 - confidence) / 2.0
    return np.array([np.percentile(percent[:, j], [tail, 100.0 - tail])
                     for j in range(settings)])


def point_of(run: RunData) -> GridPoint:
    info = run.info
    return GridPoint(info.pos_interp, info.normalize, info.feature, info.layer,
                     clean_bias(info.method_params["gram_bias"]))


@dataclass
class GridRuns:
    """Every point's run, in grid order, with the per-image hits ``(n_images, n_points)``."""

    points: list[GridPoint]
    runs: list[RunData]
    hits: np.ndarray
    image_ids: list[str]

    @property
    def first(self) -> RunData:
        return self.runs[0]

    @property
    def smoke(self) -> bool:
        return self.first.smoke


def _check_shared(runs: Sequence[RunData], grid: ProtocolGrid) -> None:
    first = runs[0]
    for run in runs:
        if run.info.method != "lost" or run.info.method_params["k_patches"] != grid.k_patches:
            raise LostregError(f"{run.run_dir}: not a LOST run with k={grid.k_patches} "
                               f"({run.info.method} {run.info.method_params})")
        for name in SHARED:
            if getattr(run.info, name) != getattr(first.info, name):
                raise LostregError(f"{run.run_dir}: {name} is {getattr(run.info, name)!r} but "
                                   f"{first.run_dir} has {getattr(first.info, name)!r}; the "
                                   "points of one protocol must share it")
        if run.smoke != first.smoke:
            raise LostregError(f"{run.run_dir}: smoke and real runs in one protocol")


def load_grid_runs(run_dirs: Sequence[str | Path], grid: ProtocolGrid) -> GridRuns:
    """Read the grid's finished runs and check they are exactly ``grid``'s points."""
    if not run_dirs:
        raise LostregError("no runs to read")
    by_point: dict[GridPoint, RunData] = {}
    runs = [load_run(path) for path in run_dirs]
    _check_shared(runs, grid)
    for run in runs:
        point = point_of(run)
        if point in by_point and by_point[point].run_dir != run.run_dir:
            raise LostregError(f"{run.run_dir} and {by_point[point].run_dir} are the same grid "
                               f"point ({point.label()})")
        by_point[point] = run
    wanted = grid.points()
    missing = [p.label() for p in wanted if p not in by_point]
    extra = [p.label() for p in by_point if p not in set(wanted)]
    if missing or extra:
        raise LostregError(f"the runs do not form the grid: missing {missing or 'none'}, "
                           f"not in the grid {extra or 'none'}")
    ordered = [by_point[p] for p in wanted]
    image_ids = ordered[0].predictions["image_id"].tolist()
    for run in ordered[1:]:
        if run.predictions["image_id"].tolist() != image_ids:
            raise LostregError(f"{run.run_dir}: its images differ from {ordered[0].run_dir}'s")
    hits = np.stack([run.predictions["hit"].to_numpy(dtype=bool) for run in ordered], axis=1)
    return GridRuns(wanted, ordered, hits, image_ids)


def protocol_frame(grid_runs: GridRuns, k_patches: int) -> pd.DataFrame:
    """``protocol.csv``'s rows: one per point, in grid order, CorLoc with a 95% interval."""
    hits = grid_runs.hits
    n = hits.shape[0]
    n_hits = hits.sum(axis=0)
    cis = bootstrap_cis(hits)
    info = grid_runs.first.info
    rows = []
    for j, (point, run) in enumerate(zip(grid_runs.points, grid_runs.runs, strict=True)):
        rows.append({"model": info.model, "registers": info.num_registers,
                     "test_time_registers": info.test_time_registers,
                     "dataset": info.dataset, "split": info.split,
                     "pos_interp": point.pos_interp, "normalize": point.normalize,
                     "feature": point.feature, "layer": point.layer,
                     "gram_bias": point.gram_bias, "k_patches": k_patches, "n_images": n,
                     "n_hits": int(n_hits[j]), "corloc": 100.0 * int(n_hits[j]) / n,
                     "ci_low": float(cis[j, 0]), "ci_high": float(cis[j, 1]),
                     "run_id": run.run_id, "smoke": bool(run.smoke)})
    return pd.DataFrame(rows, columns=PROTOCOL_COLUMNS)


def protocol_csv(frame: pd.DataFrame) -> str:
    """The CSV text (CorLoc and interval to 4 decimals; the counts are exact)."""
    shown = frame.copy()
    for column in ("corloc", "ci_low", "ci_high"):
        shown[column] = shown[column].round(4)
    return shown.to_csv(index=False, lineterminator="\n")


def points_of(frame: pd.DataFrame) -> list[GridPoint]:
    return [GridPoint(str(r["pos_interp"]), str(r["normalize"]), str(r["feature"]),
                      int(r["layer"]), clean_bias(r["gram_bias"]))
            for r in frame[POINT_COLUMNS].to_dict("records")]


def _numbers(frame: pd.DataFrame, column: str, path: Path, integer: bool) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() | ~np.isfinite(values.fillna(0.0))
    if integer:
        bad |= values.fillna(0.0) % 1 != 0
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise LostregError(f"{path}: row {row + 2}: {column} {frame[column].iloc[row]!r} is not "
                           f"{'a whole' if integer else 'a'} number")
    return values.astype(np.int64) if integer else values.astype(np.float64)


def _check_rows(frame: pd.DataFrame, path: Path) -> None:
    """Counts, CorLoc and the categorical cells agree with each other, row by row."""
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{path}: row {i + 2}"
        if row["normalize"] not in NORMALIZATIONS:
            raise LostregError(f"{where}: normalize {row['normalize']!r} is not none or l2")
        if row["smoke"] not in ("True", "False"):
            raise LostregError(f"{where}: smoke must be True or False, not {row['smoke']!r}")
        if not 0 <= row["n_hits"] <= row["n_images"] or row["n_images"] < 1:
            raise LostregError(f"{where}: {row['n_hits']} hits of {row['n_images']} images")
        if abs(row["corloc"] - 100.0 * row["n_hits"] / row["n_images"]) > 1e-3:
            raise LostregError(f"{where}: corloc {row['corloc']} is not 100 * n_hits / n_images")
        if not row["ci_low"] - 1e-3 <= row["corloc"] <= row["ci_high"] + 1e-3:
            raise LostregError(f"{where}: corloc {row['corloc']} outside its interval")
        for column in ("model", "dataset", "feature", "pos_interp", "run_id"):
            if not row[column].strip():
                raise LostregError(f"{where}: '{column}' is empty")


def read_protocol_csv(path: str | Path) -> pd.DataFrame:
    """A ``protocol.csv`` with every cell checked: one model, one dataset and image count,
    each point once, counts and CorLoc consistent. One line naming the file and row if not."""
    path = Path(path)
    if not path.is_file():
        raise LostregError(f"{path}: protocol table not found")
    frame = read_text_csv(path, PROTOCOL_COLUMNS)
    if frame.empty:
        raise LostregError(f"{path}: no rows")
    frame = frame[PROTOCOL_COLUMNS].copy()
    for column in ("registers", "test_time_registers", "layer", "k_patches", "n_images",
                   "n_hits"):
        frame[column] = _numbers(frame, column, path, integer=True)
    for column in ("gram_bias", "corloc", "ci_low", "ci_high"):
        frame[column] = _numbers(frame, column, path, integer=False)
    _check_rows(frame, path)
    if (frame["registers"] < 0).any() or (frame["test_time_registers"] < 0).any():
        raise LostregError(f"{path}: register counts must be >= 0")
    for column in ("model", "registers", "test_time_registers", "dataset", "split", "n_images",
                   "smoke", "k_patches"):
        if frame[column].nunique() != 1:
            raise LostregError(f"{path}: '{column}' differs between rows (one protocol per file)")
    keys = pd.Series([p.label() for p in points_of(frame)])
    if keys.duplicated().any():
        raise LostregError(f"{path}: grid point {keys[keys.duplicated()].iloc[0]} appears twice")
    frame["gram_bias"] = [clean_bias(b) for b in frame["gram_bias"]]
    frame["smoke"] = frame["smoke"].eq("True")
    return frame

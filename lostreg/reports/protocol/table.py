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
from lostreg.fields import shown
from lostreg.reports.cells import neutralise_formulas, read_cells, restore_formulas
from lostreg.reports.protocol.grid import POS_INTERPS, GridPoint, ProtocolGrid, clean_bias
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
    """The CSV text (CorLoc and interval to 4 decimals; the counts are exact; text cells that
    could start a spreadsheet formula neutralised, ``cells.neutralise_formulas``)."""
    rounded = frame.copy()
    for column in ("corloc", "ci_low", "ci_high"):
        rounded[column] = rounded[column].round(4)
    return neutralise_formulas(rounded).to_csv(index=False, lineterminator="\n")


def points_of(frame: pd.DataFrame) -> list[GridPoint]:
    return [GridPoint(str(r["pos_interp"]), str(r["normalize"]), str(r["feature"]),
                      int(r["layer"]), clean_bias(r["gram_bias"]))
            for r in frame[POINT_COLUMNS].to_dict("records")]


# protocol.csv's columns and what each cell must hold (row 18 of issue 20: a feature 'zz' was
# accepted, and its point dropped out of the cross-dataset selection without a word)
INTEGER_COLUMNS = {"registers": 0, "test_time_registers": 0, "layer": None, "k_patches": 1,
                   "n_images": 1, "n_hits": 0}  # the smallest value allowed (None: any)
NUMBER_COLUMNS = {"gram_bias": None, "corloc": (0.0, 100.0), "ci_low": (0.0, 100.0),
                  "ci_high": (0.0, 100.0)}  # the range allowed (None: any finite number)
TEXT_COLUMNS = ("model", "split", "run_id")


def _choices() -> dict[str, tuple[str, ...]]:
    """The values each categorical column may take, from the registries that define them."""
    from lostreg.datasets import DATASETS
    from lostreg.methods import get_method
    from lostreg.runs.checks import accepted_features

    return {"dataset": tuple(DATASETS), "feature": accepted_features(get_method("lost")),
            "normalize": NORMALIZATIONS, "pos_interp": POS_INTERPS, "smoke": ("True", "False")}


def _cell_error(path: Path, row: int, column: str, value: object, expected: str
                ) -> LostregError:
    return LostregError(f"{path}: row {row + 2}, column '{column}': {shown(value)} is not "
                        f"{expected}")


def _numbers(frame: pd.DataFrame, column: str, path: Path, integer: bool) -> pd.Series:
    """A column of finite numbers (whole ones below 2**53 for ``integer``), in its range."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() | ~np.isfinite(values.fillna(0.0))
    if integer:
        bad |= (values.fillna(0.0) % 1 != 0) | (values.fillna(0.0).abs() >= 2.0 ** 53)
        bound = INTEGER_COLUMNS[column]
        expected = "a whole number" + ("" if bound is None else f" >= {bound}")
        if bound is not None:
            bad |= values.fillna(bound) < bound
    else:
        limits = NUMBER_COLUMNS[column]
        expected = "a finite number" + ("" if limits is None else
                                        f" from {limits[0]:g} to {limits[1]:g}")
        if limits is not None:
            bad |= (values.fillna(limits[0]) < limits[0]) | (values.fillna(limits[1]) > limits[1])
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise _cell_error(path, row, column, frame[column].iloc[row], expected)
    return values.astype(np.int64) if integer else values.astype(np.float64)


def _check_text(frame: pd.DataFrame, path: Path) -> None:
    """Every categorical cell a known value, every other text cell non-empty."""
    for column, allowed in _choices().items():
        for row, value in enumerate(frame[column]):
            if value not in allowed:
                raise _cell_error(path, row, column, value, f"one of {', '.join(allowed)}")
    for column in TEXT_COLUMNS:
        for row, value in enumerate(frame[column]):
            if not value.strip():
                raise _cell_error(path, row, column, value, "a non-empty text")


def _check_rows(frame: pd.DataFrame, path: Path) -> None:
    """Counts, CorLoc and its interval agree with each other, row by row."""
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{path}: row {i + 2}"
        if row["n_hits"] > row["n_images"]:
            raise LostregError(f"{where}, columns 'n_hits', 'n_images': {row['n_hits']} hits of "
                               f"{row['n_images']} images")
        if abs(row["corloc"] - 100.0 * row["n_hits"] / row["n_images"]) > 1e-3:
            raise LostregError(f"{where}, column 'corloc': {row['corloc']} is not 100 * n_hits "
                               "/ n_images")
        if not row["ci_low"] - 1e-3 <= row["corloc"] <= row["ci_high"] + 1e-3:
            raise LostregError(f"{where}, columns 'ci_low', 'ci_high': corloc {row['corloc']} "
                               "outside its interval")


def read_protocol_csv(path: str | Path) -> pd.DataFrame:
    """A ``protocol.csv`` with every cell checked: each a known value or a number in range,
    one model, one dataset and image count, each point once, counts and CorLoc consistent.
    One line naming the file, row and column if not (an empty file too)."""
    path = Path(path)
    if not path.is_file():
        raise LostregError(f"{path}: protocol table not found")
    frame = read_cells(path, PROTOCOL_COLUMNS)
    if frame.empty:
        raise LostregError(f"{path}: no rows")
    frame = restore_formulas(frame[PROTOCOL_COLUMNS])
    for column in INTEGER_COLUMNS:
        frame[column] = _numbers(frame, column, path, integer=True)
    for column in NUMBER_COLUMNS:
        frame[column] = _numbers(frame, column, path, integer=False)
    _check_text(frame, path)
    _check_rows(frame, path)
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

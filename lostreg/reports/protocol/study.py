"""One protocol study: the grid's runs, read back, scored, selected on, compared with the papers.

``build_study`` reads the finished runs of a grid into ``protocol.csv``'s rows, computes the
best-of-grid score with its split-half and cross-dataset selection estimates, and finds the
published figures for this backbone and dataset; ``draw_figures`` draws its figures.
``lostreg.reports.protocol.files`` writes them, with the study's other files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.datasets import DATASETS
from lostreg.errors import LostregError
from lostreg.fields import Fields
from lostreg.io import read_json_object
from lostreg.reports.leaderboard.published import VARIANT_LABELS, load_published, method_key, variant_of
from lostreg.reports.leaderboard.tables import base_model_name
from lostreg.reports.protocol import figures
from lostreg.reports.protocol.grid import DEFAULT_POS_INTERP, GridPoint, ProtocolGrid
from lostreg.reports.protocol.selection import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_SPLITS,
    Choice,
    CrossChoice,
    SplitHalf,
    best_of_grid,
    cross_dataset,
    split_half,
)
from lostreg.reports.protocol.table import (
    GridRuns,
    load_grid_runs,
    points_of,
    protocol_frame,
    read_protocol_csv,
)
from lostreg.runs.store import RunInfo

PUBLISHED_WITHIN_SHOWN = 10  # grid points listed per published figure (closest first)


@dataclass(frozen=True)
class CrossDataset:
    """A setting chosen on another dataset's protocol (``source``) and scored here."""

    dataset: str
    source: Path
    points: list[GridPoint]  # the points both grids have, in this grid's order
    choice: CrossChoice


@dataclass
class Study:
    """Everything a protocol study reports (no file written yet)."""

    grid: ProtocolGrid
    runs: GridRuns
    frame: pd.DataFrame
    best: Choice
    split: SplitHalf
    cross: list[CrossDataset]
    published: list[dict[str, Any]]
    reference: GridPoint | None  # the setting LOST's own code uses, when the grid has it
    runs_dir: Path

    @property
    def info(self) -> RunInfo:
        return self.runs.first.info

    @property
    def smoke(self) -> bool:
        return self.runs.smoke

    def point_row(self, point: GridPoint) -> dict[str, Any]:
        return self.frame.iloc[self.runs.points.index(point)].to_dict()


def folder_name(model: str, dataset: str, *, limit: int | None, no_hard: bool, precision: str,
                smoke: bool, grid_tag: str = "") -> str:
    """``<model>-<dataset>``, then what makes the images or numbers differ from a full run:
    ``-nohard``, ``-bf16``, ``-first500``, a grid other than the default (``-grid<hash>``,
    ``ProtocolGrid.tag``), ``-smoke``."""
    name = f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', model)}-{dataset}"
    if no_hard:
        name += "-nohard"
    if precision != "fp32":
        name += f"-{precision}"
    if limit:
        name += f"-first{limit}"
    if grid_tag:
        name += f"-{grid_tag}"
    return name + ("-smoke" if smoke else "")


@dataclass(frozen=True)
class StudyKey:
    """What names a study's folder: the model, the dataset and what makes its images or
    numbers differ from a full run."""

    model: str
    dataset: str
    limit: int | None = None
    no_hard: bool = False
    precision: str = "fp32"
    smoke: bool = False
    grid_tag: str = ""  # ProtocolGrid.tag(): a non-default grid's study has its own folder

    def folder(self, output: Path, dataset: str | None = None) -> Path:
        """This study's folder under ``output`` (or the same study on ``dataset``)."""
        return Path(output) / folder_name(self.model, dataset or self.dataset, limit=self.limit,
                                          no_hard=self.no_hard, precision=self.precision,
                                          smoke=self.smoke, grid_tag=self.grid_tag)


def published_lost(published: pd.DataFrame, model: str, registers: int,
                   test_time_registers: int, dataset: str) -> list[dict[str, Any]]:
    """LOST figures published for ``model`` (its register variant) on ``dataset``: the papers
    name the backbone without registers (``compare_with``) and say which variant they ran."""
    if published.empty:
        return []
    base = re.sub(r"_reg\d+", "", base_model_name(model))
    variant = variant_of(registers, test_time_registers)
    chosen = published[(published["method"].map(method_key) == "lost")
                       & (published["compare_with"] == base)
                       & (published["dataset"] == dataset)
                       & (published["variant"] == variant) & published["corloc"].notna()]
    return chosen.to_dict("records")


def published_for(published: pd.DataFrame, runs: GridRuns) -> list[dict[str, Any]]:
    info = runs.first.info
    return published_lost(published, info.model, info.num_registers, info.test_time_registers,
                          info.dataset)


def published_positions(frame: pd.DataFrame, published: Sequence[dict[str, Any]]
                        ) -> pd.DataFrame:
    """Where each published figure falls in the grid: how many points score above it, how many
    points' 95% intervals hold it, and the closest point."""
    rows = []
    for record in published:
        value = float(record["corloc"])
        closest = frame.iloc[int((frame["corloc"] - value).abs().to_numpy().argmin())]
        rows.append({"paper": record["paper"], "variant": record["variant"], "corloc": value,
                     "protocol": record["protocol"], "verified": record["verified"],
                     "points_above": int((frame["corloc"] > value).sum()),
                     "points_within_ci": len(within_ci(frame, value)),
                     "n_points": len(frame), "closest": points_of(closest.to_frame().T)[0].label(),
                     "closest_corloc": float(closest["corloc"])})
    return pd.DataFrame(rows)


def within_ci(frame: pd.DataFrame, value: float) -> pd.DataFrame:
    """Points whose 95% interval holds ``value``, closest CorLoc first (ties: grid order)."""
    inside = frame[(frame["ci_low"] <= value) & (value <= frame["ci_high"])].copy()
    inside["distance"] = (inside["corloc"] - value).abs()
    return inside.sort_values("distance", kind="stable")


def _cross(runs: GridRuns, source: Path) -> CrossDataset:
    """Choose on another dataset's ``protocol.csv`` (checked), score on these images."""
    other = read_protocol_csv(source)
    info = runs.first.info
    if other["model"].iloc[0] != info.model:
        raise LostregError(f"{source}: a protocol of {other['model'].iloc[0]}, not {info.model}")
    if other["dataset"].iloc[0] == info.dataset:
        raise LostregError(f"{source}: the same dataset ({info.dataset}); selection on another "
                           "dataset needs another dataset's protocol")
    if bool(other["smoke"].iloc[0]) != runs.smoke:
        raise LostregError(f"{source}: smoke and real protocols cannot select for each other")
    exact = 100.0 * other["n_hits"] / other["n_images"]  # the CSV's corloc is rounded
    scores = dict(zip(points_of(other), exact, strict=True))
    common = [p for p in runs.points if p in scores]
    if not common:
        raise LostregError(f"{source}: no grid point in common with this protocol")
    columns = [runs.points.index(p) for p in common]
    choice = cross_dataset(np.array([scores[p] for p in common]), runs.hits[:, columns])
    return CrossDataset(str(other["dataset"].iloc[0]), source, common, choice)


def selection_sources(output: Path, key: StudyKey, select_on: Sequence[str] | None
                      ) -> list[Path]:
    """``protocol.csv`` of each dataset to select on: ``None`` (auto) takes every other
    dataset whose study of this model (same image options) exists under ``output``; a list
    names them, and each must exist (checked before any run starts)."""
    if select_on is None:
        found = [key.folder(output, d) / "protocol.csv" for d in DATASETS if d != key.dataset]
        return [path for path in found if path.is_file()]
    paths = []
    for dataset in select_on:
        if dataset == key.dataset:
            raise LostregError(f"--select-on {dataset}: that is this protocol's own dataset")
        path = key.folder(output, dataset) / "protocol.csv"
        if not path.is_file():
            raise LostregError(f"--select-on {dataset}: {path} not found (run python -m "
                               f"lostreg.reports.protocol --model {key.model} --dataset {dataset} with "
                               "the same options first)")
        paths.append(path)
    return paths


def build_study(run_dirs: Sequence[Path], grid: ProtocolGrid, *, runs_dir: Path,
                default_feature: str, select_on: Sequence[Path] = (),
                published: str | Path | None = None, n_splits: int = DEFAULT_SPLITS,
                split_seed: int = DEFAULT_SPLIT_SEED) -> Study:
    """Read the grid's runs and compute every figure the study reports; ``select_on``: other
    datasets' ``protocol.csv`` to choose a setting on (``selection_sources``)."""
    runs = load_grid_runs(run_dirs, grid)
    frame = protocol_frame(runs, grid.k_patches)
    cross = [_cross(runs, Path(path)) for path in select_on]
    reference = GridPoint(DEFAULT_POS_INTERP, "none", default_feature, -1, 0.0)
    return Study(grid, runs, frame, best_of_grid(runs.hits),
                 split_half(runs.hits, n_splits, split_seed), cross,
                 published_for(load_published(published), runs),
                 reference if reference in runs.points else None, Path(runs_dir))


# --- files ---------------------------------------------------------------------------------


def frame_title(frame: pd.DataFrame) -> str:
    first = frame.iloc[0]
    return (f"LOST protocol grid: {first['model']} on {first['dataset']} {first['split']} "
            f"({first['n_images']} images)")


@dataclass(frozen=True)
class HeldOut:
    """The split-half estimate of the best-of-grid score (for figures): mean, sd, splits."""

    mean: float
    sd: float
    n_splits: int

    def note(self, best: float) -> str:
        return (f"best of grid {best:.1f} in-sample; chosen on half the images and scored on "
                f"the other half: {self.mean:.1f} ± {self.sd:.1f} ({self.n_splits} splits)")


def read_held_out(path: str | Path) -> HeldOut:
    """The split-half figures of a ``selection.json``, type-checked."""
    data = read_json_object(path)
    split = Fields(Fields(data, str(path)).mapping("split_half"), f"{path} (split_half)")
    held = Fields(split.mapping("held_out"), f"{path} (split_half.held_out)")
    return HeldOut(held.number("mean"), held.number("sd"), split.integer("n_splits", minimum=1))


def draw_figures(frame: pd.DataFrame, published: Sequence[dict[str, Any]] = (),
                 reference: GridPoint | None = None, held_out: HeldOut | None = None
                 ) -> dict[str, Any]:
    """Every figure of a study from its ``protocol.csv`` rows, by file name: a heatmap per
    normalisation (and interpolation), the bias curves, the ranked points with the published
    figures. The best point is the first of the highest CorLoc in grid order."""
    title, smoke = frame_title(frame), bool(frame["smoke"].iloc[0])
    best_row = int(frame["corloc"].to_numpy().argmax())
    best = points_of(frame)[best_row]
    best_corloc = float(frame["corloc"].iloc[best_row])
    note = (held_out.note(best_corloc) if held_out is not None
            else f"best of grid {best_corloc:.1f}: chosen on these images (in-sample)")
    value_range = (float(frame["corloc"].min()), float(frame["corloc"].max()))
    if value_range[1] - value_range[0] < 1.0:
        value_range = (value_range[0] - 0.5, value_range[1] + 0.5)
    drawn: dict[str, Any] = {}
    several_pos = frame["pos_interp"].nunique() > 1
    for pos_interp in dict.fromkeys(frame["pos_interp"]):
        part = frame[frame["pos_interp"] == pos_interp]
        suffix = f"_{pos_interp}" if several_pos else ""
        where = f"{title}, pos {pos_interp}" if several_pos else title
        for normalize in dict.fromkeys(part["normalize"]):
            drawn[f"heatmap_{normalize}{suffix}.png"] = figures.heatmap_figure(
                part, normalize, where, smoke, best if best.pos_interp == pos_interp else None,
                value_range, note)
        drawn[f"bias_curves{suffix}.png"] = figures.bias_figure(part, where, smoke)
    marks = [figures.PublishedMark(f"{row['paper']} ({VARIANT_LABELS[row['variant']]})",
                                   float(row["corloc"])) for row in published]
    what = ("every setting, and the published figures" if marks else
            "every setting (no published figure for this backbone and dataset)")
    drawn["positions.png"] = figures.positions_figure(
        frame, f"{title}: {what}", smoke, marks, reference,
        held_out.mean if held_out is not None else None)
    return drawn


def study_figures(study: Study) -> dict[str, Any]:
    """Every figure of the study by file name (see ``draw_figures``)."""
    held = study.split.summary()["held_out"]
    return draw_figures(study.frame, study.published, study.reference,
                        HeldOut(held.mean, held.sd, study.split.n_splits))

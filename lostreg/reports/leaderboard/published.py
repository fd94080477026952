"""Published figures (``lostreg/reports/leaderboard/published_corloc.csv``), checked and grouped.

Each row is one figure of one paper: a backbone (``compare_with`` names our model of it) with or
without trained registers (``with_registers``) or with a test-time register
(``test_time_registers``), on one dataset, with the paper's evaluation ``protocol`` in words,
how far the figure was checked (``verified``: primary = read in the authors' paper or
repository, secondary = agreeing public transcriptions, unverified = see ``note``) and its
``source``. Figures are only ever grouped within one paper and one protocol, so an "a -> b"
published cell never joins two protocols.

``metric`` says which figures a row holds, as the leaderboard's columns do: ``corloc`` rows fill
``corloc``; ``saliency`` rows (masks on ECSSD, DUTS-TE, DUT-OMRON) fill ``acc``, ``iou`` and
``max_f`` and name the ``definition`` that made them (``lostreg.evaluation.saliency``:
``tokencut``, ``move`` or ``found``; the codes disagree, so a figure without its definition
could not be placed beside ours) and the post-processing (``refine``: ``none``, ``bilateral``
= TokenCut's soft solver output scored, ``bilateral-binary``). The columns after ``note`` came
with the saliency rows; a file of the earlier schema (CorLoc only) still reads, as CorLoc rows.
``load_published`` gives the CorLoc rows (the CorLoc comparison and the protocol study read
them as before), ``load_published_saliency`` the saliency rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.evaluation.saliency import DEFINITIONS as SALIENCY_DEFINITIONS
from lostreg.fields import shown
from lostreg.reports.cells import read_cells

# shipped inside the package (package data), so an installed wheel shows the published figures
DEFAULT_PUBLISHED = Path(__file__).resolve().with_name("published_corloc.csv")
# the schema before the saliency rows: a file with only these columns is read as CorLoc rows
CORLOC_COLUMNS = ["paper", "method", "family", "backbone", "compare_with", "with_registers",
                  "test_time_registers", "dataset", "corloc", "source", "protocol", "verified",
                  "note"]
PUBLISHED_COLUMNS = [*CORLOC_COLUMNS, "metric", "definition", "refine", "acc", "iou", "max_f"]
REQUIRED_TEXT = ("paper", "method", "family", "backbone", "compare_with", "dataset", "source",
                 "protocol")
VERIFIED_LEVELS = ("primary", "secondary", "unverified")
# which figure columns each metric fills (the leaderboard's columns of the same names)
METRIC_FIGURES = {"corloc": ("corloc",), "saliency": ("acc", "iou", "max_f")}
FIGURE_COLUMNS = ("corloc", "acc", "iou", "max_f")
# post-processing of a mask (``lostreg.run --refine``); empty means none
REFINES = ("none", "bilateral", "bilateral-binary")
# register variants, in the order the comparison lists them ("none" is the baseline)
VARIANTS = ("none", "trained", "test-time", "trained+test-time")
VARIANT_LABELS = {"none": "no registers", "trained": "trained registers",
                  "test-time": "test-time register", "trained+test-time": "trained + test-time"}


def method_key(name: str) -> str:
    """A method's registry name from its printed name: ``DINO-seg`` -> ``dinoseg``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def variant_of(num_registers: int, test_time_registers: int) -> str:
    """Which register variant a model is: trained registers, a test-time one, both or none."""
    if num_registers > 0 and test_time_registers > 0:
        return "trained+test-time"
    if num_registers > 0:
        return "trained"
    return "test-time" if test_time_registers > 0 else "none"


def _check_rows(frame: pd.DataFrame, path: Path) -> None:
    """One line naming the row and column for any bad cell (row numbers as in a spreadsheet)."""
    for index, record in frame.iterrows():
        where = f"{path}: row {int(index) + 2}"
        for column in REQUIRED_TEXT:
            if not record[column].strip():
                raise LostregError(f"{where}: '{column}' is empty")
        if record["with_registers"].lower() not in ("true", "false"):
            raise LostregError(f"{where}: with_registers must be true or false, not "
                               f"{shown(record['with_registers'])}")
        if not re.fullmatch(r"\d{1,3}", record["test_time_registers"]):
            raise LostregError(f"{where}: test_time_registers must be a whole number from 0 to "
                               f"999, not {shown(record['test_time_registers'])}")
        if record["verified"] not in VERIFIED_LEVELS:
            raise LostregError(f"{where}: verified must be one of {', '.join(VERIFIED_LEVELS)}, "
                               f"not {shown(record['verified'])}")
        _check_metric(record, where)


def _check_metric(record: pd.Series, where: str) -> None:
    """A row's metric, definition and refine name known things, and it fills only the figure
    columns of its metric (a saliency figure in ``corloc`` would be read as a CorLoc)."""
    metric = record["metric"]
    if metric not in METRIC_FIGURES:
        raise LostregError(f"{where}: metric must be one of {', '.join(METRIC_FIGURES)}, not "
                           f"{shown(metric)}")
    for column in FIGURE_COLUMNS:
        if column not in METRIC_FIGURES[metric] and record[column].strip():
            raise LostregError(f"{where}: a {metric} row leaves {column} empty (its figures go "
                               f"in {', '.join(METRIC_FIGURES[metric])}), not "
                               f"{shown(record[column])}")
    definitions = SALIENCY_DEFINITIONS if metric == "saliency" else ("",)
    if record["definition"] not in definitions:
        expected = ", ".join(definitions) if metric == "saliency" else "empty"
        raise LostregError(f"{where}: definition of a {metric} row must be {expected}, not "
                           f"{shown(record['definition'])}")
    if record["refine"] not in ("", *REFINES):
        raise LostregError(f"{where}: refine must be empty or one of {', '.join(REFINES)}, not "
                           f"{shown(record['refine'])}")


def read_published(path: str | Path | None = None) -> pd.DataFrame:
    """Every published figure of the file (CorLoc and saliency rows), checked; empty if the
    default file is absent (an installed package without the repository). Empty figure cells
    are figures we do not cite. A file of the earlier schema (no ``metric`` column) is read as
    CorLoc rows."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PUBLISHED
    if not path.is_file():
        if explicit:
            raise LostregError(f"{path}: published figures file not found")
        return pd.DataFrame(columns=[*PUBLISHED_COLUMNS, "variant"])
    try:
        frame = read_cells(path, CORLOC_COLUMNS)
    except LostregError:
        read_cells(path, PUBLISHED_COLUMNS)  # the line names today's schema (empty file...)
        raise
    if not any(column in frame.columns for column in PUBLISHED_COLUMNS[len(CORLOC_COLUMNS):]):
        frame = frame.assign(metric="corloc", definition="", refine="", acc="", iou="", max_f="")
    missing = [column for column in PUBLISHED_COLUMNS if column not in frame.columns]
    if missing:
        raise LostregError(f"{path}: missing column(s) {', '.join(missing)}")
    frame = frame[PUBLISHED_COLUMNS].copy()
    _check_rows(frame, path)
    for column in FIGURE_COLUMNS:
        values = pd.to_numeric(frame[column].replace("", np.nan), errors="coerce")
        bad = (frame[column].ne("") & values.isna()) | values.lt(0) | values.gt(100)
        if bad.any():
            raise LostregError(f"{path}: row {int(bad.idxmax()) + 2}: {column} "
                               f"{shown(frame[column][bad].iloc[0])} is not a number in [0, 100]")
        frame[column] = values.astype(float)
    frame["refine"] = frame["refine"].replace("", "none")
    frame["with_registers"] = frame["with_registers"].str.lower().eq("true")
    frame["test_time_registers"] = frame["test_time_registers"].astype(int)
    frame["variant"] = [variant_of(int(reg), ttr) for reg, ttr in
                        zip(frame["with_registers"], frame["test_time_registers"], strict=True)]
    _check_duplicates(frame, path)
    return frame


def _check_duplicates(frame: pd.DataFrame, path: Path) -> None:
    """One figure per paper, backbone variant, dataset and protocol (a saliency figure also
    per method, refine and definition: TokenCut with and without the solver are two rows)."""
    key = ["paper", "compare_with", "variant", "dataset", "protocol"]
    for metric, extra in (("corloc", []), ("saliency", ["method", "refine", "definition"])):
        rows = frame[frame["metric"] == metric]
        duplicated = rows.duplicated(key + extra)
        if duplicated.any():
            row = rows[duplicated].iloc[0]
            what = (f" ({row['method']}, refine {row['refine']}, {row['definition']} "
                    "definition)" if extra else "")
            raise LostregError(f"{path}: {row['paper']} gives {row['compare_with']} "
                               f"({row['variant']}) on {row['dataset']}{what} twice")


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """Published CorLoc figures, checked (the whole file is); empty if the default file is
    absent. Empty ``corloc`` cells are figures we do not cite."""
    frame = read_published(path)
    return frame[frame["metric"] == "corloc"].reset_index(drop=True)


def load_published_saliency(path: str | Path | None = None) -> pd.DataFrame:
    """Published saliency figures (Acc, IoU, maxF in percent, each row with its definition and
    refine), checked (the whole file is)."""
    frame = read_published(path)
    return frame[frame["metric"] == "saliency"].reset_index(drop=True)


def published_groups(published: pd.DataFrame) -> list[dict[str, Any]]:
    """Each paper's figures for one backbone, protocol and dataset: ``{variant: corloc}``.

    Keyed by paper *and* protocol, so a baseline is only ever paired with a variant measured
    the same way; file order is kept.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for record in published.to_dict("records"):
        key = (record["paper"], record["backbone"], record["compare_with"], record["protocol"],
               record["dataset"])
        group = groups.setdefault(key, {
            "paper": record["paper"], "method": method_key(record["method"]),
            "method_title": record["method"], "family": record["family"],
            "backbone": record["backbone"], "model": record["compare_with"],
            "dataset": record["dataset"], "protocol": record["protocol"],
            "citation": record["source"], "verified": record["verified"],
            "note": record["note"], "values": {}})
        group["values"][record["variant"]] = record["corloc"]
        if VERIFIED_LEVELS.index(record["verified"]) > VERIFIED_LEVELS.index(group["verified"]):
            group["verified"] = record["verified"]  # a group is as checked as its weakest cell
    return list(groups.values())

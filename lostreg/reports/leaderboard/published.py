"""Published CorLoc figures (``lostreg/reports/leaderboard/published_corloc.csv``), checked and grouped.

Each row is one figure of one paper: a backbone (``compare_with`` names our model of it) with or
without trained registers (``with_registers``) or with a test-time register
(``test_time_registers``), on one dataset, with the paper's evaluation ``protocol`` in words,
how far the figure was checked (``verified``: primary = read in the authors' paper or
repository, secondary = agreeing public transcriptions, unverified = see ``note``) and its
``source``. Figures are only ever grouped within one paper and one protocol, so an "a -> b"
published cell never joins two protocols.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.errors import LostregError
from lostreg.fields import shown
from lostreg.reports.cells import read_cells

# shipped inside the package (package data), so an installed wheel shows the published figures
DEFAULT_PUBLISHED = Path(__file__).resolve().with_name("published_corloc.csv")
PUBLISHED_COLUMNS = ["paper", "method", "family", "backbone", "compare_with", "with_registers",
                     "test_time_registers", "dataset", "corloc", "source", "protocol", "verified",
                     "note"]
REQUIRED_TEXT = ("paper", "method", "family", "backbone", "compare_with", "dataset", "source",
                 "protocol")
VERIFIED_LEVELS = ("primary", "secondary", "unverified")
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


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """Published CorLoc figures, checked; empty if the default file is absent (an installed
    package without the repository). Empty ``corloc`` cells are figures we do not cite."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PUBLISHED
    if not path.is_file():
        if explicit:
            raise LostregError(f"{path}: published figures file not found")
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    frame = read_cells(path, PUBLISHED_COLUMNS)[PUBLISHED_COLUMNS].copy()
    _check_rows(frame, path)
    values = pd.to_numeric(frame["corloc"].replace("", np.nan), errors="coerce")
    bad = (frame["corloc"].ne("") & values.isna()) | values.lt(0) | values.gt(100)
    if bad.any():
        raise LostregError(f"{path}: row {int(bad.idxmax()) + 2}: corloc "
                           f"{shown(frame['corloc'][bad].iloc[0])} is not a number in [0, 100]")
    frame["corloc"] = values.astype(float)
    frame["with_registers"] = frame["with_registers"].str.lower().eq("true")
    frame["test_time_registers"] = frame["test_time_registers"].astype(int)
    frame["variant"] = [variant_of(int(reg), ttr) for reg, ttr in
                        zip(frame["with_registers"], frame["test_time_registers"], strict=True)]
    key = ["paper", "compare_with", "variant", "dataset", "protocol"]
    duplicated = frame.duplicated(key)
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise LostregError(f"{path}: {row['paper']} gives {row['compare_with']} "
                           f"({row['variant']}) on {row['dataset']} twice")
    return frame


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

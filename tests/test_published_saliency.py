"""Issue 19 item 5: the published saliency anchors in the published-figures CSV.

The figures are typed here a second time, by hand, from the issue's table (Acc / IoU / maxF,
DINO ViT-S/16), so a slip in either place fails; the TokenCut rows were also checked against the
TokenCut README (stored version 0389ba0c), the LOST rows could not be. The CorLoc rows must read
exactly as before the schema grew (a file of the old schema gives the same frame), and a bad
saliency cell is one line naming the row.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lostreg.errors import LostregError
from lostreg.reports.leaderboard.published import (
    CORLOC_COLUMNS,
    DEFAULT_PUBLISHED,
    load_published,
    load_published_saliency,
    read_published,
)

# (paper, method, refine, definition) -> dataset -> (Acc, IoU, maxF), as the issue prints them
ISSUE_TABLE = {
    ("tokencut", "TokenCut", "none", "tokencut"): {
        "dut_omron": (88.0, 53.3, 60.0), "duts_te": (90.3, 57.6, 67.2),
        "ecssd": (91.8, 71.2, 80.3)},
    ("tokencut", "TokenCut", "bilateral", "tokencut"): {
        "dut_omron": (89.7, 61.8, 69.7), "duts_te": (91.4, 62.4, 75.5),
        "ecssd": (93.4, 77.2, 87.4)},
    ("found", "LOST", "none", "found"): {
        "dut_omron": (79.7, 41.0, 47.3), "duts_te": (87.1, 51.8, 61.1),
        "ecssd": (89.5, 65.4, 75.8)},
    ("found", "LOST", "bilateral", "found"): {
        "dut_omron": (81.8, 48.9, 57.8), "duts_te": (88.7, 57.2, 69.7),
        "ecssd": (91.6, 72.3, 83.7)},
}


def test_every_anchor_of_the_issue_table_is_there_with_its_definition() -> None:
    rows = load_published_saliency()
    assert len(rows) == 12 and rows["corloc"].isna().all()
    assert set(rows["compare_with"]) == {"dino_vits16"} and not rows["with_registers"].any()
    for (paper, method, refine, definition), cells in ISSUE_TABLE.items():
        for dataset, (acc, iou, max_f) in cells.items():
            match = rows[(rows["paper"] == paper) & (rows["method"] == method)
                         & (rows["refine"] == refine) & (rows["dataset"] == dataset)]
            assert len(match) == 1, (paper, method, refine, dataset)
            row = match.iloc[0]
            assert (row["acc"], row["iou"], row["max_f"]) == (acc, iou, max_f)
            assert row["definition"] == definition
    tokencut = rows[rows["paper"] == "tokencut"]
    assert (tokencut["verified"] == "primary").all()
    assert tokencut["note"].str.contains("0389ba0cce3e6205b02fab5fe1db93bb0e370a70").all()
    assert tokencut["note"].str.contains("'62,4'").sum() == 1  # the README's typo, one cell
    lost = rows[rows["paper"] == "found"]
    assert (lost["verified"] == "unverified").all()
    assert lost["note"].str.startswith("Unverified: taken from the issue text").all()
    assert lost["note"].str.contains("effective beta\\^2 of 0.09").all()
    assert lost["note"].str.contains("TokenCut's definition would apply").all()
    solver = rows[rows["refine"] == "bilateral"]
    assert solver["protocol"].str.contains("soft output scored").all()


def _old_schema(tmp_path: Path) -> Path:
    """The CSV as it was before the saliency rows: its first 13 columns, CorLoc rows only."""
    frame = pd.read_csv(DEFAULT_PUBLISHED, dtype=str, keep_default_na=False)
    path = tmp_path / "old.csv"
    frame[frame["metric"] == "corloc"][CORLOC_COLUMNS].to_csv(path, index=False)
    return path


def test_the_corloc_rows_read_as_before_and_an_old_file_still_reads(tmp_path: Path) -> None:
    new, old = load_published(), load_published(_old_schema(tmp_path))
    columns = [*CORLOC_COLUMNS, "variant"]
    pd.testing.assert_frame_equal(new[columns], old[columns])
    assert (new["metric"] == "corloc").all() and new[["acc", "iou", "max_f"]].isna().all().all()
    assert len(read_published()) == len(new) + 12
    # every earlier line of the file is kept as it was: the new cells are appended after it
    lines = DEFAULT_PUBLISHED.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith(",".join(CORLOC_COLUMNS) + ",metric,")
    assert sum(line.endswith(",corloc,,,,,") for line in lines) == len(new)


@pytest.mark.parametrize(("row", "column", "value", "message"), [
    ("saliency", "metric", "miou", "metric must be one of corloc, saliency, not 'miou'"),
    ("saliency", "corloc", "61.9", "a saliency row leaves corloc empty (its figures go in acc, "
                                   "iou, max_f), not '61.9'"),
    ("corloc", "iou", "50", "a corloc row leaves iou empty"),
    ("saliency", "definition", "selfmask", "definition of a saliency row must be tokencut, move, "
                                           "found, not 'selfmask'"),
    ("corloc", "definition", "tokencut", "definition of a corloc row must be empty"),
    ("saliency", "refine", "crf", "refine must be empty or one of none, bilateral, "
                                  "bilateral-binary, not 'crf'"),
    ("saliency", "max_f", "101", "max_f '101' is not a number in [0, 100]"),
    ("saliency", "acc", "high", "acc 'high' is not a number in [0, 100]"),
])
def test_a_bad_saliency_cell_is_one_line_naming_its_row(tmp_path: Path, row: str, column: str,
                                                        value: str, message: str) -> None:
    frame = pd.read_csv(DEFAULT_PUBLISHED, dtype=str, keep_default_na=False)
    index = int(frame.index[frame["metric"] == row][0])
    frame.loc[index, column] = value
    path = tmp_path / "published.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(LostregError) as caught:
        read_published(path)
    assert str(caught.value).startswith(f"{path}: row {index + 2}: ")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_repeated_anchor_or_a_half_new_schema_is_one_line(tmp_path: Path) -> None:
    frame = pd.read_csv(DEFAULT_PUBLISHED, dtype=str, keep_default_na=False)
    saliency = frame[frame["metric"] == "saliency"]
    path = tmp_path / "published.csv"
    pd.concat([frame, saliency.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(LostregError, match="tokencut gives dino_vits16 \\(none\\) on ecssd "
                                           "\\(TokenCut, refine none, tokencut definition\\) "
                                           "twice"):
        read_published(path)
    # the same figure with and without the solver are two anchors, not a repeat
    key = ["paper", "dataset", "method", "definition"]
    assert len(saliency.drop_duplicates(key)) == 6
    assert len(saliency.drop_duplicates([*key, "refine"])) == 12
    frame.drop(columns=["refine"]).to_csv(path, index=False)
    with pytest.raises(LostregError, match="missing column\\(s\\) refine"):
        read_published(path)

"""``protocol.csv`` read back (another dataset's, for cross-dataset selection) is checked cell by
cell (issue 20, row 18: a feature ``zz`` was accepted and its point silently dropped out of the
selection; row 10: an empty file was an ``EmptyDataError`` traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_protocol_selection import table

from lostreg.errors import LostregError
from lostreg.reports.protocol.table import PROTOCOL_COLUMNS, protocol_csv, read_protocol_csv


def _write(tmp_path: Path, **columns) -> Path:
    path = tmp_path / "protocol.csv"
    path.write_text(table().assign(**columns).to_csv(index=False))
    return path


@pytest.mark.parametrize(("column", "values", "says"), [
    ("feature", ["k", "zz", "k"], "'zz' is not one of q, k, v"),
    ("feature", ["k", "attn", "k"], "'attn' is not one of"),  # LOST never reads attention
    ("feature", ["k", "K", "k"], "'K' is not one of"),
    ("pos_interp", ["original", "bicubic", "original"], "'bicubic' is not one of original, timm"),
    ("dataset", ["voc99"] * 3, "'voc99' is not one of"),
    ("normalize", ["l2", "", "l2"], "'' is not one of none, l2"),
    ("k_patches", [100, 0, 100], "'0' is not a whole number >= 1"),
    ("registers", [0, -1, 0], "'-1' is not a whole number >= 0"),
    ("layer", ["-1", "1.5", "-1"], "'1.5' is not a whole number"),
    ("layer", ["-1", "99999999999999999999", "-1"], "is not a whole number"),
    ("n_images", [4, 0, 4], "'0' is not a whole number >= 1"),
    ("gram_bias", [0.0, "inf", -0.2], "'inf' is not a finite number"),
    ("gram_bias", [0.0, "nan", -0.2], "'nan' is not a finite number"),
    ("ci_high", [100.0, 140.0, 100.0], "'140.0' is not a finite number from 0 to 100"),
    ("ci_low", [0.0, -5.0, 0.0], "'-5.0' is not a finite number from 0 to 100"),
    ("run_id", ["run0", " ", "run2"], "' ' is not a non-empty text"),
    ("split", ["", "", ""], "'' is not a non-empty text"),
])
def test_a_bad_cell_is_one_line_naming_file_row_and_column(tmp_path: Path, column: str,
                                                           values: list, says: str) -> None:
    path = _write(tmp_path, **{column: values})
    with pytest.raises(LostregError) as info:
        read_protocol_csv(path)
    row = 2 if len(set(map(str, values))) == 1 else 3
    assert str(info.value).startswith(f"{path}: row {row}, column '{column}': ")
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_good_table_still_reads(tmp_path: Path) -> None:
    frame = read_protocol_csv(_write(tmp_path, feature=["k", "q", "v"]))
    assert frame["feature"].tolist() == ["k", "q", "v"]


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_an_empty_protocol_csv_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "protocol.csv"
    path.write_text(text)
    with pytest.raises(LostregError, match="empty file") as info:
        read_protocol_csv(path)
    assert str(info.value) == (f"{path}: empty file (expected a header line with the columns "
                               f"{', '.join(PROTOCOL_COLUMNS)})")


def test_a_column_given_twice_is_one_line(tmp_path: Path) -> None:
    """Two ``feature`` columns: pandas kept the first and renamed the second ``feature.1``, so
    the table read without a word whichever the author meant; a trailing comma's unnamed
    columns may still repeat."""
    path = tmp_path / "protocol.csv"
    frame = table()
    frame.insert(len(frame.columns), "feature", ["v", "v", "v"], allow_duplicates=True)
    path.write_text(frame.to_csv(index=False))
    with pytest.raises(LostregError) as info:
        read_protocol_csv(path)
    assert str(info.value) == (f"{path}: header: column 'feature' is given twice (which one "
                               "holds the values?)")
    lines = table().to_csv(index=False).splitlines()
    path.write_text("".join(line + ",,\n" for line in lines))
    assert read_protocol_csv(path)["feature"].tolist() == table()["feature"].tolist()


def test_a_column_given_twice_is_refused_before_the_file_is_parsed(tmp_path: Path) -> None:
    """The header is read first: a repeated column is named even when a later row would not
    parse (one field too many), so pandas never reads a file already refused."""
    path = tmp_path / "protocol.csv"
    lines = table().to_csv(index=False).splitlines()
    path.write_text(f"{lines[0]},feature\n{lines[1]},v\n{lines[2]},v,extra,extra\n")
    with pytest.raises(LostregError) as info:
        read_protocol_csv(path)
    assert str(info.value) == (f"{path}: header: column 'feature' is given twice (which one "
                               "holds the values?)")
    path.write_text(f"{lines[0]}\n{lines[1]}\n{lines[2]},extra\n")  # without the repeat
    with pytest.raises(LostregError, match="not a readable CSV"):
        read_protocol_csv(path)


def test_a_cell_over_two_lines_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, run_id=["run0", "run\n1", "run2"])
    with pytest.raises(LostregError, match=r"row 3, column 'run_id': 'run\\n1' holds '\\n'"):
        read_protocol_csv(path)


def test_text_that_starts_like_a_formula_is_written_quoted_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "protocol.csv"
    path.write_text(protocol_csv(table().assign(model="=HYPERLINK(1)", run_id=["@a", "+b", "c"])))
    text = path.read_text()
    assert "'=HYPERLINK(1)" in text and "\n'@a," not in text and ",'@a," in text
    frame = read_protocol_csv(path)
    assert set(frame["model"]) == {"=HYPERLINK(1)"} and frame["run_id"].tolist() == [
        "@a", "+b", "c"]
    assert frame["gram_bias"].tolist() == [0.0, -0.1, -0.2]  # negative numbers untouched

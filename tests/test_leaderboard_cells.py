"""Text the leaderboard did not write stays text (issue 20, rows 9 and 10): the published-figures
CSV is checked on read (one line per cell, column types), every cell of ``comparison.md`` is
escaped for markdown, CSV outputs never start a cell with a formula, and an empty published
CSV is one line."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
import pytest
from run_folders import REG, edit_json, pair_hits, write_run

from lostreg.errors import LostregError
from lostreg.fields import read_text_csv
from lostreg.reports import leaderboard as lb
from lostreg.reports.cells import md_cell, neutralise_formulas, restore_formulas
from lostreg.reports.leaderboard.published import DEFAULT_PUBLISHED, PUBLISHED_COLUMNS

HOSTILE = {
    "paper": "lost<img src=x onerror=alert(1)>",
    "backbone": "DINO | ViT-S/16",
    "protocol": "keys | <b>bold</b> & more \\ end",
    "source": '=HYPERLINK("http://evil.example","click")',
    "note": "A <script>alert(1)</script> note | with a pipe.",
}


def _published(tmp_path: Path, **cells: str) -> Path:
    """The shipped published CSV with row 2 (its first figure) given ``cells``."""
    frame = read_text_csv(DEFAULT_PUBLISHED, PUBLISHED_COLUMNS)
    for column, value in cells.items():
        frame.loc[0, column] = value
    path = tmp_path / "published.csv"
    frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL)  # a \r stays inside its cell
    return path


def _runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    base, other = pair_hits(5, 2, 10, 3)
    write_run(runs, "plain", base, model="dino_vits16", timm_name="vit_small_patch16_224.dino",
              family="dino")
    write_run(runs, "reg", other, **REG)
    return runs


def _table_cells(line: str) -> list[str]:
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_published_cells_are_escaped_in_comparison_md(tmp_path: Path) -> None:
    published = _published(tmp_path, **HOSTILE)
    board = lb.collect(_runs(tmp_path), published=published, report=None)
    lb.write_outputs(board, tmp_path / "out")
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "<img" not in markdown and "<script" not in markdown and "<b>" not in markdown
    assert "lost&lt;img src=x onerror=alert(1)&gt;" in markdown
    header = None
    for line in markdown.splitlines():
        if line.startswith("| Backbone |") or line.startswith("| Method |"):
            header = len(_table_cells(line))
        elif line.startswith("|") and not line.startswith("|---"):
            assert len(_table_cells(line)) == header, line  # no cell shifted by a '|'
    (row,) = [line for line in markdown.splitlines()
              if line.startswith("| DINO \\| ViT-S/16 | published")]
    assert "keys \\| &lt;b&gt;bold&lt;/b&gt; &amp; more \\\\ end" in row
    assert "A &lt;script&gt;alert(1)&lt;/script&gt; note \\| with a pipe." in markdown


def test_formula_cells_are_neutralised_in_csv_outputs(tmp_path: Path) -> None:
    """A published citation and run-written text (``device_name`` here) that start like a
    formula are written with a leading quote; numbers (a negative difference) stay numbers."""
    runs = _runs(tmp_path)
    starts = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]
    for name, start in zip(("plain", "reg"), starts, strict=False):
        edit_json(runs / name / "config.json", device_name=start)
    published = _published(tmp_path, source=HOSTILE["source"])
    board = lb.collect(runs, published=published, report=None)
    lb.write_outputs(board, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "leaderboard.csv", keep_default_na=False)
    assert sorted(table["device"]) == sorted("'" + s for s in starts[:2])
    comparison = pd.read_csv(tmp_path / "out" / "comparison.csv", keep_default_na=False)
    citations = set(comparison["citation"])
    assert "'" + HOSTILE["source"] in citations and HOSTILE["source"] not in citations
    assert (pd.to_numeric(comparison["diff"], errors="coerce") < 0).any()  # published -1.7
    frame = pd.DataFrame({"text": starts + ["plain", "'quoted"], "number": range(8)})
    shown = neutralise_formulas(frame)
    assert all(value.startswith("'") for value in shown["text"][:6])
    assert shown["number"].tolist() == list(range(8))
    assert restore_formulas(shown).to_dict() == frame.to_dict()


@pytest.mark.parametrize(("column", "value", "says"), [
    ("note", "first line\nsecond line", "row 2, column 'note': 'first line\\nsecond line' "
                                        "holds '\\n'; one line per cell"),
    ("protocol", "keys\r", "row 2, column 'protocol'"),
    ("paper", "lost\x1b[31m", "row 2, column 'paper'"),
    ("backbone", "a\u2028b", "row 2, column 'backbone'"),
    ("test_time_registers", "99999999999999999999", "test_time_registers must be a whole"),
    ("with_registers", "yes", "with_registers must be true or false"),
    ("corloc", "61.9%", "corloc '61.9%' is not a number in [0, 100]"),
    ("verified", "maybe", "verified must be one of"),
])
def test_a_bad_published_cell_is_one_line_naming_file_row_and_column(
        tmp_path: Path, column: str, value: str, says: str) -> None:
    path = _published(tmp_path, **{column: value})
    with pytest.raises(LostregError) as info:
        lb.load_published(path)
    assert str(info.value).startswith(f"{path}: ") and says in str(info.value)
    assert "\n" not in str(info.value)


def test_a_column_given_twice_in_the_published_csv_is_one_line(tmp_path: Path) -> None:
    """pandas renames a repeated column ``corloc.1`` and the first was read, silently, whichever
    the author meant (the second here holds another figure)."""
    frame = read_text_csv(DEFAULT_PUBLISHED, PUBLISHED_COLUMNS)
    frame.insert(len(frame.columns), "corloc", "12.5", allow_duplicates=True)
    path = tmp_path / "published.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(LostregError) as info:
        lb.load_published(path)
    assert str(info.value) == (f"{path}: header: column 'corloc' is given twice (which one "
                               "holds the values?)")


@pytest.mark.parametrize("text", ["", "\n", "   \n\n"])
def test_an_empty_published_csv_is_one_line(tmp_path: Path, text: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "published.csv"
    path.write_text(text)
    runs = _runs(tmp_path)
    assert lb.main(["--runs", str(runs), "--out", str(tmp_path / "out"),
                    "--published", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {path}: empty file (expected a header line with the columns "
                   f"{', '.join(PUBLISHED_COLUMNS)})")


def test_md_cell_shows_text_as_written() -> None:
    assert md_cell("a|b") == "a\\|b" and md_cell("<i>") == "&lt;i&gt;"
    assert md_cell("x\ny\tz") == "x y z" and md_cell("a & b\\") == "a &amp; b\\\\"
    assert md_cell("dinov2_vits14 → _reg4 [35.3, 55.4] (+20.1) ⚠") == (
        "dinov2_vits14 → _reg4 [35.3, 55.4] (+20.1) ⚠")  # today's text is unchanged

"""What the analyses' outputs must say about an unfinished run, written out by hand (so a test
fails if the wording drifts), and helpers to read it back: from figures, from the files, and
the files of a finished run compared with those of the same run unfinished."""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from figure_checks import drawn_texts

from lostreg.reports.analysis import plots

SMOKE = "SMOKE RUN (random weights): not a result"


def mark(predicted: int, total: int, label: str = "") -> str:
    who = f" {label}" if label else ""
    return (f"UNFINISHED RUN{who}: {predicted} of {total} images predicted when analysed "
            "(no metrics.json yet); not the run's result")


def unfinished_copy(source: Path, root: Path, keep: int | None = None) -> Path:
    """A copy of a finished run folder as a killed run leaves it: no metrics.json and, with
    ``keep``, its first ``keep`` lines and a torn one (no image)."""
    folder = (root / source.name).resolve()
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("analysis"))
    (folder / "metrics.json").unlink()
    if keep is not None:
        lines = (folder / "predictions.jsonl").read_text().splitlines(keepends=True)
        assert len(lines) > keep
        (folder / "predictions.jsonl").write_text("".join(lines[:keep]) + lines[keep][:40])
    return folder


def finished_copy(source: Path, root: Path) -> Path:
    folder = (root / source.name).resolve()
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("analysis"))
    return folder


def kept_figures(monkeypatch) -> list:
    """The figures the analyses save, kept for inspection (a stub file is written)."""
    kept: list = []

    def keep(fig, path, dpi=None):
        kept.append(fig)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(plots, "save_figure", keep)
    return kept


def footer(fig) -> str:
    """The figure's red footer as drawn (wrapped lines joined back), '' when it has none."""
    drawn = {id(text) for text, _ in drawn_texts(fig)}
    label = fig._supxlabel  # the footer finish_figure draws (matplotlib keeps it there)
    if label is None or id(label) not in drawn:
        return ""
    return " ".join(label.get_text().split())


def without_mark_lines(text: str, marks: list[str], blank: bool = True) -> str:
    """A markdown table (or, ``blank=False``, a page) with the one line that holds each of
    ``marks`` removed, and the blank line the table writers put beside a mark."""
    lines = text.split("\n")
    for mark_text in marks:
        found = [i for i, line in enumerate(lines) if mark_text in line]
        assert len(found) == 1, (mark_text, text)
        at = gone = found[0]
        if blank:
            gone = at - 1 if at > 0 and lines[at - 1] == "" else at + 1
            assert lines[gone] == "", (mark_text, text)
        for index in sorted({at, gone}, reverse=True):
            del lines[index]
    return "\n".join(lines)


def without_unfinished(payload):
    """A JSON output with every ``unfinished_run`` record removed (lists of runs included)."""
    if isinstance(payload, list):
        return [without_unfinished(item) for item in payload]
    return {key: value for key, value in payload.items() if key != "unfinished_run"}


def read_json(path: Path):
    return json.loads(path.read_text())


def assert_only_the_mark_differs(analyze: Callable[[list[str]], int], finished: Path,
                                 unfinished: Path, figures: list, expected: str,
                                 attribution_args: Sequence[str] = ()) -> None:
    """``show`` and ``attribution`` of the same run finished and unfinished with every line
    (the same images): the outputs differ only by the unfinished mark (``expected``), so a
    finished run's are what they were. ``figures``: ``kept_figures``' list."""
    footers: list[str] = []
    norms: list[str] = []  # the token maps computed for the first are reused for the second
    for folder in (finished, unfinished):
        figures.clear()  # the panels only (attribution's norms figures are not the run's)
        assert analyze(["show", "--run", str(folder), "--device", "cpu", "--no-progress",
                        "--max-images", "2"]) == 0
        footers += [footer(fig) for fig in figures]
        assert analyze(["attribution", "--run", str(folder), *attribution_args,
                        "--no-progress", "--num-workers", "0", *norms]) == 0
        norms = ["--norms", str(finished / "analysis" / "norms" / "norms.json")]
    assert footers == [SMOKE] * 2 + [f"{SMOKE} {expected}"] * 2

    def text(folder: Path, name: str) -> str:
        written = (folder / "analysis" / name).read_text()
        return written.replace(str(finished), "<run>").replace(str(unfinished), "<run>")

    assert "UNFINISHED" not in text(finished, "attribution.md") + text(finished, "show/index.html")
    assert without_mark_lines(text(unfinished, "attribution.md"), [expected]) \
        == text(finished, "attribution.md")
    assert without_mark_lines(text(unfinished, "show/index.html"), [html.escape(expected)],
                              blank=False) == text(finished, "show/index.html")
    assert "unfinished_run" not in text(finished, "attribution.json")
    assert without_unfinished(json.loads(text(unfinished, "attribution.json"))) \
        == json.loads(text(finished, "attribution.json"))
    for name in ("attribution.csv", "attribution_summary.csv"):
        assert text(unfinished, name) == text(finished, name)

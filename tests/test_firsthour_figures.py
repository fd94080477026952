"""Issue #21 rows 4, 5 and 10: the notebook's figures and tables stay readable at 2 runs and at
200, every figure showing smoke runs says SMOKE, headers name what differs, and a relative
``LOSTREG_RUNS`` is read from the repository.

The figures are the functions the notebook calls (``lostreg.reports.leaderboard.notebook``,
``register_bar_figure``, ``iou_figure``), rendered here with generated run folders; the
checks are ``figure_checks``' (every text inside the canvas, no two texts overlapping) plus a
size bound and the SMOKE mark. Rendered PNGs are written to ``$LOSTREG_FIGURES_OUT`` when set,
to look at them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from figure_checks import SVG, drawn_texts, svg_root, svg_text_problems, text_problems
from matplotlib.patches import Rectangle
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from run_folders import write_run

from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard import notebook as nb
from lostreg.reports.leaderboard.figures import ZERO_MARK
from lostreg.reports.leaderboard.markdown import sources_section

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
MAX_PIXELS = 2000  # no side of a figure beyond this (the size figure was 550 x 4532 px)
REG = {"model": "dinov2_vits14_reg4", "timm_name": "vit_small_patch14_reg4_dinov2.lvd142m",
       "registers": 4}


def generated_runs(root: Path, pairs: int, smoke: bool = True) -> Path:
    """``2 * pairs`` finished runs: a baseline and its register twin per setting (LOST's k and
    Gram bias), on VOC07 and VOC12; the first pair scores 0 without registers."""
    runs = root / "runs"
    for i in range(pairs):
        dataset = ("voc07", "voc12")[i % 2]
        params = {"k_patches": 50 + i, "gram_bias": -0.01 * (i % 7)}
        n = 24
        base = [False] * n if i == 0 else [(j * (i + 3)) % 5 < 2 for j in range(n)]
        other = [(j * (i + 2)) % 4 < 2 for j in range(n)]
        write_run(runs, f"p{i:03d}-base", base, dataset=dataset, method_params=params,
                  smoke=smoke)
        write_run(runs, f"p{i:03d}-reg", other, dataset=dataset, method_params=params,
                  smoke=smoke, **REG)
    return runs


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> lb.Leaderboard:
    return lb.collect(generated_runs(tmp_path_factory.mktemp("many"), 100), include_smoke=True)


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> lb.Leaderboard:
    return lb.collect(generated_runs(tmp_path_factory.mktemp("few"), 1), include_smoke=True)


def check(figure, name: str) -> list:
    """The promises every figure keeps: texts fit, a bounded size, the SMOKE mark."""
    if os.environ.get("LOSTREG_FIGURES_OUT"):
        out = Path(os.environ["LOSTREG_FIGURES_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.png").write_bytes(lb.figure_png(figure))
    texts = drawn_texts(figure)
    problems = text_problems(figure, texts=texts)
    assert not problems, f"{name}: " + "; ".join(problems)
    width, height = figure.bbox.width, figure.bbox.height
    assert width <= MAX_PIXELS and height <= MAX_PIXELS, (name, width, height)
    assert any("SMOKE" in text.get_text() for text, _ in texts), f"{name}: no SMOKE mark"
    return texts


def said(texts: list, words: str) -> bool:
    return any(words in " ".join(text.get_text().split()) for text, _ in texts)


@pytest.mark.parametrize("board_name", ["few", "many"])
def test_the_register_figure_is_readable_and_says_what_it_left_out(board_name, request) -> None:
    board = request.getfixturevalue(board_name)
    texts = check(lb.register_bar_figure(board.comparison), f"register_{board_name}")
    if board_name == "many":  # 50 pairs per dataset, 8 drawn
        assert said(texts, "8 of 50 baselines, the largest effects (42 more in comparison.md)")
    else:
        assert not said(texts, "more in comparison.md")


def test_a_zero_corloc_bar_is_drawn_and_labelled(few) -> None:
    figure = lb.register_bar_figure(few.comparison)
    texts = check(figure, "register_zero")
    stubs = [patch for patch in figure.axes[0].patches
             if isinstance(patch, Rectangle) and abs(patch.get_height() - ZERO_MARK) < 1e-9]
    assert len(stubs) == 1  # the baseline's 0, visible
    assert any(text.get_text() == "0" for text, _ in texts)


@pytest.mark.parametrize("board_name", ["few", "many"])
def test_the_object_size_figure_is_readable_with_any_number_of_runs(board_name,
                                                                    request) -> None:
    board = request.getfixturevalue(board_name)
    labels = nb.run_labels(board.runs)
    images = nb.per_image(board.runs, labels)
    pairs = board.comparison[board.comparison["model_reg"].notna()]
    preferred = [labels[r] for row in pairs.to_dict("records")
                 for r in (row["run_id"], row["run_id_reg"])]
    texts = check(nb.size_figure(images, preferred, smoke=True), f"size_{board_name}")
    if board_name == "many":
        assert said(texts, "8 of 100 runs drawn") and said(texts, "range over all 100 runs")
        legend_entries = sum(len(axis.get_legend().get_texts()) for axis in
                             nb.size_figure(images, preferred, smoke=True).axes)
        assert legend_entries <= 2 * (nb.MAX_LINES + 1)
        drawn = {d: nb.drawn_labels(images, d, preferred) for d in ("voc07", "voc12")}
        tables = nb.corloc_by(images, "size_bin", drawn)
        for dataset, table in tables.items():  # counts, the range, the runs drawn
            assert list(table.columns[5:]) == drawn[dataset]
        assert drawn["voc07"][:2] == preferred[:2]  # the register pairs come first


def test_flip_figures_are_marked_and_headers_name_what_differs(many) -> None:
    runs = {run.run_id: run for run in many.runs}
    pairs = many.comparison[many.comparison["model_reg"].notna()].reset_index(drop=True)
    flips = nb.flips_of(runs, pairs)
    titles = [flip["title"] for flip in flips]
    assert len(set(titles)) == len(titles) == 100  # three pairs used to read the same
    assert "method_params=" in titles[0] and "k_patches" in titles[0]
    shown = nb.most_flipped(flips)
    assert len(shown) == nb.MAX_PAIRS_SHOWN
    flip = next(f for f in shown if not f["gained"].empty)
    check(nb.flip_figure(runs, flip, "miss → hit", flip["gained"].head(6), smoke=True),
          "flip_many")
    counts = nb.flip_counts(flips)
    assert list(counts.columns) == ["pair", "images", "miss → hit", "hit → miss"]


def test_iou_histograms_count_whole_images(few) -> None:
    svg = lb.iou_svg(few.runs[0])
    assert not svg_text_problems(svg)
    y_ticks = [text.text for text in svg_root(svg).iter(f"{SVG}text")
               if text.get("text-anchor") == "end"]  # the y tick labels, right-aligned
    assert y_ticks[0] == "0" and len(y_ticks) >= 2, y_ticks
    assert all(tick.replace(",", "").isdigit() for tick in y_ticks), y_ticks  # whole images


def test_comparison_lists_each_published_source_once(many) -> None:
    lines = sources_section(many.published)
    sources = [line for line in lines if line.startswith("- **")]
    assert len(sources) == len(set(many.published[["paper", "source"]].itertuples(index=False)))
    notes = [line.split(": ", 1)[1] for line in lines if line.startswith("  - Note")]
    sentences = [s for note in notes for s in note.split(". ")]
    assert len(sentences) == len(set(sentences))  # no sentence of a note repeated


# --- row 5: a relative LOSTREG_RUNS ------------------------------------------------------------


def test_a_relative_runs_folder_is_read_from_the_repository(monkeypatch) -> None:
    monkeypatch.setenv("LOSTREG_RUNS", "results/runs")
    assert nb.notebook_folder("LOSTREG_RUNS", "x", start=REPO / "notebooks") == \
        REPO / "results" / "runs"
    monkeypatch.setenv("LOSTREG_RUNS", "/abs/runs")
    assert nb.notebook_folder("LOSTREG_RUNS", "x", start=REPO / "notebooks") == Path("/abs/runs")
    monkeypatch.delenv("LOSTREG_RUNS")
    assert nb.notebook_folder("LOSTREG_RUNS", "results/runs", start=REPO / "notebooks") == \
        REPO / "results" / "runs"


def test_a_missing_runs_folder_is_one_line_naming_what_was_looked_for(monkeypatch,
                                                                      tmp_path) -> None:
    monkeypatch.setenv("LOSTREG_RUNS", "no/such/runs")
    path = nb.notebook_folder("LOSTREG_RUNS", "results/runs", start=REPO / "notebooks")
    with pytest.raises(nb.NotebookStop) as stopped:
        nb.require_folder(path, "LOSTREG_RUNS", "the folder of run folders")
    (line,) = stopped.value._render_traceback_()
    assert line == (f"error: {REPO / 'no/such/runs'}: no such folder (the folder of run "
                    "folders; $LOSTREG_RUNS='no/such/runs', read from the repository root)")


def test_the_notebook_stops_in_one_line_on_a_missing_relative_folder(tmp_path, monkeypatch):
    """The kernel runs in ``notebooks/`` of a checkout (here a copy): a relative
    ``LOSTREG_RUNS`` is read from the checkout's root, and a missing one is one line."""
    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "lostreg").mkdir()
    (checkout / "pyproject.toml").write_text("[project]\nname = 'copy'\n")
    shutil.copy(NOTEBOOK, checkout / "notebooks" / NOTEBOOK.name)
    monkeypatch.setenv("LOSTREG_RUNS", "results/runs")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout's lostreg
    notebook = nbformat.read(checkout / "notebooks" / NOTEBOOK.name, as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(checkout / "notebooks")}})
    with pytest.raises(CellExecutionError):
        client.execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output["output_type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["traceback"] == [
        f"error: {checkout / 'results' / 'runs'}: no such folder (the folder of run folders; "
        "$LOSTREG_RUNS='results/runs', read from the repository root)"]


# --- row 10: the protocol's positions figure, the analysis panels' colour scales --------------


def protocol_frame(smoke: bool = True):
    """A two-point protocol table (``protocol.csv``'s columns), as the notebook reads one."""
    import pandas as pd

    rows = [{"model": "dinov2_vits14", "registers": 0, "test_time_registers": 0,
             "dataset": "demo", "split": "trainval", "pos_interp": "original",
             "normalize": "none", "feature": feature, "layer": -1, "gram_bias": 0.0,
             "k_patches": 100, "n_images": 24, "n_hits": hits, "corloc": 100 * hits / 24,
             "ci_low": 100 * hits / 24 - 10, "ci_high": 100 * hits / 24 + 10,
             "run_id": f"run-{feature}", "smoke": smoke} for feature, hits in (("k", 10), ("q", 6))]
    return pd.DataFrame(rows)


def test_positions_promise_published_figures_only_when_there_are_some() -> None:
    from lostreg.reports.protocol.study import draw_figures

    alone = draw_figures(protocol_frame())["positions.png"]
    texts = check(alone, "positions_alone")
    assert said(texts, "no published figure for this backbone and dataset")
    assert not said(texts, "and the published figures")
    cited = [{"paper": "lost", "variant": "none", "corloc": 50.0}]
    texts = check(draw_figures(protocol_frame(), cited)["positions.png"], "positions_cited")
    assert said(texts, "every setting, and the published figures")


def test_attention_panels_share_one_colour_scale() -> None:
    from types import SimpleNamespace

    import numpy as np

    from lostreg.reports.analysis.report import _map_panels

    maps = SimpleNamespace(degrees=np.ones((2, 3)), norms=np.full((2, 3), 2.0), result=None,
                           prefix_names=["CLS", "reg0", "reg1"],
                           attention=np.stack([np.full((2, 3), 0.9), np.full((2, 3), 0.01),
                                               np.full((2, 3), 0.2)]))
    attention = [panel for panel in _map_panels(maps, "LOST") if "attention" in panel[1]]
    assert len(attention) == 3
    scales = {id(panel[2]) for panel in attention}
    assert len(scales) == 1  # the same Normalize: one colour scale
    assert (attention[0][2].vmin, attention[0][2].vmax) == (0.0, 0.9)
    assert all("one scale for all" in panel[1] for panel in attention)

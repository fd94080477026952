"""``python -m lostreg.leaderboard``: every finished run in one table, register pairs compared.

The leaderboard only *reads* run folders (``config.json``, ``predictions.jsonl``,
``metrics.json``); it never runs a model, so it can be rebuilt at any time and gives the same
files for the same runs (fixed bootstrap seed, deterministic order, no timestamps). A folder it
cannot read is skipped with one line on stderr saying why; the rest is built.

Outputs under ``--out`` (default ``results/``), each written atomically:

- ``leaderboard.csv``: one row per distinct run identity (the newest finished run wins), with
  the method, its parameters and the protocol (feature, layer, normalisation, Gram bias,
  position-embedding interpolation), and a 95% percentile-bootstrap interval over images.
  Random-weight smoke runs are left out unless ``--include-smoke`` (then kept and flagged).
- ``comparison.csv`` / ``comparison.md``: per method, each model without registers beside its
  trained-register twin and its test-time-register variant (same settings), with the exact
  McNemar test and a paired bootstrap interval of the difference; published figures
  (``lostreg/reports/leaderboard/published_corloc.csv``) as rows of their own with their protocol.
- ``figures/corloc_registers.png`` and ``figures/iou/<run_id>.svg``, each redrawn only when
  what it shows changed (``figures/.drawn.json`` records what each was drawn from).
- ``.build.json``: the build record (``record``): when the runs, the options, the published
  figures, the code and every output are as the last build left them, the command writes
  nothing and only says so (``build``).
- Mask runs (saliency, ``saliency.py``): rows of their own in ``leaderboard.csv`` (``acc``,
  ``iou``, ``max_f``), ``comparison_saliency.csv``, the saliency part of ``comparison.md``,
  ``figures/saliency_iou.png``, ``figures/saliency_f_curves.png`` and each mask run's IoU
  histogram in ``figures/saliency_iou/`` (SVG).

Runs are read through their summaries (``lostreg.runs.summaries``: each run's predictions
checked and summarised once per content of its files), so a rebuild reads no prediction line
of a run that did not change. Text from the published CSV and from run files goes through
``lostreg.reports.cells`` (one line per cell, escaped for markdown, no CSV formulas).

``--reread`` builds from the predictions themselves. A summary's checks (its own digest, its
key, its counts against ``metrics.json``) catch damage and stale files, not a forgery: the
digest has no secret, so a summary forged together with ``metrics.json`` passes them. After a
disk problem, on a copied runs folder, or before publishing numbers, ``--reread`` reads and
checks every run's predictions as a first build does (the same code: no stored summary is
looked up), compares each stored summary with what the predictions give, names each that
differs on stderr (damaged, stale, forged; one line each), counts them in the summary line,
rewrites every summary and removes that of a run its files no longer give one for (a run
skipped with its line: a forged ``metrics.json`` disagrees with its predictions); the build
record is not consulted. With honest summaries the outputs are a normal build's, byte for
byte; without the flag nothing of this runs (``benchmarks/bench_leaderboard.py``).

Modules: ``published`` (the reference figures), ``tables`` (leaderboard and comparison rows),
``markdown``, ``figures`` and ``drawing`` (which figures to redraw), ``record`` (when nothing
is to be rebuilt).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lostreg import timeline
from lostreg.cli import HelpFormatter, add_runs_option
from lostreg.errors import LostregError, error_line
from lostreg.io import atomic_write_text
from lostreg.reports.cells import neutralise_formulas
from lostreg.reports.leaderboard import drawing, record
from lostreg.reports.leaderboard.drawing import FigureWriter
from lostreg.reports.leaderboard.figures import (
    figure_png,
    iou_histogram,
    iou_svg,
    register_bar_figure,
)
from lostreg.reports.leaderboard.markdown import comparison_markdown
from lostreg.reports.leaderboard.published import (
    DEFAULT_PUBLISHED,
    PUBLISHED_COLUMNS,
    load_published,
    method_key,
)
from lostreg.reports.leaderboard.saliency import (
    SaliencyBoard,
    collect_saliency,
    pair_count,
    with_mask_rows,
)
from lostreg.reports.leaderboard.saliency_markdown import saliency_markdown
from lostreg.reports.leaderboard.saliency_outputs import write_saliency_outputs
from lostreg.reports.leaderboard.tables import (
    COMPARISON_COLUMNS,
    DATASET_LABELS,
    FAMILY_LABELS,
    LEADERBOARD_COLUMNS,
    SETTING_COLUMNS,
    base_model_name,
    base_timm_name,
    comparison_frame,
    find_pairs,
    leaderboard_frame,
    leaderboard_row,
    method_titles,
    pair_row,
    settings_label,
    single_row,
)
from lostreg.runs.store import (  # the run-folder reader, re-exported for notebooks
    RunData,
    RunInfo,
    ScanResult,
    is_smoke,
    load_run,
    read_predictions,
    scan_runs,
)

# (model short name, dataset) runs that fill the comparison table with public weights
from lostreg.runs.suites import PAPER_DATASETS, PAPER_MODELS, PAPER_SUITE
from lostreg.runs.summaries import RunSummary, scan_summaries

__all__ = [
    "COMPARISON_COLUMNS", "DATASET_LABELS", "DEFAULT_PUBLISHED", "FAMILY_LABELS",
    "LEADERBOARD_COLUMNS", "PAPER_DATASETS", "PAPER_MODELS", "PAPER_SUITE", "PUBLISHED_COLUMNS",
    "SETTING_COLUMNS", "BuildSummary", "Leaderboard", "RunData", "RunInfo", "RunSummary",
    "ScanResult", "base_model_name", "base_timm_name", "build", "build_leaderboard",
    "build_parser", "build_summary", "collect", "comparison_frame",
    "comparison_markdown", "figure_png", "find_pairs", "iou_histogram", "iou_svg", "is_smoke",
    "leaderboard_frame", "leaderboard_row", "load_published", "load_run", "main", "method_key",
    "pair_row", "read_predictions", "register_bar_figure", "scan_runs", "settings_label",
    "single_row", "write_outputs",
]


@dataclass
class Leaderboard:
    """Everything the leaderboard writes, in memory (the notebook uses this directly)."""

    runs: list[RunData]
    table: pd.DataFrame
    comparison: pd.DataFrame
    singles: pd.DataFrame
    published: pd.DataFrame
    skipped: list[str] = field(default_factory=list)  # one line per unreadable run folder
    smoke_excluded: int = 0  # smoke runs left out (no include_smoke)
    unfinished: int = 0  # run folders without metrics.json
    saliency: SaliencyBoard | None = None  # mask runs and the published saliency anchors
    # ``reread``: (stored summaries compared with what the predictions give, those differing)
    reread: tuple[int, int] | None = None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def collect(runs_dir: str | Path, include_smoke: bool = False,
            published: str | Path | None = None,
            report: Callable[[str], None] | None = _stderr,
            reread: bool = False) -> Leaderboard:
    """Read every finished run and compute all tables; each folder that cannot be read is
    reported (one line, ``report``) and left out. Runs are read through their summaries
    (``lostreg.runs.summaries``: computed once per content of a run's files and stored under
    ``<runs>/.summaries``); their predictions are read only if asked for. ``reread``: every
    run's predictions are read and checked as on a first build, each stored summary that
    differs from what they give is named (``report``) and every summary rewritten."""
    scan, store = scan_summaries(runs_dir, include_smoke, report, reread=reread)
    figures = load_published(published)
    comparison, singles = comparison_frame(scan.runs, figures)
    store.save_p_values()  # the pairs' McNemar p-values, for the next build (no SciPy then)
    # the box scan's store: one store per build, so a store that cannot be written is said
    # once and ``--reread`` counts every run in one place
    masks = collect_saliency(runs_dir, include_smoke, published, report, store)
    checked = (store.compared, len(store.differing)) if reread else None
    return Leaderboard(scan.runs, with_mask_rows(leaderboard_frame(scan.runs), masks),
                       comparison, singles, figures, scan.skipped + masks.skipped,
                       scan.smoke_excluded + masks.smoke_excluded, scan.unfinished, masks,
                       checked)


def _csv(frame: pd.DataFrame) -> str:
    """CSV text whose cells a spreadsheet shows as text (``cells.neutralise_formulas``)."""
    return neutralise_formulas(frame).to_csv(index=False, lineterminator="\n")


def write_outputs(board: Leaderboard, out_dir: str | Path) -> list[str]:
    """Write every output atomically; IoU figures of runs no longer listed are removed, and
    figures whose content did not change are kept as they are (``drawing``). Returns every
    output file's name, relative to ``out_dir``."""
    out_dir = Path(out_dir)
    drawn = FigureWriter(out_dir / "figures", (drawing.BOX_HISTOGRAMS, drawing.MASK_HISTOGRAMS))
    atomic_write_text(out_dir / "leaderboard.csv", _csv(board.table))
    comparison = board.comparison.copy()
    for column in comparison.columns:
        if comparison[column].dtype == float and column != "mcnemar_p":
            comparison[column] = comparison[column].round(4)
    atomic_write_text(out_dir / "comparison.csv", _csv(comparison))
    atomic_write_text(out_dir / "comparison.md",
                      comparison_markdown(board) + saliency_markdown(board.saliency))
    drawn.figure("corloc_registers.png", board.comparison.to_csv(index=False),
                 lambda: register_bar_figure(board.comparison))
    drawn.histograms([(run.run_id, iou_histogram(run)) for run in board.runs],
                     drawing.BOX_HISTOGRAMS)
    write_saliency_outputs(board.saliency, out_dir, drawn)
    drawn.close()
    names = ["leaderboard.csv", "comparison.csv", "comparison.md", f"figures/{drawing.MANIFEST}"]
    if board.saliency is not None:
        names.append("comparison_saliency.csv")
    return names + [f"figures/{name}" for name in drawn.new]


def build_leaderboard(runs_dir: str | Path, out_dir: str | Path, include_smoke: bool = False,
                      published: str | Path | None = None) -> pd.DataFrame:
    """Rebuild every leaderboard output from the run folders; returns the leaderboard table."""
    board = collect(runs_dir, include_smoke, published)
    write_outputs(board, out_dir)
    return board.table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lostreg.leaderboard",
        description="Collect finished runs into leaderboard.csv and compare each model with its "
                    "register twin and test-time-register variant, per method "
                    "(comparison.md/.csv, figures/).",
        formatter_class=HelpFormatter,
    )
    add_runs_option(parser, "the folder that holds the run folders")
    parser.add_argument("--output", "--out", dest="out", type=Path, default=Path("results"),
                        metavar="DIR", help="where the outputs go (--out: older spelling)")
    parser.add_argument("--include-smoke", action="store_true",
                        help="keep random-weight smoke runs (flagged in the smoke column)")
    parser.add_argument("--published", type=Path, default=None,
                        help=f"published figures CSV (default: {DEFAULT_PUBLISHED})")
    parser.add_argument("--reread", action="store_true",
                        help="read and check every run's predictions again, as on a first "
                             "build, instead of trusting <runs>/.summaries (after a disk "
                             "problem, a copied runs folder, or before publishing numbers): "
                             "each stored summary that differs from them is named on stderr "
                             "and counted in the last line, every summary is rewritten, and "
                             "the build is never skipped as unchanged; the outputs are the "
                             "ones a normal build writes from honest summaries")
    return parser


BuildSummary = record.BuildSummary


def build_summary(board: Leaderboard) -> BuildSummary:
    """What the summary line says of a build."""
    pairs = (board.comparison["source"] == "ours") & board.comparison["model_reg"].notna()
    smoke = int(board.table["smoke"].astype(bool).sum()) if len(board.table) else 0
    return BuildSummary(len(board.table), smoke, int(pairs.sum()) + pair_count(board.saliency),
                        board.smoke_excluded, len(board.skipped), board.unfinished,
                        board.reread)


def summary_line(summary: BuildSummary, out: Path) -> str:
    """What was built, and what was left out and how to get it."""
    line = (f"{summary.runs} runs ({summary.smoke} smoke) -> {out / 'leaderboard.csv'}; "
            f"{summary.pairs} register pairs -> {out / 'comparison.md'}")
    if summary.smoke_excluded:
        line += (f"; skipped {summary.smoke_excluded} smoke run(s) (random weights): "
                 "--include-smoke shows them")
    if summary.skipped:
        line += f"; skipped {summary.skipped} unreadable run folder(s), reasons above"
    if summary.unfinished:
        line += f"; {summary.unfinished} unfinished run folder(s) (no metrics.json) not listed"
    if summary.reread is not None:
        compared, differing = summary.reread
        line += (f"; --reread: every run read from its predictions, {differing} of {compared} "
                 "stored summaries differed from them")
        if differing:
            line += " (named above)"
    return line


def build(runs_dir: str | Path, out_dir: str | Path, include_smoke: bool = False,
          published: str | Path | None = None,
          report: Callable[[str], None] | None = _stderr,
          reread: bool = False) -> BuildSummary:
    """What ``python -m lostreg.leaderboard`` does: ``collect`` and ``write_outputs``, unless
    the build record (``record``) shows the runs, options, published figures, code and
    outputs all as the last build left them: then nothing is read or written (the same bytes
    would be). A build that reported nothing is recorded for the next one. ``reread``
    (``--reread``): the record is not consulted and every run is read from its predictions
    (``collect``). ``lostreg.timeline`` marks each step (the benchmark's phases)."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    options = {"include_smoke": bool(include_smoke),
               "published": None if published is None else str(Path(published).resolve()),
               # the methods' titles and order the tables show (a plugin registered in this
               # process adds one)
               "methods": [list(item) for item in method_titles().items()]}
    published_file = DEFAULT_PUBLISHED if published is None else Path(published)
    last = None if reread else record.read_record(out_dir)
    summary = None if last is None else record.recorded_summary(
        last, runs_dir, out_dir, options, published_file)
    timeline.mark("leaderboard: build record checked")
    if summary is not None:
        return summary
    inputs = record.take_inputs(runs_dir, options, published_file) if runs_dir.is_dir() else None
    record.forget(out_dir)
    reported: list[str] = []

    def say(line: str) -> None:
        reported.append(line)
        if report is not None:
            report(line)

    board = collect(runs_dir, include_smoke, published, say, reread=reread)
    timeline.mark("leaderboard: runs collected")
    written = write_outputs(board, out_dir)
    timeline.mark("leaderboard: outputs written")
    summary = build_summary(board)
    if (inputs is not None and not reported
            and record.inputs_unchanged(inputs, runs_dir, options, published_file)):
        outputs = record.take_outputs(out_dir, written)
        if outputs is not None:
            record.write_record(out_dir, inputs, outputs, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = build(args.runs, args.out, args.include_smoke, args.published,
                        reread=args.reread)
    except (LostregError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every output is written atomically: what was there stays whole
        print("interrupted: the outputs already written are whole; run the command again to "
              "finish the build", file=sys.stderr)
        return 130
    line = summary_line(summary, args.out)
    if summary.runs == 0 and (Path(args.runs) / "config.json").is_file():
        line += (f"; {args.runs} is one run's folder: --runs takes the folder that holds the "
                 f"run folders ({Path(args.runs).parent})")
    print(line)
    return 0

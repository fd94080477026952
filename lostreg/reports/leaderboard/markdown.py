"""``comparison.md``: one "no registers -> registers" block per method, then the statistics.

Every row is either ours or published, never a blend; each carries its protocol in words, so
two rows measured differently are seen to be. Within a row, an ``a -> b`` cell joins two
measurements under that row's protocol; where our two sides still differ (a note from
``tables._protocol_note``), the protocol cell says so with a warning sign.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pandas as pd

from lostreg.reports.cells import md_cell, md_row
from lostreg.reports.leaderboard.published import VARIANT_LABELS, method_key
from lostreg.reports.leaderboard.tables import (
    DATASET_LABELS,
    PAPER_DATASETS,
    _present,
    dataset_rank,
    is_subset,
    method_order,
    method_titles,
    settings_label,
)

if TYPE_CHECKING:
    from lostreg.reports.leaderboard import Leaderboard

WARNING = "⚠"


def _cell(without: Any, with_: Any) -> str:
    """``35.3 → 55.4 (+20.1)``; one side missing shows as ``—``, both missing as empty."""
    if _present(without) and _present(with_):
        return f"{without:.1f} → {with_:.1f} ({with_ - without:+.1f})"
    if _present(without):
        return f"{without:.1f} → —"
    if _present(with_):
        return f"— → {with_:.1f}"
    return ""


def _single(row: dict[str, Any]) -> str:
    """A baseline alone: ours with its 95% interval, a published figure as printed."""
    if not _present(row.get("corloc")):
        return ""
    if row["source"] == "ours":
        return f"{row['corloc']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"
    return f"{row['corloc']:.1f}"


def _format_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def datasets_of(frame: pd.DataFrame) -> list[str]:
    return sorted(set(PAPER_DATASETS) | set(frame["dataset"].dropna()), key=dataset_rank)


def method_title(name: str, published: pd.DataFrame) -> str:
    """The registry's title of a method, else the name a paper printed, else the name."""
    title = method_titles().get(name)
    if title:
        return title
    printed = [text for text in published["method"] if method_key(text) == name]
    return printed[0] if printed else name


def source_cells(row: dict[str, Any]) -> tuple[str, str, str]:
    """A comparison row's source (ours, or the paper and whether its figure was verified), its
    models (``base → variant`` for a pair) and the registers the variant adds; box and mask
    tables alike."""
    source = "ours" if row["source"] == "ours" else f"published: {row['paper']}"
    if row["source"] != "ours" and row.get("verified") == "unverified":
        source += " (unverified)"
    models = row["model"]
    if _present(row.get("model_reg")):
        models = f"{row['model']} → {row['model_reg']}"
    registers = VARIANT_LABELS[row["registers"]] if _present(row.get("registers")) else "—"
    return source, models, registers


def _row_key(row: dict[str, Any]) -> tuple:
    protocol = row["protocol"]
    if _present(row.get("protocol_note")):
        protocol += f"; {WARNING} {row['protocol_note']}"
    return (row["backbone"], *source_cells(row), protocol)


def method_block(frame: pd.DataFrame, title: str, datasets: list[str]) -> list[str]:
    """One method's table: a row per (source, backbone, arrow, protocol), a column per dataset."""
    labels = [DATASET_LABELS.get(name, name) for name in datasets]
    lines = [f"## {md_cell(title)}", "",
             md_row(["Backbone", "Source", "Models", "Registers", "Protocol", *labels]),
             "|---|---|---|---|---|" + "---|" * len(datasets)]
    rows: dict[tuple, dict[str, dict]] = {}
    for row in frame.to_dict("records"):
        rows.setdefault(_row_key(row), {})[row["dataset"]] = row
    for key, cells in rows.items():
        parts = []
        for name in datasets:
            row = cells.get(name)
            if row is None:
                parts.append("")
            elif _present(row.get("registers")):
                parts.append(_cell(row.get("corloc"), row.get("corloc_reg")))
            else:
                parts.append(_single(row))
        lines.append(md_row([*key, *parts]))
    return lines


def comparison_markdown(board: Leaderboard) -> str:
    """One block per method (ours and published rows, protocols beside them), the paired
    statistics of our arrows, then each published source with its protocol and checks."""
    frame, subsets = split_subsets(board.comparison)
    datasets = datasets_of(frame)
    lines = [
        "# Do registers help object discovery? CorLoc without → with registers",
        "",
        "CorLoc (%), `without → with (difference in points)`. Each row is **ours** (this suite) "
        "or **published** (as printed, with the paper's protocol): the two are never blended. "
        "A cell joins two measurements made under its row's protocol; a baseline with trained "
        "registers and with a test-time register is two rows from the same baseline. Our "
        f"single runs show a 95% bootstrap interval. {WARNING} marks a row whose two sides "
        "differ in a way its protocol cell states. In our protocol cells, the normalisation "
        "is lostreg's `--normalize`, applied before the method; a method's own step (TokenCut "
        "L2-normalises its features) is part of the method.",
    ]
    methods = sorted(frame["method"].dropna().unique(), key=method_order)
    for name in methods:
        lines += ["", *method_block(frame[frame["method"] == name],
                                    method_title(name, board.published), datasets)]
    if not methods and subsets.empty:
        lines += ["", "No runs and no published figures to compare."]
    if not subsets.empty:
        lines += ["", *subset_section(subsets, board.published)]
    lines += ["", *statistics_section(board.comparison), "",
              *sources_section(board.published)]
    return "\n".join(lines).rstrip() + "\n"


def split_subsets(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows on whole datasets and published rows, our rows on part of a dataset): a ``--limit``
    or partial-dataset run is never placed in a column beside a published figure."""
    subset = frame.apply(lambda row: is_subset(row.to_dict()), axis=1).astype(bool) \
        if len(frame) else pd.Series([], dtype=bool)
    return frame[~subset], frame[subset]


def subset_section(rows: pd.DataFrame, published: pd.DataFrame) -> list[str]:
    """Our runs on part of a dataset, in a table of their own with what part, apart from the
    published figures (a 12-image VOC07 CorLoc beside the published 61.9 reads as a result)."""
    lines = ["## Runs on part of a dataset (not comparable with published figures)", "",
             "`--limit` runs (the first N images) and runs on a partial dataset "
             "(`--allow-partial-dataset`: the split lists another number of images than the "
             "benchmark's). Their CorLoc is over those images only.", "",
             "| Method | Backbone | Models | Registers | Protocol | Dataset | CorLoc |",
             "|---|---|---|---|---|---|---|"]
    for row in rows.sort_values("method", key=lambda v: v.map(method_order),
                                kind="stable").to_dict("records"):
        backbone, _, models, registers, protocol = _row_key(row)
        cell = (_cell(row.get("corloc"), row.get("corloc_reg")) if _present(row.get("registers"))
                else _single(row))
        dataset = DATASET_LABELS.get(row["dataset"], row["dataset"])
        lines.append(md_row([method_title(row["method"], published), backbone, models,
                             registers, protocol, dataset, cell]))
    return lines


def statistics_section(frame: pd.DataFrame) -> list[str]:
    pairs = frame[(frame["source"] == "ours") & frame["model_reg"].notna()]
    lines = ["## Paired statistics (ours)", ""]
    if pairs.empty:
        return lines + ["No register pairs among the runs yet (a pair needs a model and its "
                        "`_reg` twin or `+ttr` variant on the same dataset with the same "
                        "settings)."]
    lines += [
        "Same images for both runs (joined on `image_id`). Difference: with − without, 95% "
        "paired percentile bootstrap over images (10000 resamples, seed 0). p: exact two-sided "
        "McNemar test (binomial on the images where exactly one run hits).",
        "",
        "| Method | Models | Registers | Dataset | Settings | Images | Without | With | "
        "Difference [95% CI] | Miss→hit | Hit→miss | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in pairs.to_dict("records"):
        images = f"{row['n_paired']}"
        if row["n_paired"] != row["n_images"] or row["n_paired"] != row["n_images_reg"]:
            images += f" (of {row['n_images']} / {row['n_images_reg']})"
        lines.append(md_row([
            row["method"], f"{row['model']} → {row['model_reg']}",
            VARIANT_LABELS[row["registers"]], DATASET_LABELS.get(row["dataset"], row["dataset"]),
            settings_label(row), images,
            f"{row['corloc']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]",
            f"{row['corloc_reg']:.1f} [{row['ci_low_reg']:.1f}, {row['ci_high_reg']:.1f}]",
            f"{row['diff']:+.1f} [{row['diff_ci_low']:+.1f}, {row['diff_ci_high']:+.1f}]",
            row["miss_to_hit"], row["hit_to_miss"], _format_p(row["mcnemar_p"])]))
    return lines


def sources_section(published: pd.DataFrame) -> list[str]:
    """Each published source once: its citation, then each protocol with the backbones it
    covers and how far it was checked, then each note once, saying which rows it concerns
    when not all of them (a note on one backbone used to repeat the whole source)."""
    lines = ["## Published sources", ""]
    if published.empty:
        return lines + ["No published figures file was found; there are no published rows."]
    for (paper, source), rows in published.groupby(["paper", "source"], sort=False):
        lines.append(f"- **{md_cell(paper)}**: {md_cell(source)}.")
        for (protocol, verified), part in rows.groupby(["protocol", "verified"], sort=False):
            backbones = ", ".join(dict.fromkeys(part["backbone"]))
            lines.append(f"  - {md_cell(backbones)}. Protocol: {md_cell(protocol)}. Checked: "
                         f"{md_cell(verified)}.")
        notes = _notes(rows)  # those of every row first, then those of some rows
        for note, index in sorted(notes, key=lambda item: len(item[1]) != len(rows)):
            lines.append(f"  - Note{md_cell(_which_rows(rows.loc[index], rows))}: "
                         f"{md_cell(note)}")
    return lines


_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")


def _notes(rows: pd.DataFrame) -> list[tuple[str, list[Any]]]:
    """The notes of a source's rows, each sentence once with the rows that carry it (in
    order; consecutive sentences of the same rows joined): rows whose notes share a sentence
    and add one more list the shared sentence once."""
    carried: dict[str, list[Any]] = {}
    for index, note in rows["note"].items():
        for sentence in _SENTENCE_END.split(str(note or "").strip()):
            if sentence:
                carried.setdefault(sentence, []).append(index)
    notes: list[tuple[str, list[Any]]] = []
    for sentence, index in carried.items():
        if notes and notes[-1][1] == index:
            notes[-1] = (f"{notes[-1][0]} {sentence}", index)
        else:
            notes.append((sentence, index))
    return notes


def _which_rows(part: pd.DataFrame, rows: pd.DataFrame) -> str:
    """`` (OpenCLIP ViT-B/16)`` or `` (DINO ViT-S/16: VOC07)``: the rows of a source a note
    concerns, when it does not concern them all; '' when it does."""
    if len(part) == len(rows):
        return ""
    named = []
    for backbone, mine in part.groupby("backbone", sort=False):
        if len(mine) == int((rows["backbone"] == backbone).sum()):
            named.append(backbone)
        else:
            datasets = ", ".join(DATASET_LABELS.get(d, d) for d in dict.fromkeys(mine["dataset"]))
            named.append(f"{backbone}: {datasets}")
    return " (" + "; ".join(named) + ")"

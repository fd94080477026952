"""Saliency (masks) in the leaderboard: rows beside CorLoc's, register pairs compared on
per-image IoU, our figures beside the published anchors, and ``comparison.md``'s saliency part.

* **Leaderboard rows**: one per mask run, in ``leaderboard.csv``'s columns; a mask run fills
  ``acc``, ``iou``, ``max_f`` (TokenCut's definition, percent) and ``refine``/``mask_protocol``
  and leaves ``corloc`` and its interval empty (box runs leave the saliency columns empty).
* **Pairs**: a run without registers and its trained-register twin or test-time-register
  variant, with every setting equal (the box runs' settings, the part of the dataset, the
  refinement and the mask protocol); compared on the images both scored by a paired bootstrap
  of the mean per-image IoU difference (``stats.paired_bootstrap_mean_diff``, 10,000
  resamples, seed 0). An image whose IoU is TokenCut's 0/0 (empty GT and empty prediction) in
  either run has no IoU to compare and is left out of the test, and counted.
* **Comparison**: a block per method and refinement. Each published anchor
  (``load_published_saliency``) is placed beside our runs of the same method, refinement and
  dataset **under the anchor's definition**: TokenCut's rows beside our TokenCut-definition
  figures, the FOUND-reported LOST rows beside our FOUND-definition figures
  (``saliency_variants.found``: effective beta^2 0.09, per-image max F). Smoke runs and runs on
  part of a dataset are never placed in a block: they have a section of their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lostreg.evaluation import stats
from lostreg.reports.cells import neutralise_formulas
from lostreg.reports.leaderboard.published import (
    load_published_saliency,
    method_key,
    variant_of,
)
from lostreg.reports.leaderboard.saliency_runs import MaskRun, scan_mask_runs
from lostreg.reports.leaderboard.tables import (
    LEADERBOARD_COLUMNS,
    _present,
    backbone_label,
    base_timm_name,
    find_pairs,
    method_order,
    settings_label,
    sorted_rows,
)
from lostreg.runs.summaries import SummaryStore

SALIENCY_DATASETS = ("ecssd", "duts_te", "dut_omron")  # the order published tables use
DATASET_LABELS = {"ecssd": "ECSSD", "duts_te": "DUTS-TE", "dut_omron": "DUT-OMRON"}
REFINE_LABELS = {"none": "no refinement",
                 "bilateral": "bilateral solver, soft output scored (TokenCut's)",
                 "bilateral-binary": "bilateral solver, binary mask scored (corrected)"}
DEFINITION_LABELS = {"tokencut": "TokenCut's", "move": "MOVE's",
                     "found": "FOUND's (β² 0.09, per-image max F)"}
FIGURES = ("max_f", "iou", "acc")  # the order the published tables print them
PAIR_SETTINGS = ("dataset", "split", "no_hard", "limit", "dataset_images", "method",
                 "method_params", "feature", "layer", "normalize", "pos_interp", "precision",
                 "refine", "mask_protocol", "smoke")
SALIENCY_COMPARISON_COLUMNS = [
    "source", "comparable", "paper", "method", "refine", "mask_protocol", "definition",
    "family", "backbone", "model", "model_reg", "registers", "dataset", "split", "no_hard",
    "limit", "dataset_images", "method_params", "feature", "layer", "normalize", "pos_interp",
    "precision", "smoke", "protocol", "verified", "n_images", "n_images_reg", "acc", "iou",
    "max_f", "acc_reg", "iou_reg", "max_f_reg", "n_paired", "n_undefined", "iou_diff",
    "iou_diff_ci_low", "iou_diff_ci_high", "iou_better", "iou_worse", "bootstrap_p", "run_id",
    "run_id_reg", "citation",
]


@dataclass
class SaliencyBoard:
    """Everything the leaderboard shows of mask runs, in memory."""

    runs: list[MaskRun]
    table: pd.DataFrame  # leaderboard rows (LEADERBOARD_COLUMNS)
    comparison: pd.DataFrame  # SALIENCY_COMPARISON_COLUMNS
    published: pd.DataFrame  # the published saliency anchors
    skipped: list[str] = field(default_factory=list)
    smoke_excluded: int = 0


def dataset_rank(name: str) -> tuple[int, str]:
    return (SALIENCY_DATASETS.index(name) if name in SALIENCY_DATASETS
            else len(SALIENCY_DATASETS), name)


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


# --- leaderboard rows ------------------------------------------------------------------------


def leaderboard_row(run: MaskRun) -> dict[str, Any]:
    """The leaderboard's row of one mask run: TokenCut-definition figures, CorLoc empty."""
    info, settings = run.info, run.settings()
    figures = run.figures["tokencut"]
    return {
        "run_id": run.run_id, "model": info.model, "timm_name": info.timm_name,
        "family": info.family, "registers": info.num_registers,
        "test_time_registers": info.test_time_registers, "params": info.num_params,
        "patch_size": info.patch_size,
        **{key: value for key, value in settings.items() if key != "smoke"},
        "n_images": len(run.images), "acc": figures["acc"], "iou": figures["iou"],
        "max_f": figures["max_f"], "weights_source": info.weights_source,
        "weights_sha256": info.weights_sha256, "lostreg_version": info.lostreg_version,
        "git_commit": info.git_commit, "date": run.finished.isoformat(),
        "seconds": run.seconds, "device": info.device, "smoke": run.smoke,
    }


def leaderboard_rows(runs: Sequence[MaskRun]) -> pd.DataFrame:
    """Mask runs' rows, by dataset (published order), method, refine, maxF from best, run id."""
    rows = sorted((leaderboard_row(run) for run in runs),
                  key=lambda r: (dataset_rank(r["dataset"]), method_order(r["method"]),
                                 r["refine"], -(r["max_f"] if _present(r["max_f"]) else -1.0),
                                 r["run_id"]))
    return pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)


def with_mask_rows(table: pd.DataFrame, board: SaliencyBoard) -> pd.DataFrame:
    """The leaderboard with the mask runs' rows after the box runs' (one row per run)."""
    if board.table.empty:
        return table
    records = table.to_dict("records") + board.table.to_dict("records")
    combined = pd.DataFrame(records, columns=LEADERBOARD_COLUMNS)
    for column in ("limit", "dataset_images", "params", "patch_size", "k", "n_hits"):
        combined[column] = combined[column].astype("Int64")
    return combined


# --- pairs ------------------------------------------------------------------------------------


def run_variant(run: MaskRun) -> str:
    return variant_of(run.info.num_registers, run.info.test_time_registers)


def _pair_key(run: MaskRun) -> tuple:
    settings = run.settings()
    return (run.info.family, base_timm_name(run.info.timm_name),
            *(repr(settings[key]) for key in PAIR_SETTINGS))


def find_mask_pairs(runs: Sequence[MaskRun]) -> tuple[list[tuple[MaskRun, MaskRun]],
                                                      list[MaskRun]]:
    """(baseline, variant) pairs of mask runs with every setting equal, and the baselines
    without a variant: ``find_pairs``'s rule on the mask runs' settings."""
    return find_pairs(runs, _pair_key)


def paired_iou(base: MaskRun, other: MaskRun) -> dict[str, Any]:
    """The paired test on per-image IoU (points), on the images both runs scored with a
    defined IoU; ``n_undefined``: shared images left out for a 0/0 IoU in either run."""
    joined = base.images[["image_id", "sal_iou"]].merge(
        other.images[["image_id", "sal_iou"]], on="image_id", suffixes=("", "_reg"))
    defined = joined.dropna(subset=["sal_iou", "sal_iou_reg"])
    a = defined["sal_iou"].to_numpy(dtype=np.float64)
    b = defined["sal_iou_reg"].to_numpy(dtype=np.float64)
    test = stats.paired_bootstrap_mean_diff(a, b)
    return {"n_paired": test.n, "n_undefined": len(joined) - len(defined),
            "iou_diff": 100.0 * test.mean_diff, "iou_diff_ci_low": 100.0 * test.low,
            "iou_diff_ci_high": 100.0 * test.high, "iou_better": int(np.sum(b > a)),
            "iou_worse": int(np.sum(b < a)), "bootstrap_p": test.p_value}


# --- comparison rows -------------------------------------------------------------------------


def comparable(run: MaskRun) -> bool:
    """Whether a run may stand beside a published figure: pretrained weights, whole dataset."""
    return not run.smoke and run.limit is None and run.dataset_images is None


def _protocol(settings: dict[str, Any]) -> str:
    words = settings_label(settings)
    return f"{words}, mask {settings['mask_protocol']}" if settings.get("mask_protocol") \
        else words


def _our_row(run: MaskRun, definition: str) -> dict[str, Any]:
    info, settings = run.info, run.settings()
    figures = run.figures[definition]
    return {"source": "ours", "comparable": comparable(run), "paper": None,
            "definition": definition, "family": info.family,
            "backbone": backbone_label(info.family, info.timm_name), "model": info.model,
            **settings, "protocol": _protocol(settings), "n_images": len(run.images),
            **figures, "run_id": run.run_id}


def _pair_rows(base: MaskRun, other: MaskRun, definitions: Sequence[str],
               test: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for definition in definitions:
        theirs = other.figures[definition]
        rows.append({**_our_row(base, definition), "model_reg": other.info.model,
                     "registers": run_variant(other), "n_images_reg": len(other.images),
                     **{f"{key}_reg": value for key, value in theirs.items()}, **test,
                     "run_id_reg": other.run_id})
    return rows


def published_rows(published: pd.DataFrame) -> list[dict[str, Any]]:
    """The published anchors as comparison rows (each as printed, with its definition)."""
    return [{"source": "published", "comparable": True, "paper": record["paper"],
             "method": method_key(record["method"]), "refine": record["refine"],
             "definition": record["definition"], "family": record["family"],
             "backbone": record["backbone"], "model": record["compare_with"],
             "registers": None if record["variant"] == "none" else record["variant"],
             "dataset": record["dataset"], "protocol": record["protocol"],
             "verified": record["verified"], "citation": record["source"],
             "acc": record["acc"], "iou": record["iou"], "max_f": record["max_f"]}
            for record in published.to_dict("records")]


def _definitions(run: MaskRun, anchors: pd.DataFrame) -> list[str]:
    """TokenCut's definition, then every other one an anchor of this run's method and
    refinement was made with (our figures under it stand beside that anchor)."""
    same = anchors[(anchors["method"].map(method_key) == run.info.method)
                   & (anchors["refine"] == run.refine)]
    return ["tokencut", *sorted(set(same["definition"]) - {"tokencut"})]


def comparison_frame(runs: Sequence[MaskRun], published: pd.DataFrame) -> pd.DataFrame:
    """Our pairs, our baselines without a variant whose method and model an anchor cites,
    and every anchor; sorted by method, refinement, family, source, dataset."""
    pairs, unpaired = find_mask_pairs(runs)
    rows: list[dict[str, Any]] = []
    for base, other in pairs:
        rows += _pair_rows(base, other, _definitions(base, published), paired_iou(base, other))
    cited = {(method_key(method), model) for method, model in
             zip(published["method"], published["compare_with"], strict=True)}
    for run in unpaired:
        if (run.info.method, run.info.model) in cited:
            rows += [_our_row(run, name) for name in _definitions(run, published)]
    rows += published_rows(published)
    frame = pd.DataFrame(rows, columns=SALIENCY_COMPARISON_COLUMNS)
    if frame.empty:
        return frame
    order = {"_method": frame["method"].map(method_order),
             "_refine": frame["refine"].map(lambda r: list(REFINE_LABELS).index(r)
                                            if r in REFINE_LABELS else len(REFINE_LABELS)),
             "_family": frame["family"].map(repr), "_base": frame["model"].map(repr),
             "_source": frame["source"].map({"ours": 0, "published": 1}),
             "_definition": frame["definition"].map(repr),
             "_protocol": frame["protocol"].map(repr), "_reg": frame["model_reg"].map(repr),
             "_dataset": frame["dataset"].map(dataset_rank)}
    return sorted_rows(frame, order, ("limit", "dataset_images", "layer", "n_images",
                                      "n_images_reg", "n_paired", "n_undefined", "iou_better",
                                      "iou_worse"))


def collect_saliency(runs_dir: str | Path, include_smoke: bool = False,
                     published: str | Path | None = None,
                     report: Callable[[str], None] | None = None,
                     store: SummaryStore | None = None) -> SaliencyBoard:
    """Every finished mask run under ``runs_dir`` and the published anchors, in tables
    (``store``: the summaries' store the runs are read through, see ``scan_mask_runs``)."""
    scan = scan_mask_runs(runs_dir, include_smoke, report, store)
    anchors = load_published_saliency(published)
    return SaliencyBoard(scan.runs, leaderboard_rows(scan.runs),
                         comparison_frame(scan.runs, anchors), anchors, scan.skipped,
                         scan.smoke_excluded)


def pair_count(board: SaliencyBoard | None) -> int:
    """Our register pairs of mask runs (one per pair, whatever definitions it is shown in)."""
    if board is None or board.comparison.empty:
        return 0
    frame = board.comparison
    return int(((frame["source"] == "ours") & frame["model_reg"].notna()
                & (frame["definition"] == "tokencut")).sum())


def comparison_csv(board: SaliencyBoard) -> str:
    """``comparison_saliency.csv``: floats to 4 decimals (p-values as computed), text cells
    that a spreadsheet shows as text (``cells.neutralise_formulas``, as the other CSVs)."""
    frame = board.comparison.copy()
    for column in frame.columns:
        if frame[column].dtype == float and column != "bootstrap_p":
            frame[column] = frame[column].round(4)
    return neutralise_formulas(frame).to_csv(index=False, lineterminator="\n")


def settings_json(run: MaskRun) -> str:
    """The settings of a run as one JSON line (for tests and notebooks that group runs)."""
    return json.dumps(run.settings(), sort_keys=True)

"""``analyze attribution``: does LOST fail where the artifact tokens are?

LOST seeds on the patch with the fewest positively-correlated patches. A high-norm artifact
token correlates with almost nothing, so it (or a patch next to it) is a natural wrong seed.
Per image of a run this module records whether the seed is an outlier token or touches one
(4-neighbourhood), and whether the predicted box covers outliers; then CorLoc is split by
"image has outliers / has none" and by "seed on or next to an outlier / away from them".

Token maps come from a norms analysis (``--norms``) or are computed for the run's images with
the run's own model and written to ``<run>/analysis/norms/`` (reused on the next call, and by
the other runs of the same call that share the model, weights and images).

A method without a seed (DINO-seg) stores ``seed: null``: its seed columns stay empty and the
seed groups leave it out, while the box and outlier columns are filled as for any run.

Given several runs on the same images, :func:`hits_table` adds the per-image table of which
run (typically which method) found the object, with a summary: found by all, by none, by some,
and only by each run.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lostreg.errors import LostregError
from lostreg.features.pipeline import resolve_device
from lostreg.io import atomic_write_json, atomic_write_text
from lostreg.reports.analysis.collect import NormsConfig, analyze_norms, load_norms
from lostreg.reports.analysis.marks import SMOKE_MARK, markdown_mark
from lostreg.reports.analysis.norms import box_patch_slice, outlier_mask, touches_mask
from lostreg.reports.analysis.runs import (
    RunInfo,
    common_predictions,
    compare_dir,
    label_slug,
    load_run,
    load_runs,
    loaded_runs,
    prediction_seed,
    rebuild_backbone,
    run_labels,
    run_records,
    unfinished_marks,
)
from lostreg.reports.analysis.store import TokenMaps

IMAGE_COLUMNS = ("image_id", "hit", "best_iou", "seed_row", "seed_col", "seed_norm", "n_tokens",
                 "n_outliers", "outlier_share", "has_outliers", "seed_is_outlier",
                 "seed_touches_outlier", "box_outliers", "box_has_outlier")
SUMMARY_COLUMNS = ("group", "n_images", "n_hits", "corloc", "seed_is_outlier_pct",
                   "seed_touches_outlier_pct", "box_has_outlier_pct", "mean_outlier_share_pct")
GROUPS = (
    ("all images", lambda r: True),
    ("image has outliers", lambda r: r["has_outliers"]),
    ("image has none", lambda r: not r["has_outliers"]),
    ("seed on/next to an outlier", lambda r: r["seed_touches_outlier"] is True),
    ("seed away from outliers", lambda r: r["seed_touches_outlier"] is False),
)
SEED_COLUMNS = ("seed_row", "seed_col", "seed_norm", "seed_is_outlier", "seed_touches_outlier")


@dataclass
class AttributionResult:
    run: RunInfo
    rows: list[dict]
    summary: list[dict]
    threshold: float | None
    output_dir: Path
    markdown: str
    norms_path: Path


def attribute_image(prediction: dict, norm_map: np.ndarray, threshold: float | None,
                    patch_size: int) -> dict:
    """Where one image's seed and box stand relative to its outlier tokens (seed columns
    ``None`` for a method without a seed)."""
    mask = outlier_mask(norm_map, threshold)
    box_rows, box_cols = box_patch_slice(prediction["box"], patch_size, mask.shape)
    box_outliers = int(mask[box_rows, box_cols].sum())
    return {
        "image_id": str(prediction["image_id"]),
        "hit": bool(prediction["hit"]),
        "best_iou": float(prediction.get("best_iou", math.nan)),
        **outlier_columns(prediction, mask, norm_map),
        "box_outliers": box_outliers,
        "box_has_outlier": box_outliers > 0,
    }


def outlier_columns(prediction: dict, outliers: np.ndarray, norm_map: np.ndarray) -> dict:
    """The columns box and mask runs share: where the seed stands relative to the outlier
    tokens (``None`` for a method without a seed) and how many outliers the image has."""
    rows, cols = outliers.shape
    seed = prediction_seed(prediction)
    if seed is not None and not (0 <= seed[0] < rows and 0 <= seed[1] < cols):
        raise LostregError(f"image {prediction['image_id']!r}: seed {prediction['seed']} is "
                           f"outside its {rows}x{cols} patch grid")
    n_outliers = int(outliers.sum())
    columns = {
        **dict.fromkeys(SEED_COLUMNS),
        "n_tokens": int(outliers.size),
        "n_outliers": n_outliers,
        "outlier_share": n_outliers / outliers.size,
        "has_outliers": n_outliers > 0,
    }
    if seed is not None:
        columns.update(seed_row=seed[0], seed_col=seed[1],
                       seed_norm=float(norm_map[seed[0], seed[1]]),
                       seed_is_outlier=bool(outliers[seed[0], seed[1]]),
                       seed_touches_outlier=touches_mask(outliers, seed[0], seed[1]))
    return columns


def attribution_rows(info: RunInfo, maps: TokenMaps, layer: int,
                     threshold: float | None) -> list[dict]:
    """One row per predicted image (run order); grids must match the run's."""
    return [attribute_image(prediction, maps.norm_map(map_position(info, maps, prediction),
                                                      layer), threshold, info.patch_size)
            for prediction in info.predictions]


def map_position(info: RunInfo, maps: TokenMaps, prediction: dict, grid_words: str = "") -> int:
    """Where a predicted image's token map is in ``maps``, once it is known to be there and on
    the run's patch grid (``grid_words`` says how the run made its grid)."""
    position = maps.position(str(prediction["image_id"]))
    if position is None:
        raise LostregError(f"image {prediction['image_id']!r} of {info.run_dir} has no token "
                           "map in the norms analysis; analyse the same images (or omit "
                           "--norms to compute them)")
    grid = maps.grid(position)
    if grid != info.grid(prediction):
        raise LostregError(f"image {prediction['image_id']!r}: token map grid {grid} != run "
                           f"grid {info.grid(prediction)}{grid_words}; not the same model or "
                           "image" + (" protocol" if grid_words else ""))
    return position


def percent(count: int, total: int) -> float | None:
    return 100.0 * count / total if total else None


def summarize(rows: list[dict]) -> list[dict]:
    """CorLoc and outlier rates per group (all, with/without outliers, seed near/away); seed
    rates count the images that have a seed (none: empty)."""
    out = []
    for name, keep in GROUPS:
        group = [r for r in rows if keep(r)]
        n = len(group)
        seeded = sum(r["seed_is_outlier"] is not None for r in group)
        out.append({
            "group": name,
            "n_images": n,
            "n_hits": sum(r["hit"] for r in group),
            "corloc": percent(sum(r["hit"] for r in group), n),
            "seed_is_outlier_pct": percent(sum(r["seed_is_outlier"] is True for r in group),
                                        seeded),
            "seed_touches_outlier_pct": percent(
                sum(r["seed_touches_outlier"] is True for r in group), seeded),
            "box_has_outlier_pct": percent(sum(r["box_has_outlier"] for r in group), n),
            "mean_outlier_share_pct": (100.0 * float(np.mean([r["outlier_share"] for r in group]))
                                       if n else None),
        })
    return out


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return buffer.getvalue()


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_marks(smoke: bool, unfinished: list[str]) -> list[str]:
    """The bold warning lines of a table about runs: the smoke mark if any run is a smoke run,
    then each unfinished run's mark (``marks``: one wording for every output)."""
    return [markdown_mark(md_escape(mark))
            for mark in ([SMOKE_MARK] if smoke else []) + unfinished]


def to_markdown(info: RunInfo, summary: list[dict], threshold: float | None, source: str) -> str:
    """The per-model table: one line per group, percentages with one decimal."""
    config = info.config
    method = info.method
    title = (f"### {method.spec.title or method.name} failure attribution: {config['model']} "
             f"on {config['dataset']}")
    lines = [title, ""]
    lines.append(f"Run `{md_escape(info.run_id)}`, {md_escape(method.describe())}; "
                 "outlier threshold "
                 + ("none (unimodal norms: no outliers)" if threshold is None
                    else f"{threshold:.4g}") + f" ({md_escape(source)}).")
    if all(p.get("seed") is None for p in info.predictions):
        lines += ["", "The method has no seed: the seed columns are empty."]
    for mark in markdown_marks(info.smoke, unfinished_marks([info])):
        lines += ["", mark]
    lines += ["", "| group | images | hits | CorLoc % | seed is outlier % | seed touches "
              "outlier % | box covers outlier % | outlier tokens % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        cells = [row["group"], str(row["n_images"]), str(row["n_hits"])]
        cells += ["–" if row[k] is None else f"{row[k]:.1f}" for k in SUMMARY_COLUMNS[3:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_same_model(info: RunInfo, payload: dict, norms_path: Path) -> None:
    config = info.config
    run_weights = config["weights"] if isinstance(config["weights"], dict) else {}
    norms_weights = payload.get("weights") or {}
    problems = []
    if payload.get("model") != config["model"]:
        problems.append(f"model {payload.get('model')} vs run {config['model']}")
    if norms_weights.get("source") != run_weights.get("source") or (
            norms_weights.get("sha256") != run_weights.get("sha256")):
        problems.append("different weights")
    if payload.get("dataset") != config["dataset"]:
        problems.append(f"dataset {payload.get('dataset')} vs run {config['dataset']}")
    if payload.get("image_protocol", "pad") != info.image_protocol:
        problems.append(f"images {payload.get('image_protocol', 'pad')} vs the run's "
                        f"{info.image_protocol} (to a patch multiple)")
    if problems:
        raise LostregError(f"{norms_path}: not from the run's model and data "
                           f"({'; '.join(problems)})")


def run_token_maps(info: RunInfo, device: str, data_root: str | Path | None, batch_size: int,
               num_workers: int | None, progress: bool, recompute: bool,
               weights: str | None = None) -> tuple[dict, TokenMaps, Path]:
    """Token maps for exactly the run's images, reused from ``<run>/analysis/norms``."""
    norms_dir = info.analysis_dir / "norms"
    wanted = [str(p["image_id"]) for p in info.predictions]
    if not recompute and (norms_dir / "norms.json").is_file():
        payload, maps = load_norms(norms_dir / "norms.json")
        if maps.image_ids == wanted and payload.get("image_protocol", "pad") == info.image_protocol:
            check_same_model(info, payload, norms_dir / "norms.json")
            print(f"using the token maps in {norms_dir} (--recompute to redo)", file=sys.stderr)
            return payload, maps, norms_dir / "norms.json"
    torch_device = resolve_device(device)
    backbone = rebuild_backbone(info, torch_device, weights)
    index, by_id = run_records(info, data_root)
    records = [by_id[image_id] for image_id in wanted]
    config = NormsConfig(model=info.config["model"], dataset=info.config["dataset"],
                         device=device, output=norms_dir, batch_size=batch_size,
                         num_workers=num_workers, progress=progress)
    result = analyze_norms(config, backbone=backbone, index=index, records=records)
    return result.payload, result.maps, norms_dir / "norms.json"


def token_maps_for(info: RunInfo, norms: str | Path | None, threshold: float | None,
                   device: str, data_root: str | Path | None, batch_size: int,
                   num_workers: int | None, progress: bool, recompute: bool,
                   weights: str | None) -> tuple[TokenMaps, int, float | None, str, Path]:
    """A run's token maps (``--norms``, else computed or reused under ``<run>/analysis/norms``)
    with the block, the threshold used and where it came from, and the norms file."""
    if norms is not None:
        norms_path = Path(norms)
        payload, maps = load_norms(norms_path)
        check_same_model(info, payload, norms_path)
    else:
        payload, maps, norms_path = run_token_maps(info, device, data_root, batch_size,
                                                   num_workers, progress, recompute, weights)
    if threshold is not None and not threshold > 0:
        raise LostregError(f"--threshold {threshold}: must be positive")
    layer = int(payload["primary_layer"])
    used = threshold if threshold is not None else payload["threshold"]
    source = ("--threshold" if threshold is not None
              else f"{payload.get('threshold_source', 'auto')}, block {layer}, {norms_path}")
    return maps, layer, used, source, Path(norms_path)


@dataclass(frozen=True)
class AttributionKind:
    """What a box run's attribution and a mask run's differ in (``BOX`` here, ``MASK`` in
    ``mask_attribution``); loading the run, its token maps and writing the four files are
    ``run_attribution``'s, the same for both."""

    name: str  # "box" or "mask": the runs it takes
    rows: Callable[[RunInfo, TokenMaps, int, float | None], list[dict]]
    summarize: Callable[[list[dict]], list[dict]]
    markdown: Callable[[RunInfo, list[dict], float | None, str], str]
    image_columns: Sequence[str]
    summary_columns: Sequence[str]
    definitions: dict[str, str]
    facts: Callable[[RunInfo], dict] = lambda info: {}  # its own facts in attribution.json


def run_attribution(run_dir: str | Path | RunInfo, kind: AttributionKind,
              norms: str | Path | None = None, threshold: float | None = None,
              device: str = "auto", data_root: str | Path | None = None, batch_size: int = 16,
              num_workers: int | None = None, progress: bool = False, recompute: bool = False,
              weights: str | None = None) -> AttributionResult:
    """Join a run's predictions (boxes or stored masks, as ``kind`` says) with token outlier
    maps and write the tables under ``<run>/analysis/``: ``attribution.csv`` (per image),
    ``attribution_summary.csv``, ``attribution.md`` and ``attribution.json``."""
    info = run_dir if isinstance(run_dir, RunInfo) else load_run(run_dir)
    if ("mask" if info.is_mask else "box") != kind.name:
        raise LostregError(f"{info.run_dir}: not a {kind.name} run; `python -m lostreg.analyze "
                           "attribution` picks each run's kind itself")
    maps, layer, used, source, norms_path = token_maps_for(
        info, norms, threshold, device, data_root, batch_size, num_workers, progress, recompute,
        weights)
    rows = kind.rows(info, maps, layer, used)
    summary = kind.summarize(rows)
    return write_attribution(
        info, rows, kind.image_columns, summary, kind.summary_columns,
        kind.markdown(info, summary, used, source), {
            "run_id": info.run_id, "model": info.config["model"],
            "dataset": info.config["dataset"], "smoke_run": info.smoke,
            **info.unfinished_fields(), "method": info.method.name,
            "method_params": info.method.params, **kind.facts(info),
            "norms": str(norms_path), "layer": layer, "threshold": used,
            "threshold_source": source, "definitions": kind.definitions})


BOX = AttributionKind("box", attribution_rows, summarize, to_markdown, IMAGE_COLUMNS,
                      SUMMARY_COLUMNS, {
    "seed_is_outlier": "the seed patch's token norm > threshold",
    "seed_touches_outlier": "the seed or one of its 4 grid neighbours is an outlier",
    "box_has_outlier": "an outlier token lies on a patch the predicted box covers",
    "has_outliers": "the image has at least one outlier token",
})


def attribute_run(run_dir: str | Path | RunInfo, norms: str | Path | None = None,
                  threshold: float | None = None, device: str = "auto",
                  data_root: str | Path | None = None, batch_size: int = 16,
                  num_workers: int | None = None, progress: bool = False,
                  recompute: bool = False, weights: str | None = None) -> AttributionResult:
    """``run_attribution`` of a box run."""
    return run_attribution(run_dir, BOX, norms, threshold, device, data_root, batch_size, num_workers,
                     progress, recompute, weights)


def write_attribution(info: RunInfo, rows: list[dict], image_columns: Sequence[str],
                      summary: list[dict], summary_columns: Sequence[str], markdown: str,
                      facts: dict) -> AttributionResult:
    """Write one run's attribution under ``<run>/analysis/`` (box and mask runs alike):
    ``attribution.csv`` (per image), ``attribution_summary.csv``, ``attribution.md`` and
    ``attribution.json`` (``facts`` plus the summary)."""
    out = info.analysis_dir
    atomic_write_text(out / "attribution.csv", to_csv(rows, image_columns))
    atomic_write_text(out / "attribution_summary.csv", to_csv(summary, summary_columns))
    atomic_write_text(out / "attribution.md", markdown)
    atomic_write_json(out / "attribution.json", {**facts, "summary": summary},
                      undefined_as_null=True)
    return AttributionResult(info, rows, summary, facts["threshold"], out, markdown,
                             Path(facts["norms"]))


# --- several runs: which of them found the object --------------------------------------------

HITS_SUMMARY_COLUMNS = ("group", "n_images", "pct")


@dataclass
class HitsTable:
    """Per image of several runs (the images every run predicted), which runs found the
    object; ``labels`` name the runs (see ``runs.run_labels``)."""

    infos: list[RunInfo]
    labels: list[str]
    columns: tuple[str, ...]
    rows: list[dict]
    summary: list[dict]
    left_out: int
    output_dir: Path
    markdown: str


def hits_rows(infos: list[RunInfo], labels: list[str]) -> tuple[tuple[str, ...], list[dict]]:
    """``image_id``, ``hit_<label>`` and ``best_iou_<label>`` per run, then ``n_found`` and
    ``found_by`` (the labels of the runs that hit, ``;``-separated)."""
    common, by_run = common_predictions(infos)
    slugs = [label_slug(label) for label in labels]
    columns = ("image_id", *(f"hit_{s}" for s in slugs), *(f"best_iou_{s}" for s in slugs),
               "n_found", "found_by")
    rows = []
    for image_id in common:
        hits = [bool(run[image_id]["hit"]) for run in by_run]
        row = {"image_id": image_id}
        for slug, run, hit in zip(slugs, by_run, hits, strict=True):
            row[f"hit_{slug}"] = hit
            iou = run[image_id].get("best_iou")
            row[f"best_iou_{slug}"] = None if iou is None else float(iou)
        row["n_found"] = sum(hits)
        row["found_by"] = ";".join(label for label, hit in zip(labels, hits, strict=True) if hit)
        rows.append(row)
    return columns, rows


def hits_summary(rows: list[dict], labels: list[str]) -> list[dict]:
    """Images found by every run, by none, by some but not all, only by each run, and each
    run's CorLoc on these images."""
    total, runs = len(rows), len(labels)
    hit_sets = [[r[f"hit_{label_slug(label)}"] for r in rows] for label in labels]
    groups = [(f"found by all {runs} runs", sum(r["n_found"] == runs for r in rows)),
              ("found by none", sum(r["n_found"] == 0 for r in rows)),
              ("found by some, not all", sum(0 < r["n_found"] < runs for r in rows))]
    for label, hits in zip(labels, hit_sets, strict=True):
        groups.append((f"found only by {label}",
                       sum(hit and row["n_found"] == 1 for hit, row in zip(hits, rows,
                                                                           strict=True))))
    for label, hits in zip(labels, hit_sets, strict=True):
        groups.append((f"found by {label} (CorLoc)", sum(hits)))
    return [{"group": name, "n_images": n, "pct": percent(n, total)} for name, n in groups]


def hits_markdown(infos: list[RunInfo], labels: list[str], summary: list[dict], n_images: int,
                  left_out: int) -> str:
    models = " vs ".join(dict.fromkeys(str(i.config["model"]) for i in infos))
    lines = [f"### Which runs found the object: {models} on {infos[0].config['dataset']}", "",
             f"{n_images} images predicted by every run"
             + (f" ({left_out} more left out: not predicted by every run)." if left_out
                else "."), ""]
    for mark in markdown_marks(any(i.smoke for i in infos), unfinished_marks(infos, labels)):
        lines += [mark, ""]
    lines += [f"- `hit_{label_slug(label)}`: {md_escape(label)} = run "
              f"`{md_escape(info.run_id)}` ({md_escape(info.method.describe())})"
              for label, info in zip(labels, infos, strict=True)]
    lines += ["", "| images | count | % |", "|---|---:|---:|"]
    lines += [f"| {md_escape(row['group'])} | {row['n_images']} | "
              + ("–" if row["pct"] is None else f"{row['pct']:.1f}") + " |" for row in summary]
    return "\n".join(lines) + "\n"


def hits_table(runs: Sequence[str | Path | RunInfo],
               output: str | Path | None = None) -> HitsTable:
    """Write ``hits.csv`` (per image), ``hits_summary.csv``, ``hits.md`` and ``runs.json``
    into ``output`` (default ``results/analysis/compare-<dataset>-<hash>/``). Needs no model:
    it reads the runs' predictions only, or none when ``runs`` are loaded already
    (``loaded_runs``)."""
    infos = loaded_runs(runs)
    if infos[0].is_mask:
        raise LostregError("mask runs have no hits; their per-image IoU table is "
                           "mask_attribution.iou_table's")
    labels = run_labels(infos)
    columns, rows = hits_rows(infos, labels)
    summary = hits_summary(rows, labels)
    every = set().union(*({str(p["image_id"]) for p in i.predictions} for i in infos))
    left_out = len(every) - len(rows)
    out = Path(output) if output is not None else compare_dir(infos)
    markdown = hits_markdown(infos, labels, summary, len(rows), left_out)
    atomic_write_text(out / "hits.csv", to_csv(rows, columns))
    atomic_write_text(out / "hits_summary.csv", to_csv(summary, HITS_SUMMARY_COLUMNS))
    atomic_write_text(out / "hits.md", markdown)
    atomic_write_json(out / "runs.json", [
        {"label": label, "column": f"hit_{label_slug(label)}", "run_id": info.run_id,
         "run_dir": str(info.run_dir), "method": info.method.name,
         "method_params": info.method.params, "smoke_run": info.smoke,
         **info.unfinished_fields()}
        for label, info in zip(labels, infos, strict=True)], undefined_as_null=True)
    return HitsTable(infos, labels, columns, rows, summary, left_out, out, markdown)


def _shared_norms_key(info: RunInfo) -> tuple:
    weights = info.config["weights"] if isinstance(info.config["weights"], dict) else {}
    return (info.config["model"], weights.get("source"), weights.get("sha256"),
            info.config["dataset"], bool(info.config.get("no_hard")), info.image_protocol,
            tuple(str(p["image_id"]) for p in info.predictions))


def attribute_each(infos: list[RunInfo], norms: list[str | Path | None] | None,
                   recompute: bool,
                   attribute: Callable[[RunInfo, str | Path | None], AttributionResult],
                   ) -> list[AttributionResult]:
    """``attribute(info, norms_path)`` for each run (loaded by the caller, once); a run
    without ``--norms`` reuses the token maps just computed for an earlier run of the same
    model, weights and images."""
    norms = list(norms) if norms is not None else [None] * len(infos)
    if len(norms) != len(infos):
        raise LostregError(f"--norms has {len(norms)} files for {len(infos)} runs; give one "
                           "per --run or none")
    results: list[AttributionResult] = []
    computed: dict[tuple, Path] = {}
    for info, norms_path in zip(infos, norms, strict=True):
        key = _shared_norms_key(info)
        if norms_path is None and not recompute and key in computed:
            norms_path = computed[key]
        result = attribute(info, norms_path)
        computed.setdefault(key, Path(result.norms_path))
        results.append(result)
    return results


def attribute_runs(run_dirs: list[str | Path], norms: list[str | Path | None] | None = None,
                   threshold: float | None = None, device: str = "auto",
                   data_root: str | Path | None = None, batch_size: int = 16,
                   num_workers: int | None = None, progress: bool = False,
                   recompute: bool = False, weights: str | None = None,
                   output: str | Path | None = None, hits_only: bool = False,
                   ) -> tuple[list[AttributionResult], HitsTable | None]:
    """``attribute_run`` for each run (unless ``hits_only``), then, with two runs or more, the
    ``hits_table`` of which runs found the object (see ``attribute_each`` for shared maps)."""
    return attribute_and_compare(
        run_dirs, norms, recompute, hits_only, lambda runs: hits_table(runs, output),
        lambda info, norms_path: attribute_run(info, norms_path, threshold, device, data_root,
                                               batch_size, num_workers, progress, recompute,
                                               weights))


def attribute_and_compare(run_dirs: list[str | Path], norms: list[str | Path | None] | None,
                          recompute: bool, table_only: bool,
                          table: Callable[[list[RunInfo]], Any],
                          attribute: Callable[[RunInfo, str | Path | None], AttributionResult],
                          ) -> tuple[list[AttributionResult], Any]:
    """Each run's attribution (unless ``table_only``: ``--hits-only``), then, with two runs or
    more, the per-image table comparing them (box runs: who found the object; mask runs: each
    run's IoU), for box and mask runs alike. Each run is read once, here (several runs are
    checked comparable before any attribution is computed), and both steps use what was
    read, so an unfinished run warns once and both see the same lines."""
    run_dirs = list(run_dirs)
    if table_only and len(run_dirs) < 2:
        raise LostregError("--hits-only: give at least two runs to compare")
    several = len(run_dirs) > 1
    infos = load_runs(run_dirs) if several else [load_run(run_dirs[0])]
    results = [] if table_only else attribute_each(infos, norms, recompute, attribute)
    return results, table(infos) if several else None

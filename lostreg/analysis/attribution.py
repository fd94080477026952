"""``analyze attribution``: does LOST fail where the artifact tokens are?

LOST seeds on the patch with the fewest positively-correlated patches. A high-norm artifact
token correlates with almost nothing, so it (or a patch next to it) is a natural wrong seed.
Per image of a run this module records whether the seed is an outlier token or touches one
(4-neighbourhood), and whether the predicted box covers outliers; then CorLoc is split by
"image has outliers / has none" and by "seed on or next to an outlier / away from them".

Token maps come from a norms analysis (``--norms``) or are computed for the run's images with
the run's own model and written to ``<run>/analysis/norms/`` (reused on the next call).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lostreg.analysis.collect import NormsConfig, analyze_norms, load_norms
from lostreg.analysis.norms import box_patch_slice, outlier_mask, touches_mask
from lostreg.analysis.runs import RunInfo, load_run, rebuild_backbone, run_records
from lostreg.analysis.store import TokenMaps
from lostreg.errors import LostregError
from lostreg.io import atomic_write_json, atomic_write_text
from lostreg.pipeline import resolve_device

IMAGE_COLUMNS = ("image_id", "hit", "best_iou", "seed_row", "seed_col", "seed_norm", "n_tokens",
                 "n_outliers", "outlier_share", "has_outliers", "seed_is_outlier",
                 "seed_touches_outlier", "box_outliers", "box_has_outlier")
SUMMARY_COLUMNS = ("group", "n_images", "n_hits", "corloc", "seed_is_outlier_pct",
                   "seed_touches_outlier_pct", "box_has_outlier_pct", "mean_outlier_share_pct")
GROUPS = (
    ("all images", lambda r: True),
    ("image has outliers", lambda r: r["has_outliers"]),
    ("image has none", lambda r: not r["has_outliers"]),
    ("seed on/next to an outlier", lambda r: r["seed_touches_outlier"]),
    ("seed away from outliers", lambda r: not r["seed_touches_outlier"]),
)


@dataclass
class AttributionResult:
    run: RunInfo
    rows: list[dict]
    summary: list[dict]
    threshold: float | None
    output_dir: Path
    markdown: str


def attribute_image(prediction: dict, norm_map: np.ndarray, threshold: float | None,
                    patch_size: int) -> dict:
    """Where one image's LOST seed and box stand relative to its outlier tokens."""
    mask = outlier_mask(norm_map, threshold)
    rows, cols = mask.shape
    seed_row, seed_col = (int(v) for v in prediction["seed"])
    if not (0 <= seed_row < rows and 0 <= seed_col < cols):
        raise LostregError(f"image {prediction['image_id']!r}: seed {prediction['seed']} is "
                           f"outside its {rows}x{cols} patch grid")
    box_rows, box_cols = box_patch_slice(prediction["box"], patch_size, (rows, cols))
    n_outliers = int(mask.sum())
    box_outliers = int(mask[box_rows, box_cols].sum())
    return {
        "image_id": str(prediction["image_id"]),
        "hit": bool(prediction["hit"]),
        "best_iou": float(prediction.get("best_iou", math.nan)),
        "seed_row": seed_row,
        "seed_col": seed_col,
        "seed_norm": float(norm_map[seed_row, seed_col]),
        "n_tokens": int(mask.size),
        "n_outliers": n_outliers,
        "outlier_share": n_outliers / mask.size,
        "has_outliers": n_outliers > 0,
        "seed_is_outlier": bool(mask[seed_row, seed_col]),
        "seed_touches_outlier": touches_mask(mask, seed_row, seed_col),
        "box_outliers": box_outliers,
        "box_has_outlier": box_outliers > 0,
    }


def attribution_rows(info: RunInfo, maps: TokenMaps, layer: int,
                     threshold: float | None) -> list[dict]:
    """One row per predicted image (run order); grids must match the run's."""
    rows = []
    for prediction in info.predictions:
        position = maps.position(str(prediction["image_id"]))
        if position is None:
            raise LostregError(f"image {prediction['image_id']!r} of {info.run_dir} has no token "
                               "map in the norms analysis; analyse the same images (or omit "
                               "--norms to compute them)")
        grid = maps.grid(position)
        if grid != info.grid(prediction):
            raise LostregError(f"image {prediction['image_id']!r}: token map grid {grid} != run "
                               f"grid {info.grid(prediction)}; not the same model or image")
        rows.append(attribute_image(prediction, maps.norm_map(position, layer), threshold,
                                    info.patch_size))
    return rows


def _pct(count: int, total: int) -> float | None:
    return 100.0 * count / total if total else None


def summarize(rows: list[dict]) -> list[dict]:
    """CorLoc and outlier rates per group (all, with/without outliers, seed near/away)."""
    out = []
    for name, keep in GROUPS:
        group = [r for r in rows if keep(r)]
        n = len(group)
        out.append({
            "group": name,
            "n_images": n,
            "n_hits": sum(r["hit"] for r in group),
            "corloc": _pct(sum(r["hit"] for r in group), n),
            "seed_is_outlier_pct": _pct(sum(r["seed_is_outlier"] for r in group), n),
            "seed_touches_outlier_pct": _pct(sum(r["seed_touches_outlier"] for r in group), n),
            "box_has_outlier_pct": _pct(sum(r["box_has_outlier"] for r in group), n),
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


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(info: RunInfo, summary: list[dict], threshold: float | None, source: str) -> str:
    """The per-model table: one line per group, percentages with one decimal."""
    config = info.config
    title = f"### LOST failure attribution: {config['model']} on {config['dataset']}"
    lines = [title, ""]
    lines.append(f"Run `{_md_escape(info.run_id)}`, feature {config['feature']}, "
                 f"k={config['k_patches']}; outlier threshold "
                 + ("none (unimodal norms: no outliers)" if threshold is None
                    else f"{threshold:.4g}") + f" ({_md_escape(source)}).")
    if config.get("smoke_run"):
        lines.append("")
        lines.append("**SMOKE RUN (random weights): not a result.**")
    lines += ["", "| group | images | hits | CorLoc % | seed is outlier % | seed touches "
              "outlier % | box covers outlier % | outlier tokens % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        cells = [row["group"], str(row["n_images"]), str(row["n_hits"])]
        cells += ["–" if row[k] is None else f"{row[k]:.1f}" for k in SUMMARY_COLUMNS[3:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_same_model(info: RunInfo, payload: dict, norms_path: Path) -> None:
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
    if problems:
        raise LostregError(f"{norms_path}: not from the run's model and data "
                           f"({'; '.join(problems)})")


def _run_norms(info: RunInfo, device: str, data_root: str | Path | None, batch_size: int,
               num_workers: int | None, progress: bool, recompute: bool,
               weights: str | None = None) -> tuple[dict, TokenMaps, Path]:
    """Token maps for exactly the run's images, reused from ``<run>/analysis/norms``."""
    norms_dir = info.analysis_dir / "norms"
    wanted = [str(p["image_id"]) for p in info.predictions]
    if not recompute and (norms_dir / "norms.json").is_file():
        payload, maps = load_norms(norms_dir / "norms.json")
        if maps.image_ids == wanted:
            _check_same_model(info, payload, norms_dir / "norms.json")
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


def attribute_run(
    run_dir: str | Path,
    norms: str | Path | None = None,
    threshold: float | None = None,
    device: str = "auto",
    data_root: str | Path | None = None,
    batch_size: int = 16,
    num_workers: int | None = None,
    progress: bool = False,
    recompute: bool = False,
    weights: str | None = None,
) -> AttributionResult:
    """Join a run's predictions with token outlier maps and write the tables under
    ``<run>/analysis/``: ``attribution.csv`` (per image), ``attribution_summary.csv``,
    ``attribution.md`` and ``attribution.json``."""
    info = load_run(run_dir)
    if norms is not None:
        norms_path = Path(norms)
        payload, maps = load_norms(norms_path)
        _check_same_model(info, payload, norms_path)
    else:
        payload, maps, norms_path = _run_norms(info, device, data_root, batch_size, num_workers,
                                               progress, recompute, weights)
    if threshold is not None and not threshold > 0:
        raise LostregError(f"--threshold {threshold}: must be positive")
    layer = int(payload["primary_layer"])
    used = threshold if threshold is not None else payload["threshold"]
    source = ("--threshold" if threshold is not None
              else f"{payload.get('threshold_source', 'auto')}, block {layer}, {norms_path}")
    rows = attribution_rows(info, maps, layer, used)
    summary = summarize(rows)
    out = info.analysis_dir
    markdown = to_markdown(info, summary, used, source)
    atomic_write_text(out / "attribution.csv", to_csv(rows, IMAGE_COLUMNS))
    atomic_write_text(out / "attribution_summary.csv", to_csv(summary, SUMMARY_COLUMNS))
    atomic_write_text(out / "attribution.md", markdown)
    atomic_write_json(out / "attribution.json", {
        "run_id": info.run_id,
        "model": info.config["model"],
        "dataset": info.config["dataset"],
        "smoke_run": bool(info.config.get("smoke_run")),
        "norms": str(norms_path),
        "layer": layer,
        "threshold": used,
        "threshold_source": source,
        "definitions": {
            "seed_is_outlier": "the seed patch's token norm > threshold",
            "seed_touches_outlier": "the seed or one of its 4 grid neighbours is an outlier",
            "box_has_outlier": "an outlier token lies on a patch the predicted box covers",
            "has_outliers": "the image has at least one outlier token",
        },
        "summary": summary,
    })
    return AttributionResult(info, rows, summary, used, out, markdown)

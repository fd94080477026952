"""The leaderboard table, register pairing and the comparison rows (ours and published).

Pairing: a run *without* registers is the baseline; every run of the same backbone with
trained registers (timm name equal but for ``_regN``) or with a test-time register (model
``<base>+ttr``) is an arrow from it, provided every setting that changes results is equal:
dataset and images, method and parameters, feature, layer, normalisation, position-embedding
interpolation and precision (``RunData.settings``). Published figures become rows of their own
(``source`` = published), never merged into ours.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from lostreg.datasets import DATASETS
from lostreg.fields import Fields
from lostreg.reports.leaderboard.published import VARIANTS, published_groups, variant_of
from lostreg.runs.store import RunData
from lostreg.runs.suites import PAPER_DATASETS
from lostreg.runs.summaries import paired_statistics

DATASET_LABELS = {"voc07": "VOC07", "voc12": "VOC12", "coco20k": "COCO20k"}
FAMILY_LABELS = {"dino": "DINO", "dinov2": "DINOv2", "dinov3": "DINOv3", "deit3": "DeiT-III",
                 "openclip": "OpenCLIP"}
TTR_SUFFIX = "+ttr"
NORMALIZE_LABELS = {"none": "no added normalisation", "l2": "L2-normalised"}

LEADERBOARD_COLUMNS = [
    "run_id", "model", "timm_name", "family", "registers", "test_time_registers", "params",
    "patch_size", "method", "method_params", "dataset", "split", "no_hard", "limit",
    "dataset_images", "feature",
    "layer", "normalize", "k", "gram_bias", "pos_interp", "precision",
    "refine", "mask_protocol",  # mask runs (saliency.py); empty for box runs
    "n_images", "n_hits", "corloc", "ci_low", "ci_high",
    "acc", "iou", "max_f",  # mask runs' saliency figures (saliency.py); empty for box runs
    "weights_source", "weights_sha256", "lostreg_version",
    "git_commit", "date", "seconds", "device", "smoke",
]
SETTING_COLUMNS = ["dataset", "split", "no_hard", "limit", "dataset_images", "method",
                   "method_params", "feature",
                   "layer", "normalize", "k", "gram_bias", "pos_interp", "precision", "smoke"]
COMPARISON_COLUMNS = [
    "source", "paper", "method", "method_params", "family", "backbone", "model", "model_reg",
    "registers", "dataset", "split", "no_hard", "limit", "dataset_images", "feature", "layer",
    "normalize", "k",
    "gram_bias", "pos_interp", "precision", "smoke", "protocol", "protocol_note", "verified",
    "n_images", "n_images_reg", "n_paired", "corloc", "ci_low", "ci_high", "corloc_reg",
    "ci_low_reg", "ci_high_reg", "diff", "diff_ci_low", "diff_ci_high", "miss_to_hit",
    "hit_to_miss", "mcnemar_p", "run_id", "run_id_reg", "citation",
]


SIZE_LABELS = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "giant": "g", "huge": "H",
               "7b": "7B"}
_SIZE = re.compile(r"(?:^|_)(tiny|small|base|large|giant|huge|7b)(_plus)?_patch(\d+)")


def backbone_label(family: str, timm_name: str | None) -> str:
    """``DINOv2 ViT-S/14`` from the family and timm's name (the published rows' style, so
    ours sort beside them); the family alone where the name does not say the size."""
    label = FAMILY_LABELS.get(family, family)
    match = _SIZE.search(timm_name or "")
    if match is None:
        return label
    size, plus, patch = match.groups()
    return f"{label} ViT-{SIZE_LABELS[size]}{'+' if plus else ''}/{patch}"


def dataset_rank(name: str) -> tuple[int, str]:
    return (PAPER_DATASETS.index(name) if name in PAPER_DATASETS else len(PAPER_DATASETS), name)


def _present(value: Any) -> bool:
    return value is not None and value is not pd.NA and not (
        isinstance(value, float) and math.isnan(value))


def _param_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_params_label(method: str, params: str | dict | None) -> str:
    """LOST's parameters as ``k=100, bias=0``; any other method's as ``name=value``."""
    if not _present(params):
        return ""
    values = json.loads(params) if isinstance(params, str) else dict(params)
    if method == "lost":
        shown = {"k": values.pop("k_patches", None), "bias": values.pop("gram_bias", None)}
        values = {**{k: v for k, v in shown.items() if v is not None}, **values}
    return ", ".join(f"{name}={_param_text(value)}" for name, value in values.items())


def partial_images(run: RunData) -> int | None:
    """The image count of a run on a partial dataset (``--allow-partial-dataset``: the split
    lists another number of images than the benchmark's), which its identity records; None for
    a run on the whole split."""
    identity = Fields(run.info.identity, f"{run.run_dir / 'config.json'} (identity)")
    return identity.integer("dataset_images", None, minimum=0, optional=True)


def run_settings(run: RunData) -> dict[str, Any]:
    """``RunData.settings`` and the partial dataset's image count: what must be equal for two
    runs to be compared, and what their rows show (a 12-image VOC07 run is never a VOC07 run)."""
    return {**run.settings(), "dataset_images": partial_images(run)}


def subset_words(row: dict[str, Any]) -> str:
    """``first 12`` for a ``--limit`` run, ``partial dataset: 12 of 5011 images`` for a run on
    a partial dataset: a run on part of a dataset, never comparable with a published figure;
    '' for a run on the whole split."""
    parts = []
    if _present(row.get("limit")):
        parts.append(f"first {int(row['limit'])}")
    if _present(row.get("dataset_images")):
        spec = DATASETS.get(str(row.get("dataset")))
        of = f" of {spec.expected_images}" if spec is not None and spec.expected_images else ""
        parts.append(f"partial dataset: {int(row['dataset_images'])}{of} images")
    return ", ".join(parts)


def is_subset(row: dict[str, Any]) -> bool:
    """Whether one of our rows is a run on part of a dataset (``subset_words``)."""
    return row.get("source") != "published" and bool(subset_words(row))


def settings_label(row: dict[str, Any]) -> str:
    """The protocol and settings of one of our rows, in words: the feature and the layer it
    comes from, normalisation, method parameters, interpolation, precision, and anything else
    that makes the row special (``no_hard``, a ``--limit``, smoke weights)."""
    layer = row.get("layer", -1)
    layer = -1 if not _present(layer) else int(layer)
    normalize = row.get("normalize") if _present(row.get("normalize")) else "none"
    pos = row.get("pos_interp") if _present(row.get("pos_interp")) else "original"
    method = row.get("method") if _present(row.get("method")) else "lost"
    params = row.get("method_params")
    if not _present(params) and _present(row.get("k")):  # rows of an older comparison.csv
        params = {"k_patches": int(row["k"]), "gram_bias": float(row["gram_bias"])}
    parts = [f"{row['feature']}", "last layer" if layer == -1 else f"layer {layer}",
             NORMALIZE_LABELS.get(normalize, f"normalize {normalize}"),
             method_params_label(method, params), f"pos {pos}", str(row["precision"])]
    if row.get("no_hard") is True or (_present(row.get("no_hard")) and bool(row["no_hard"])):
        parts.append("no_hard")
    parts.append(subset_words(row))
    if _present(row.get("smoke")) and bool(row["smoke"]):
        parts.append("SMOKE (random weights)")
    return ", ".join(part for part in parts if part)


def leaderboard_row(run: RunData) -> dict[str, Any]:
    """The leaderboard's row for one run, CorLoc recomputed from its predictions."""
    info, summary = run.info, run.summary
    return {
        "run_id": run.run_id, "model": info.model, "timm_name": info.timm_name,
        "family": info.family, "registers": info.num_registers,
        "test_time_registers": info.test_time_registers, "params": info.num_params,
        "patch_size": info.patch_size,
        **{key: value for key, value in run_settings(run).items() if key != "smoke"},
        "n_images": summary["n"], "n_hits": summary["n_hits"],
        "corloc": round(summary["corloc"], 4), "ci_low": round(summary["low"], 4),
        "ci_high": round(summary["high"], 4), "weights_source": info.weights_source,
        "weights_sha256": info.weights_sha256, "lostreg_version": info.lostreg_version,
        "git_commit": info.git_commit, "date": run.finished.isoformat(),
        "seconds": run.seconds, "device": info.device, "smoke": run.smoke,
    }


def leaderboard_frame(runs: Sequence[RunData]) -> pd.DataFrame:
    """Rows sorted by dataset (paper order first), method, CorLoc from best, then run id."""
    rows = sorted((leaderboard_row(run) for run in runs),
                  key=lambda r: (dataset_rank(r["dataset"]), r["method"], -r["corloc"],
                                 r["run_id"]))
    frame = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    for column in ("limit", "dataset_images", "params", "patch_size", "k"):
        frame[column] = frame[column].astype("Int64")
    return frame.reset_index(drop=True)


def base_model_name(model: str) -> str:
    """A ``+ttr`` model's base: the same weights without the test-time register."""
    return model[: -len(TTR_SUFFIX)] if model.endswith(TTR_SUFFIX) else model


def base_timm_name(timm_name: str) -> str:
    """The timm name with its register tag (and any ``+ttr``) removed: twins share it."""
    return re.sub(r"_reg\d+", "", base_model_name(timm_name))


def run_variant(run: RunData) -> str:
    return variant_of(run.info.num_registers, run.info.test_time_registers)


def _pair_key(run: RunData) -> tuple:
    settings = run_settings(run)
    return (run.info.family, base_timm_name(run.info.timm_name),
            *(repr(settings[key]) for key in SETTING_COLUMNS))


def find_pairs(runs: Sequence[Any], pair_key: Callable[[Any], tuple] | None = None
               ) -> tuple[list[tuple[Any, Any]], list[Any]]:
    """(baseline, variant) pairs, and the baselines that found no variant.

    A variant has the baseline's family and timm name (but for ``_regN``), trained registers
    and/or a test-time register, and the same settings (``pair_key``: the box runs' settings
    by default; mask runs pass theirs). One baseline may have several variants (trained
    registers *and* a test-time register: two arrows from one baseline). Where several runs
    fit one side (other weights files or versions), the newest is used.
    """
    key_of = pair_key or _pair_key

    def newest(candidates: list[Any]) -> Any:
        return max(candidates, key=lambda run: (run.finished, run.run_id))

    plain: dict[tuple, list[Any]] = {}
    variants: dict[tuple, dict[tuple[str, str], list[Any]]] = {}
    for run in runs:
        kind = run_variant(run)
        if kind == "none":
            plain.setdefault(key_of(run), []).append(run)
        else:
            variants.setdefault(key_of(run), {}).setdefault(
                (kind, run.info.model), []).append(run)
    pairs, unpaired = [], []
    for key in sorted(plain):
        base = newest(plain[key])
        twins = variants.get(key, {})
        for kind, model in sorted(twins, key=lambda k: (VARIANTS.index(k[0]), k[1])):
            pairs.append((base, newest(twins[(kind, model)])))
        if not twins:
            unpaired.append(base)
    return pairs, unpaired


def _our_row(run: RunData) -> dict[str, Any]:
    info, mine = run.info, run.summary
    settings = run_settings(run)
    return {"source": "ours", "paper": None, "family": info.family,
            "backbone": backbone_label(info.family, info.timm_name), "model": info.model,
            **settings, "protocol": settings_label(settings), "n_images": mine["n"],
            "corloc": mine["corloc"], "ci_low": mine["low"], "ci_high": mine["high"],
            "run_id": run.run_id}


def _protocol_note(base: RunData, other: RunData) -> str | None:
    """Say so where the two sides of one arrow were not measured identically: the same
    ``pos_interp`` setting can resolve to each model's own original interpolation."""
    if base.info.pos_interp != "original":  # an explicit mode is the same for both sides
        return None
    a, b = base.info.pos_resolved, other.info.pos_resolved
    if a and b and a != b:
        return f"position embeddings resampled differently: {a} vs {b}"
    return None


def pair_row(base: RunData, other: RunData) -> dict[str, Any]:
    """One arrow of ours: both CorLocs and the paired statistics on the images both scored
    (from the two runs' summaries when they cover the same images)."""
    paired = paired_statistics(base, other)
    mine, theirs = base.summary, other.summary
    return {**_our_row(base), "model_reg": other.info.model, "registers": run_variant(other),
            "protocol_note": _protocol_note(base, other), "n_images_reg": theirs["n"],
            "n_paired": paired.n_paired, "corloc_reg": theirs["corloc"],
            "ci_low_reg": theirs["low"], "ci_high_reg": theirs["high"],
            "diff": theirs["corloc"] - mine["corloc"], "diff_ci_low": paired.diff_low,
            "diff_ci_high": paired.diff_high, "miss_to_hit": paired.miss_to_hit,
            "hit_to_miss": paired.hit_to_miss, "mcnemar_p": paired.p_value,
            "run_id_reg": other.run_id}


def single_row(run: RunData) -> dict[str, Any]:
    """A baseline without a variant: only its own CorLoc."""
    return _our_row(run)


def published_rows(published: pd.DataFrame) -> list[dict[str, Any]]:
    """Published figures as comparison rows: each baseline alone when the paper gives no
    variant, else one row per variant (``baseline -> variant``, same paper and protocol)."""
    rows = []
    for group in published_groups(published):
        values = group["values"]
        base = values.get("none", float("nan"))
        common = {"source": "published", "paper": group["paper"], "method": group["method"],
                  "family": group["family"], "backbone": group["backbone"],
                  "model": group["model"], "dataset": group["dataset"],
                  "protocol": group["protocol"], "verified": group["verified"],
                  "citation": group["citation"], "corloc": base}
        kinds = [kind for kind in VARIANTS[1:] if kind in values]
        if not kinds:
            rows.append(common)
        for kind in kinds:
            reg = values[kind]
            rows.append({**common, "registers": kind, "corloc_reg": reg, "diff": reg - base})
    return rows


def comparison_frame(runs: Sequence[RunData], published: pd.DataFrame
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(comparison rows, our baselines without a variant).

    Comparison rows: our arrows, our variant-less baselines of a model and method some paper
    published, and every published figure as its own row.
    """
    pairs, unpaired = find_pairs(runs)
    rows = [pair_row(base, other) for base, other in pairs]
    singles = pd.DataFrame([single_row(run) for run in unpaired])
    cited = {(row["method"], row["model"]) for row in published_rows(published)}
    rows += [row for row in singles.to_dict("records") if (row["method"], row["model"]) in cited]
    rows += published_rows(published)
    return _sorted_comparison(pd.DataFrame(rows, columns=COMPARISON_COLUMNS), published), singles


def method_titles() -> dict[str, str]:
    """Each registered method's title by name, in registry order (the tables' order and
    labels). A registry with entries in this process (a run, a plugin) is the answer, as
    always; else the built-in entries read from their source (``registry.declared_methods``),
    so building a leaderboard never imports torch."""
    from lostreg.methods import registry

    if not registry.METHODS:
        declared = registry.declared_methods()
        if declared is not None:
            return declared
    from lostreg.methods import METHODS

    return {name: spec.title for name, spec in METHODS.items()}


def method_order(name: str) -> tuple[int, str]:
    """Registry order (LOST first), then any other method by name."""
    known = list(method_titles())
    return (known.index(name) if name in known else len(known), name)


def _sorted_comparison(frame: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    families = list(dict.fromkeys([*published["family"], *sorted(frame["family"].dropna())]))
    order = {
        "_method": frame["method"].map(method_order),
        "_family": frame["family"].map(families.index),
        "_base": frame["model"].map(base_model_name),
        "_source": frame["source"].map({"ours": 0, "published": 1}),
        "_paper": frame["paper"].map(repr),
        "_variant": frame["registers"].map(lambda v: VARIANTS.index(v) if _present(v) else -1),
        "_settings": frame["protocol"].map(repr),
        "_model_reg": frame["model_reg"].map(repr),
        "_dataset": frame["dataset"].map(dataset_rank),
    }
    return sorted_rows(frame, order, ("limit", "dataset_images", "layer", "k", "n_images",
                                      "n_images_reg", "n_paired", "miss_to_hit", "hit_to_miss"))


def sorted_rows(frame: pd.DataFrame, order: dict[str, pd.Series],
                whole_numbers: Sequence[str]) -> pd.DataFrame:
    """``frame`` sorted (stably) by the ``order`` keys, in their order, and those columns
    dropped; ``whole_numbers`` as nullable integers, so a CSV never writes ``5011.0``."""
    frame = frame.assign(**order).sort_values(list(order), kind="stable")
    frame = frame.drop(columns=list(order)).reset_index(drop=True)
    for column in whole_numbers:
        frame[column] = frame[column].astype("Int64")
    return frame


"""``analyze norms``: one pass over a dataset collecting per-token norms, then the statistics.

The pass runs the benchmark's own forward (same preprocessing, padding, batching by padded size
as ``lostreg.run``) and keeps, per image, only float16 token maps (norm per requested block,
neighbour similarity of the input patch embedding): never the images or the features. The
threshold needs the whole distribution, so statistics are computed after the pass from those
maps, which are also saved (``tokens.npz``, see :mod:`lostreg.reports.analysis.store`) for the failure
attribution and the visual report.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lostreg.backbones import Backbone, create_backbone, get_backbone_spec
from lostreg.datasets import default_data_root, load_dataset
from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.datasets.registry import image_protocol as dataset_image_protocol
from lostreg.errors import LostregError
from lostreg.features.pipeline import iterate_batches, resolve_device, set_numerics, use_device
from lostreg.io import atomic_write_json, read_json_object
from lostreg.reports.analysis import plots
from lostreg.reports.analysis.norms import nan_mean, neighbour_similarity, patch_token_norms, split_threshold
from lostreg.reports.analysis.store import TokenMaps
from lostreg.reports.analysis.tokens import block_outputs, resolve_layers
from lostreg.runs.config import SMOKE_NOTE
from lostreg.runs.folder import provenance

NORM_DEFINITION = (
    "L2 norm over channels of each patch token at the output of block <layer> (the residual "
    "stream after that block, BEFORE the model's final norm); class and register tokens are "
    "excluded; images go in as the dataset's runs feed them (image_protocol): 'pad', "
    "zero-padded to a multiple of the patch size, never resized, padding patches included as "
    "LOST sees them; or 'resize' (saliency sets), resized with LANCZOS to the nearest patch "
    "multiple as TokenCut's saliency code does. Norms are computed in float32 and stored as "
    "float16; every statistic here is computed from the stored float16 values."
)
SIMILARITY_DEFINITION = (
    "mean cosine similarity of a token's INPUT patch embedding (output of model.patch_embed, "
    "before position embeddings) to those of its existing 4 grid neighbours; compared between "
    "outlier and normal tokens of the primary layer (artifacts are expected in redundant "
    "background patches, i.e. higher similarity)"
)
THRESHOLD_DEFINITION = (
    "automatic: 2-component Gaussian mixture on log10(norm) over all patch tokens of the "
    "analysis, threshold at the posterior-0.5 point between the modes; no threshold (null, "
    "outlier_fraction 0) unless the modes are separated (Ashman's D >= 2), have a valley "
    "(density at threshold <= 0.5 x high-mode peak) and the high mode is a minority (<= 50%). "
    "Outliers are tokens with norm > threshold."
)


@dataclass
class NormsConfig:
    """Settings of one norms analysis (the same model/data options as ``lostreg.run``)."""

    model: str = "dinov2_reg4"
    dataset: str = "voc07"
    data_root: Path = dataclasses.field(default_factory=default_data_root)
    weights: str = "hub"
    device: str = "auto"
    limit: int | None = None
    layers: list[int] | None = None
    threshold: list[float] | None = None
    output: Path | None = None
    batch_size: int = 16
    num_workers: int | None = None
    no_hard: bool = False
    download: bool = True
    progress: bool = True
    ttr_neurons: Path | None = None  # the register neurons of a ``+ttr`` model


@dataclass
class NormsResult:
    output_dir: Path
    payload: dict
    maps: TokenMaps

    @property
    def summary(self) -> str:
        p = self.payload
        threshold = "none (unimodal)" if p["threshold"] is None else f"{p['threshold']:.4g}"
        line = (f"norms {p['model']} {p['dataset']}: block {p['primary_layer']}, threshold "
                f"{threshold}, outliers {p['outlier_fraction']:.3%} of {p['n_tokens']} tokens, "
                f"{p['images_with_outliers']}/{p['n_images']} images with outliers -> "
                f"{self.output_dir}")
        return line + (f"  [{SMOKE_NOTE}]" if p["smoke_run"] else "")


def default_output(model: str, dataset: str, smoke: bool = False, *, limit: int | None = None,
                   no_hard: bool = False, layers: Sequence[int] | None = None,
                   threshold: Sequence[float] | None = None,
                   weights_file: str | None = None) -> Path:
    """``results/analysis/[smoke-]<model>-<dataset>[-nohard][-firstN][-blocksA_B][-tT]
    [-w<sha>]``: the folder names everything that defines the analysis, so a second study
    (another ``--limit``, blocks, thresholds or weights file) never replaces the first; the
    defaults (all images, the last block, the automatic threshold, hub or random weights) add
    nothing, so the folder of a default study keeps its name. Random weights get ``smoke-``."""
    safe = model.replace(":", "_").replace("/", "_")
    name = f"{'smoke-' if smoke else ''}{safe}-{dataset}"
    if no_hard:
        name += "-nohard"
    if limit is not None:
        name += f"-first{limit}"
    if layers:
        name += "-blocks" + "_".join(str(layer) for layer in layers)
    if threshold:
        name += "-t" + "_".join(f"{value:g}" for value in threshold)
    if weights_file:
        name += f"-w{weights_file[:8]}"
    return Path("results/analysis") / name


def collect_token_maps(
    backbone: Backbone,
    records: Sequence[ImageRecord],
    layers: Sequence[int],
    device: torch.device,
    batch_size: int = 16,
    num_workers: int | None = None,
    progress: bool = False,
    image_protocol: str = "pad",
) -> tuple[TokenMaps, list[str]]:
    """Run ``backbone`` over ``records`` and keep float16 token maps in dataset order; the
    images go in as the dataset's runs feed them (``image_protocol``: padded, or resized to a
    patch multiple for a saliency set), so the maps are on the runs' patch grids.

    Returns the maps and the error messages of images that could not be read (skipped).
    """
    from tqdm.auto import tqdm

    model, npt = backbone.model, backbone.num_prefix_tokens
    per_image: dict[int, tuple[tuple[int, int], dict[int, np.ndarray], np.ndarray]] = {}
    errors: list[str] = []
    bar = tqdm(total=len(records), disable=not progress, desc=f"norms {backbone.spec.name}",
               unit="img", dynamic_ncols=True, file=sys.stderr)
    for loaded in iterate_batches(records, backbone, batch_size, num_workers, device,
                                  image_protocol=image_protocol):
        errors += loaded.errors
        for group in loaded.groups:
            images = group.images.to(device, non_blocking=True)
            embedded, outputs = block_outputs(model, images, layers)
            sims = neighbour_similarity(embedded).cpu()
            rows, cols = sims.shape[-2:]
            norms = {layer: patch_token_norms(outputs[layer], npt).cpu() for layer in layers}
            for layer, values in norms.items():
                if values.shape[1] != rows * cols:
                    raise LostregError(f"block {layer} gave {values.shape[1]} patch tokens for "
                                       f"a {rows}x{cols} grid; is num_prefix_tokens right?")
            for j, position in enumerate(group.positions):
                per_image[position] = (
                    (int(rows), int(cols)),
                    {layer: values[j].numpy().astype(np.float16) for layer, values in norms.items()},
                    sims[j].reshape(-1).numpy().astype(np.float16),
                )
        bar.update(loaded.n_items)
    bar.close()
    kept = sorted(per_image)
    maps = TokenMaps.from_images(
        [records[i].image_id for i in kept],
        [per_image[i][0] for i in kept],
        {layer: [per_image[i][1][layer] for i in kept] for layer in layers},
        [per_image[i][2] for i in kept],
    )
    return maps, errors


def layer_statistics(maps: TokenMaps, layer: int, threshold: float | None = None) -> dict:
    """Threshold (automatic unless given), outlier shares and the neighbour-similarity
    comparison of one layer; the per-image shares come back under ``per_image``."""
    values = maps.norms[layer].astype(np.float64)
    split = split_threshold(values)
    source = "manual" if threshold is not None else "auto"
    if threshold is None:
        threshold = split.threshold
    flags = values > threshold if threshold is not None else np.zeros(values.shape, bool)
    starts = maps.offsets[:-1]
    counts = np.diff(maps.offsets)
    n_out = np.add.reduceat(flags.astype(np.int64), starts) if len(maps) else np.zeros(0)
    sims = maps.neighbour_sim.astype(np.float64)
    outlier_sim, normal_sim = nan_mean(sims[flags]), nan_mean(sims[~flags])
    per_image = []
    for i, image_id in enumerate(maps.image_ids):
        segment = values[maps.offsets[i]:maps.offsets[i + 1]]
        per_image.append({
            "image_id": image_id,
            "grid": list(maps.grid(i)),
            "n_tokens": int(counts[i]),
            "n_outliers": int(n_out[i]),
            "outlier_share": float(n_out[i] / counts[i]),
            "max_norm": float(segment.max()),
            "median_norm": float(np.median(segment)),
        })
    n_tokens = int(values.size)
    shares = np.array([row["outlier_share"] for row in per_image]) if per_image else np.zeros(0)
    return {
        "layer": layer,
        "threshold": threshold,
        "threshold_source": source,
        "auto_split": split.to_json(),
        "n_tokens": n_tokens,
        "n_outliers": int(flags.sum()),
        "outlier_fraction": float(flags.mean()) if n_tokens else 0.0,
        "images_with_outliers": int((n_out > 0).sum()),
        "per_image_outlier_share": {
            "mean": float(shares.mean()) if shares.size else 0.0,
            "median": float(np.median(shares)) if shares.size else 0.0,
            "max": float(shares.max()) if shares.size else 0.0,
        },
        "norm_quantiles": {
            q: float(np.quantile(values, float(q))) for q in ("0.01", "0.5", "0.99", "1.0")
        } if n_tokens else {},
        "neighbour_similarity": {
            "definition": SIMILARITY_DEFINITION,
            "outlier_mean": outlier_sim,
            "normal_mean": normal_sim,
            "difference": (outlier_sim - normal_sim
                           if outlier_sim is not None and normal_sim is not None else None),
            "n_outlier": int(np.isfinite(sims[flags]).sum()),
            "n_normal": int(np.isfinite(sims[~flags]).sum()),
        },
        "per_image": per_image,
    }


def thresholds_for(layers_given: Sequence[int] | None, resolved: list[int], depth: int,
                   threshold: Sequence[float] | None) -> dict[int, float | None]:
    """Map ``--threshold`` (one value for every layer, or one per ``--layers`` entry in the
    given order) to resolved layers."""
    if not threshold:
        return {layer: None for layer in resolved}
    if any(not np.isfinite(t) or t <= 0 for t in threshold):
        raise LostregError(f"--threshold {list(threshold)}: norms thresholds must be positive")
    if len(threshold) == 1:
        return {layer: float(threshold[0]) for layer in resolved}
    given = list(layers_given) if layers_given else [depth - 1]
    if len(threshold) != len(given):
        raise LostregError(f"--threshold has {len(threshold)} values for {len(given)} layers; "
                           "give one value, or one per --layers entry")
    out: dict[int, float | None] = {}
    for layer, value in zip(given, threshold, strict=True):
        out[layer % depth] = float(value)
    return out


def build_payload(backbone: Backbone, index: DatasetIndex, maps: TokenMaps, layers: list[int],
                  thresholds: dict[int, float | None], limit: int | None, device: torch.device,
                  skipped: list[str]) -> dict:
    """The ``norms.json`` content; top-level statistics are those of the primary (deepest)
    requested layer, ``per_layer`` holds every layer's."""
    primary = max(layers)
    per_layer = {layer: layer_statistics(maps, layer, thresholds.get(layer)) for layer in layers}
    main = per_layer[primary]
    payload = {
        "kind": "lostreg-norms",
        **provenance(backbone, index, device),
        "image_protocol": dataset_image_protocol(index.name),
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "depth": backbone.depth,
        "limit": limit,
        "n_images": len(maps),
        "skipped_images": skipped,
        "layers": layers,
        "primary_layer": primary,
        "norm_definition": NORM_DEFINITION,
        "threshold_definition": THRESHOLD_DEFINITION,
        "threshold": main["threshold"],
        "threshold_source": main["threshold_source"],
        "auto_split": main["auto_split"],
        "n_tokens": main["n_tokens"],
        "n_outliers": main["n_outliers"],
        "outlier_fraction": main["outlier_fraction"],
        "images_with_outliers": main["images_with_outliers"],
        "per_image_outlier_share": main["per_image_outlier_share"],
        "neighbour_similarity": main["neighbour_similarity"],
        "per_image": main["per_image"],
        "per_layer": {str(layer): {k: v for k, v in stats.items() if k != "per_image"}
                      for layer, stats in per_layer.items()},
        "tokens_file": "tokens.npz",
        "tokens_format": "numpy .npz: image_ids, grids (n,2), offsets (n+1), layers, "
                         "norms_<layer> and neighbour_sim as flat float16 arrays; image i = "
                         "[offsets[i], offsets[i+1]) row-major on grids[i]",
    }
    return payload


def write_outputs(output_dir: Path, payload: dict, maps: TokenMaps) -> None:
    """Token maps, one histogram per layer, the similarity figure, then ``norms.json`` last
    (its presence means the analysis is complete)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    maps.save(output_dir / payload["tokens_file"])
    smoke = bool(payload["smoke_run"])
    figures = []
    for key, stats in payload["per_layer"].items():
        name = f"norm_hist_block{key}.png"
        plots.norm_histogram(
            output_dir / name, maps.norms[int(key)].astype(np.float64), stats["threshold"],
            f"{payload['model']} on {payload['dataset']} ({payload['n_images']} images): "
            f"patch-token norms, output of block {key}", smoke)
        figures.append(name)
    layer = payload["primary_layer"]
    if payload["threshold"] is not None:
        values = maps.norms[layer].astype(np.float64)
        flags = values > payload["threshold"]
        sims = maps.neighbour_sim.astype(np.float64)
        plots.similarity_histogram(
            output_dir / "neighbour_similarity.png", sims[flags], sims[~flags],
            f"{payload['model']}: input-embedding similarity to neighbours (block {layer} "
            "outliers vs normal)", smoke)
        figures.append("neighbour_similarity.png")
    payload["figures"] = figures
    atomic_write_json(output_dir / "norms.json", payload, undefined_as_null=True)


def analyze_norms(config: NormsConfig, backbone: Backbone | None = None,
                  index: DatasetIndex | None = None,
                  records: Sequence[ImageRecord] | None = None) -> NormsResult:
    """Run the norms analysis end to end; ``records`` restricts it to given images."""
    if config.batch_size < 1:
        raise LostregError("--batch-size must be at least 1")
    if config.limit is not None and config.limit < 1:
        raise LostregError("--limit must be at least 1")
    device = resolve_device(config.device)
    use_device(device)
    set_numerics("fp32")
    spec = (backbone.spec if backbone is not None
            else get_backbone_spec(config.model, ttr_neurons=config.ttr_neurons))
    if index is None:
        index = load_dataset(config.dataset, config.data_root, no_hard=config.no_hard,
                             download=config.download)
    if backbone is None:
        backbone = create_backbone(spec, config.weights, device)
    depth = backbone.depth
    layers = resolve_layers(config.layers, depth)
    thresholds = thresholds_for(config.layers, layers, depth, config.threshold)
    if backbone.weights.is_random:
        print(f"warning: {SMOKE_NOTE}", file=sys.stderr)
    if records is None:
        records = index.records[: config.limit] if config.limit else index.records
    if not records:
        raise LostregError(f"dataset {index.name} ({index.root}) has no images to analyse")
    maps, skipped = collect_token_maps(backbone, list(records), layers, device,
                                       config.batch_size, config.num_workers, config.progress,
                                       dataset_image_protocol(index.name))
    for message in skipped:
        print(f"warning: skipped {message}", file=sys.stderr)
    if not len(maps):
        raise LostregError(f"no image of {index.name} could be read ({skipped[0]})")
    payload = build_payload(backbone, index, maps, layers, thresholds, config.limit, device,
                            skipped)
    output_dir = Path(config.output) if config.output is not None else default_output(
        spec.name, index.name, backbone.weights.is_random, limit=config.limit,
        no_hard=config.no_hard, layers=layers if config.layers is not None else None,
        threshold=config.threshold,
        weights_file=backbone.weights.sha256 if backbone.weights.source == "file" else None)
    write_outputs(output_dir, payload, maps)
    return NormsResult(output_dir, payload, maps)


def load_norms(path: str | Path) -> tuple[dict, TokenMaps]:
    """Read a ``norms.json`` and the token maps it points to."""
    path = Path(path)
    if path.is_dir():
        path = path / "norms.json"
    payload = read_json_object(path, "norms.json not found (run `python -m lostreg.analyze norms`)")
    missing = [k for k in ("kind", "model", "primary_layer", "threshold", "tokens_file")
               if not isinstance(payload, dict) or k not in payload]
    if missing or payload.get("kind") != "lostreg-norms":
        raise LostregError(f"{path}: not a lostreg norms.json (missing {', '.join(missing)})")
    maps = TokenMaps.load(path.parent / payload["tokens_file"])
    if int(payload["primary_layer"]) not in maps.norms:
        raise LostregError(f"{path}: token maps lack block {payload['primary_layer']}")
    return payload, maps

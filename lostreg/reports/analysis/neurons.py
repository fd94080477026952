"""``analyze register-neurons``: find the MLP neurons that write a model's high-norm outliers.

As ``find_register_neurons`` of Jiang et al. (2025), ``shared/algorithms.py`` of
github.com/nickjiang2378/test-time-registers:

1. per image, the outlier tokens are those whose norm at the output of block
   ``outlier_layer`` (before the final norm) is **strictly above** the threshold; images
   without any outlier are skipped;
2. every MLP neuron of every layer gets the mean **absolute** hidden activation over that
   image's outlier tokens;
3. scores are averaged over the images that had outliers; the (layer, neuron) pairs are ranked
   by score (ties: lower layer, then lower neuron first), and the ``top_k`` best among layers
   ``<= highest_layer`` are kept.

Their DINOv2 ViT-L/14 settings (``configs/dinov2_large.yaml``): ``detect_outliers_layer -2``
(the second-to-last block's output), threshold 150, highest layer 17; the published list has 45
neurons (the config says top_k 50). The threshold defaults to the norm analysis' automatic split
(:func:`lostreg.reports.analysis.norms.split_threshold` over the patch tokens at ``outlier_layer``).
Like their code, outlier tokens are taken among **all** tokens (class and register tokens too)
unless ``outlier_tokens="patches"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lostreg
from lostreg.backbones import Backbone, create_backbone
from lostreg.backbones.registry import split_modifiers
from lostreg.backbones.ttr import NEURON_FILE_KIND, parse_neuron_list
from lostreg.datasets import default_data_root, load_dataset
from lostreg.datasets.base import DatasetIndex
from lostreg.datasets.registry import image_protocol as dataset_image_protocol
from lostreg.errors import LostregError
from lostreg.features.extract import resolve_layer, run_taps
from lostreg.io import atomic_write_json

OUTLIER_TOKENS = ("all", "patches")


@dataclass
class NeuronSearchConfig:
    """Settings of one register-neuron search (model/data options as ``analyze norms``)."""

    model: str
    output: Path
    dataset: str = "voc07"
    data_root: Path = dataclasses.field(default_factory=default_data_root)
    weights: str = "hub"
    device: str = "auto"
    limit: int | None = None
    outlier_layer: int = -2
    threshold: float | None = None
    top_k: int = 45
    highest_layer: int | None = None
    outlier_tokens: str = "all"
    batch_size: int = 16
    num_workers: int | None = None
    no_hard: bool = False
    download: bool = True
    progress: bool = True


@dataclass
class NeuronScores:
    """Mean absolute activation per (layer, neuron) over outlier tokens, averaged over images."""

    scores: torch.Tensor  # (layers, hidden) float64
    images_with_outliers: int
    images: int
    outlier_tokens: int


def _outlier_masks(backbone: Backbone, images: torch.Tensor, layer: int, threshold: float,
                   tokens: str) -> torch.Tensor:
    """``(B, T)`` outlier masks over the model's tokens (test-time registers never count)."""
    taps = run_taps(backbone.model, images, outputs=[layer], family=backbone.family)
    output = taps.outputs[layer].float()
    norms = torch.linalg.vector_norm(output, dim=-1)
    mask = norms > threshold
    if tokens == "patches":
        mask[:, :backbone.num_prefix_tokens] = False
    if backbone.num_suffix_tokens:
        mask[:, mask.shape[1] - backbone.num_suffix_tokens:] = False
    return mask


def score_batch(backbone: Backbone, images: torch.Tensor, outlier_layer: int, threshold: float,
                layers: int, tokens: str = "all") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per image of ``images``: ``(B, layers, hidden)`` mean |activation| over its outlier
    tokens for the first ``layers`` blocks, which images had outliers ``(B,)``, and the number
    of outlier tokens. Two forwards: the masks must be known before the activations arrive."""
    mask = _outlier_masks(backbone, images, outlier_layer, threshold, tokens)
    counts = mask.sum(dim=1)
    weights = mask.to(torch.float64) / counts.clamp(min=1)[:, None].to(torch.float64)
    model, family = backbone.model, backbone.family
    per_layer: dict[int, torch.Tensor] = {}

    def reduce(index: int):
        def hook(_module, _inputs, output):  # (B, T, hidden) -> (B, hidden), never stored whole
            per_layer[index] = torch.einsum("bt,bth->bh", weights, output.abs().to(torch.float64))
        return hook

    blocks = family.blocks(model)
    handles = [family.neuron_module(blocks[i]).register_forward_hook(reduce(i))
               for i in range(layers)]
    try:
        run_taps(model, images, outputs=[layers - 1], family=family)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([per_layer[i] for i in range(layers)], dim=1), counts > 0, int(counts.sum())


def accumulate_scores(backbone: Backbone, batches: Iterable[torch.Tensor], outlier_layer: int,
                      threshold: float, layers: int, tokens: str = "all") -> NeuronScores:
    """:func:`score_batch` over ``batches``, averaged over the images that had outliers."""
    total: torch.Tensor | None = None
    with_outliers = images = outlier_count = 0
    with torch.inference_mode():
        for batch in batches:
            scores, has, count = score_batch(backbone, batch, outlier_layer, threshold, layers,
                                             tokens)
            kept = scores[has].sum(dim=0)
            total = kept if total is None else total + kept
            with_outliers += int(has.sum())
            images += batch.shape[0]
            outlier_count += count
    if total is None or not with_outliers:
        raise LostregError(f"no image has a token above norm {threshold:g} at block "
                           f"{outlier_layer}: lower --threshold or use more images")
    return NeuronScores(total / with_outliers, with_outliers, images, outlier_count)


def rank_neurons(scores: torch.Tensor, top_k: int, highest_layer: int) -> list[tuple[int, int, float]]:
    """The ``top_k`` (layer, neuron, score) with layer <= ``highest_layer``, best first; ties
    go to the lower layer, then the lower neuron (a stable sort of the row-major scores)."""
    eligible = scores[:highest_layer + 1].flatten()
    order = torch.sort(eligible, descending=True, stable=True).indices[:top_k]
    hidden = scores.shape[1]
    return [(int(i) // hidden, int(i) % hidden, float(eligible[i])) for i in order]


def neuron_file(ranked: list[tuple[int, int, float]], provenance: dict) -> dict:
    """The neuron list in the shipped format (:mod:`lostreg.backbones.ttr`), best first within
    each layer, with each neuron's score and the search's provenance."""
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for layer, neuron, score in ranked:
        by_layer.setdefault(layer, []).append((neuron, score))
    data = {
        "kind": NEURON_FILE_KIND, "format": 1, "write": "signed_max",
        "model": provenance.get("model"), "timm_name": provenance.get("timm_name"),
        "neurons": {str(layer): [n for n, _ in items] for layer, items in sorted(by_layer.items())},
        "scores": {str(layer): [round(s, 6) for _, s in items]
                   for layer, items in sorted(by_layer.items())},
        "provenance": provenance,
    }
    parse_neuron_list(data, "register-neurons output")  # what we write must read back
    return data


def _threshold_from_norms(backbone: Backbone, records, layer: int, device: torch.device,
                          config: NeuronSearchConfig, image_protocol: str) -> float:
    """The norm analysis' automatic split at ``layer`` (patch tokens)."""
    from lostreg.reports.analysis.collect import collect_token_maps
    from lostreg.reports.analysis.norms import split_threshold

    maps, _ = collect_token_maps(backbone, records, [layer], device, config.batch_size,
                                 config.num_workers, config.progress, image_protocol)
    split = split_threshold(maps.norms[layer].astype(np.float64))
    if split.threshold is None:
        raise LostregError(f"the patch-token norms at block {layer} are not bimodal ({split.reason}): "
                           "no outliers to explain; pass --threshold to force one")
    return float(split.threshold)


def find_register_neurons(config: NeuronSearchConfig, backbone: Backbone | None = None,
                          index: DatasetIndex | None = None) -> tuple[dict, str]:
    """Run the search end to end, write ``config.output``; returns the file's content and a
    one-line summary (``backbone``/``index`` given: used instead of ``config.model/dataset``)."""
    from lostreg.features.pipeline import iterate_batches, resolve_device, set_numerics, use_device
    from lostreg.runs.folder import provenance

    if config.outlier_tokens not in OUTLIER_TOKENS:
        raise LostregError(f"--outlier-tokens must be one of {', '.join(OUTLIER_TOKENS)}")
    if config.top_k < 1:
        raise LostregError("--top-k must be at least 1")
    device = resolve_device(config.device)
    use_device(device)
    set_numerics("fp32")
    if backbone is None:
        if "ttr" in split_modifiers(config.model)[1]:
            raise LostregError(f"--model {config.model}: find neurons on the model without +ttr")
        backbone = create_backbone(config.model, config.weights, device)
    if backbone.num_suffix_tokens:
        raise LostregError(f"--model {config.model}: find neurons on the model without +ttr")
    depth = backbone.depth
    outlier_layer = resolve_layer(config.outlier_layer, depth)
    highest = depth - 1 if config.highest_layer is None else config.highest_layer
    if not 0 <= highest < depth:
        raise LostregError(f"--highest-layer {highest}: the model has {depth} blocks")
    if index is None:
        index = load_dataset(config.dataset, config.data_root, no_hard=config.no_hard,
                             download=config.download)
    records = list(index.records[: config.limit] if config.limit else index.records)
    if not records:
        raise LostregError(f"dataset {index.name} ({index.root}) has no images")
    # the images go in as the dataset's runs feed them (a saliency set's are resized to a patch
    # multiple, not padded), so the outliers are those of the runs the neurons will serve
    protocol = dataset_image_protocol(index.name)
    threshold = (config.threshold if config.threshold is not None
                 else _threshold_from_norms(backbone, records, outlier_layer, device, config,
                                            protocol))

    def batches():
        for loaded in iterate_batches(records, backbone, config.batch_size, config.num_workers,
                                      device, image_protocol=protocol):
            for group in loaded.groups:
                yield group.images.to(device)

    found = accumulate_scores(backbone, batches(), outlier_layer, threshold, highest + 1,
                              config.outlier_tokens)
    ranked = rank_neurons(found.scores, config.top_k, highest)
    info = provenance(backbone, index, device)
    data = neuron_file(ranked, {
        "model": backbone.spec.name, "timm_name": backbone.spec.timm_name,
        "weights": info.get("weights"), "smoke_run": backbone.weights.is_random,
        "dataset": index.name, "split": index.split, "limit": config.limit,
        "n_images": found.images, "images_with_outliers": found.images_with_outliers,
        "outlier_tokens_found": found.outlier_tokens, "outlier_layer": outlier_layer,
        "threshold": threshold,
        "threshold_source": "manual" if config.threshold is not None else "auto (norm analysis)",
        "outlier_tokens": config.outlier_tokens, "top_k": config.top_k,
        "highest_layer": highest, "method": "Jiang et al. 2025, find_register_neurons",
        "lostreg_version": lostreg.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    Path(config.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config.output, data, undefined_as_null=True)
    best = ranked[0]
    summary = (f"register neurons of {backbone.spec.name}: {len(ranked)} neurons in layers "
               f"{min(r[0] for r in ranked)}-{max(r[0] for r in ranked)} (best: layer {best[0]} "
               f"neuron {best[1]}, score {best[2]:.4g}) from {found.images_with_outliers}/"
               f"{found.images} images with tokens above {threshold:.4g} at block {outlier_layer}"
               f" -> {config.output}")
    if backbone.weights.is_random:
        print("warning: random weights: these neurons explain nothing about a trained model",
              file=sys.stderr)
    return data, summary

"""``python -m lostreg.run``: LOST CorLoc of backbones on datasets, resumable, at scale.

Stages: dataset index -> DataLoader (workers decode and pad while the model runs; batches hold
images of one padded size, so batching changes no result) -> last-layer q/k/v -> batched LOST
on the device -> CorLoc. Every batch's predictions are appended durably to
``predictions.jsonl``; a rerun of the same settings skips what is already written.

At scale (see the README section "Scale"):

* one command runs a grid (``--model a,b --dataset voc07,voc12 --features k,v``) or the paper
  suite (``--suite paper``): each model is built once, each dataset indexed once;
* ``--gram-bias 0,0.1`` / ``--k-patches 50,100`` sweeps run LOST for every setting in one
  pass over the images (the backbone runs once per image), one run folder per setting;
* ``--cache-features`` stores the backbone's features per image, so a later pass over cached
  images never builds the model (the run id only needs the weights' hash);
* under ``torchrun`` each rank computes every N-th missing image and writes its own part;
  rank 0 merges them into the same ``predictions.jsonl`` one process writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import lostreg
from lostreg import distributed
from lostreg.backbones import (
    Backbone,
    BackboneSpec,
    WeightsInfo,
    build_model,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    normalisation,
    resolve_weights,
)
from lostreg.cache import (
    CACHE_DTYPES,
    DEFAULT_CACHE_DIR,
    BackgroundWriter,
    CacheProblem,
    FeatureCache,
    cache_key,
    file_size,
    is_lossless,
    prefetch,
    storage_dtype,
    to_storage,
    warn,
)
from lostreg.cli import HelpFormatter, add_compute_options
from lostreg.datasets import DATASETS, default_data_root, get_dataset, load_dataset
from lostreg.datasets.base import DatasetIndex, ImageRecord, load_rgb
from lostreg.distributed import CollectiveError, DistContext
from lostreg.errors import LostregError, error_line
from lostreg.features import extract_feature_kinds, padded_size, preprocess
from lostreg.io import JsonlAppender, atomic_write_json, read_jsonl
from lostreg.methods.lost import lost
from lostreg.metrics import best_iou, corloc, is_hit

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE_NOTE = "SMOKE RUN (weights: random): not a result, never enters the leaderboard"
SUITES = ("paper",)


@dataclass
class RunConfig:
    """Every setting of one run; the ones that change results define its run id.

    ``cache_features`` (a folder) turns the feature cache on; ``cache_dtype`` is how features
    are stored there (``auto``: exactly as the backbone produced them, see ``lostreg.cache``).
    """

    model: str = "dinov2_reg4"
    dataset: str = "voc07"
    data_root: Path = field(default_factory=default_data_root)
    weights: str = "hub"
    features: str | None = None
    k_patches: int = 100
    gram_bias: float = 0.0
    no_hard: bool = False
    device: str = "auto"
    batch_size: int = 16
    limit: int | None = None
    output: Path = Path("results/runs")
    precision: str = "fp32"
    download: bool = True
    num_workers: int | None = None  # None: decode_workers(device)
    progress: bool = True
    cache_features: Path | None = None
    cache_dtype: str = "auto"
    allow_partial_dataset: bool = False


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    corloc: float
    n_images: int
    n_hits: int
    smoke: bool
    summary: str


# --- environment ---------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LostregError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise LostregError(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LostregError(f"--device {name!r}: expected auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise LostregError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                           "CUDA device(s), numbered from 0")
    return device


def use_device(device: torch.device) -> None:
    """Make ``cuda:N`` the current CUDA device: the DataLoader's pin-memory thread (and any
    CUDA call without an explicit device) otherwise creates a context on GPU 0 as well."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def set_numerics(precision: str) -> dict:
    """No TF32 in matmuls or cuDNN convolutions, whatever the precision: fp32 is exact fp32,
    and LOST's similarities are float32 matmuls in every run (with bf16/fp16 the backbone's
    matmuls and its patch embedding run in that dtype under autocast, so TF32 would only have
    rounded LOST's ``F F^T``)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {
        "precision": precision,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "lost_similarity_dtype": "float32",
        "lost_sum_dtype": "float64",
    }


def git_commit() -> str | None:
    """The commit of the lostreg checkout, with ``-dirty`` when it has local changes."""
    repo = Path(lostreg.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


# --- data ----------------------------------------------------------------------------------


class PaddedImages(Dataset):
    """Decode + normalise + pad one record; errors come back as data, not exceptions, so one
    bad file never loses the batch around it."""

    def __init__(self, records: Sequence[ImageRecord], mean, std, patch_size: int) -> None:
        self.records = records
        self.mean, self.std, self.patch_size = mean, std, patch_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        record = self.records[position]
        try:
            tensor, size = preprocess(load_rgb(record.path), self.mean, self.std, self.patch_size)
        except LostregError as exc:
            return {"position": position, "error": str(exc)}
        return {"position": position, "tensor": tensor, "size": size, "error": None}


def size_batches(records: Sequence[ImageRecord], patch_size: int,
                 batch_size: int) -> list[list[int]]:
    """Batches of positions whose images share one padded size (from the annotated size),
    in dataset order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        groups[padded_size(record.height, record.width, patch_size)].append(position)
    return [members[i:i + batch_size] for members in groups.values()
            for i in range(0, len(members), batch_size)]


@dataclass
class ImageGroup:
    """Decoded images of one padded shape, stacked (``(b, 3, Hp, Wp)``) in a loader worker."""

    positions: list[int]
    images: torch.Tensor
    sizes: list[tuple[int, int]]


@dataclass
class LoadedBatch:
    """One sampler batch as the loader hands it over: stacked groups and per-image errors.

    Stacking happens in the worker, so the main process (which drives the model) does not
    copy images; ``pin_memory`` lets the DataLoader pin the stacks for async host-to-GPU copies.
    """

    groups: list[ImageGroup]
    errors: list[str]
    n_items: int

    def pin_memory(self) -> LoadedBatch:
        for group in self.groups:
            group.images = group.images.pin_memory()
        return self


def collate_by_shape(items: list[dict]) -> LoadedBatch:
    """Stack decoded items by their actual padded shape (the annotated size may be wrong, so
    one sampler batch can hold several shapes), in batch order; bad images become errors."""
    groups: dict[tuple[int, ...], list[dict]] = defaultdict(list)
    errors = []
    for item in items:
        if item["error"]:
            errors.append(item["error"])
        else:
            groups[tuple(item["tensor"].shape)].append(item)
    return LoadedBatch(
        [ImageGroup([item["position"] for item in group],
                    torch.stack([item["tensor"] for item in group]),
                    [tuple(item["size"]) for item in group]) for group in groups.values()],
        errors, len(items))


def decode_workers(device: torch.device) -> int:
    """Default decoding processes. With the model on the CPU, its forward already keeps every
    core busy and workers only compete with it (on 2 cores: 0 workers ran 0.95x a bare
    forward loop, 1-2 workers 0.80x, see benchmarks/README.md), so decode in the main
    process; on a GPU the cores are free to decode ahead of the forward."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def iterate_batches(records: Sequence[ImageRecord], backbone: Backbone, batch_size: int,
                    num_workers: int | None, device: torch.device) -> Iterator[LoadedBatch]:
    """Yield the records' images decoded, padded and stacked by shape, batch by batch
    (``num_workers=None``: ``decode_workers(device)``)."""
    if num_workers is None:
        num_workers = decode_workers(device)
    dataset = PaddedImages(records, backbone.mean, backbone.std, backbone.patch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=size_batches(records, backbone.patch_size, batch_size),
        collate_fn=collate_by_shape,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    yield from loader


# --- backbones, built only when an image needs them ---------------------------------------


@dataclass
class BackboneInfo:
    """What a run's identity and config.json need about a backbone, known without building
    it: a pass whose images are all cached never creates the model."""

    spec: BackboneSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsInfo
    num_prefix_tokens: int
    num_params: int

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size


def describe_backbone(spec: BackboneSpec, weights: str) -> BackboneInfo:
    """The backbone's identity without its weights in memory: hub weights are resolved (and
    downloaded if needed) and hashed, a file is hashed, ``random`` is ``random``; shapes and
    the parameter count come from a model built on the meta device (no memory)."""
    info, _ = resolve_weights(spec, weights)
    try:
        model = build_model(spec, meta=True)
    except Exception:  # noqa: BLE001 - some models cannot be built on meta: build them for real
        model = build_model(spec)
    mean, std = normalisation(spec)
    return BackboneInfo(spec, mean, std, info, int(model.num_prefix_tokens),  # type: ignore[arg-type]
                        sum(p.numel() for p in model.parameters()))


class _LazyBackbone:
    """The backbone of one model, created on first use and then shared by every dataset."""

    def __init__(self, info: BackboneInfo | Backbone, weights: str, device: torch.device,
                 backbone: Backbone | None = None) -> None:
        self.info, self.weights, self.device = info, weights, device
        self._backbone = backbone

    def get(self) -> Backbone:
        if self._backbone is None:
            self._backbone = create_backbone(self.info.spec, self.weights, self.device)
            if self._backbone.weights.identity() != self.info.weights.identity():
                raise LostregError(f"{self._backbone.weights.path}: weights changed since the "
                                   "run started (sha256 differs); rerun the command")
        return self._backbone

    def release(self) -> None:
        self._backbone = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --- the run -------------------------------------------------------------------------------


def run_identity(config: RunConfig, backbone: Backbone | BackboneInfo, index: DatasetIndex,
                 feature: str) -> dict:
    """The settings that decide the results; their hash names the run directory."""
    return {
        "lostreg_version": lostreg.__version__,
        "model": backbone.spec.name,
        "timm_name": backbone.spec.timm_name,
        "pos_embed": backbone.spec.pos_embed,
        "weights": backbone.weights.identity(),
        "dataset": index.name,
        "split": index.split,
        "no_hard": index.no_hard,
        "limit": config.limit,
        "feature": feature,
        "k_patches": config.k_patches,
        "gram_bias": float(config.gram_bias),
        "precision": config.precision,
        **({"dataset_images": len(index)} if not dataset_is_complete(index) else {}),
    }


def dataset_is_complete(index: DatasetIndex) -> bool:
    """True unless a registry dataset (VOC07: 5011, VOC12: 11540, COCO20k: 19817 images) has
    another image count; ``--no-hard`` indexes are smaller by design and not checked."""
    spec = DATASETS.get(index.name)
    expected = spec.expected_images if spec is not None else None
    return expected is None or index.no_hard or len(index) == expected


def check_dataset_complete(index: DatasetIndex, allow_partial: bool) -> None:
    """Every image counts in CorLoc, so a run on an incomplete dataset is refused unless asked
    for; such a run gets its own run id (``dataset_images`` in its identity)."""
    if allow_partial or dataset_is_complete(index):
        return
    expected = DATASETS[index.name].expected_images
    raise LostregError(
        f"{index.root}: {index.name} {index.split} lists {len(index)} images, expected {expected} "
        "(incomplete download or modified split file?); fix the data, or pass "
        "--allow-partial-dataset for a run that is not comparable with published figures"
    )


def make_run_id(identity: dict, smoke: bool) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    model = identity["model"].replace(":", "_").replace("/", "_")
    prefix = "smoke-" if smoke else ""
    return f"{prefix}{identity['dataset']}-{model}-{identity['feature']}-{digest}"


def prediction_record(record: ImageRecord, box: list[int], seed_rc: tuple[int, int],
                      index_root: Path, smoke: bool) -> dict:
    iou = best_iou(box, record.boxes_array())
    try:
        file = str(record.path.relative_to(index_root))
    except ValueError:
        file = str(record.path)
    line = {
        "image_id": record.image_id,
        "file": record.extra.get("file", file),
        "width": record.width,
        "height": record.height,
        "box": box,
        "seed": list(seed_rc),
        "gt_boxes": [list(b) for b in record.boxes],
        "best_iou": round(iou, 6),
        "hit": is_hit(iou),
    }
    if smoke:
        line["weights"] = "random"
    return line


def provenance(backbone: Backbone | BackboneInfo, index: DatasetIndex,
               device: torch.device) -> dict:
    """What every artefact records to be traceable to its inputs: model, weights (sha256),
    dataset, code version, library versions, device; plus the smoke flag and note."""
    import timm

    smoke = backbone.weights.is_random
    return {
        "model": backbone.spec.name,
        "timm_name": backbone.spec.timm_name,
        "family": backbone.spec.family,
        "patch_size": backbone.spec.patch_size,
        "num_registers": backbone.spec.num_registers,
        "num_params": backbone.num_params,
        "pos_embed_interpolation": backbone.spec.pos_embed,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "weights": dataclasses.asdict(backbone.weights),
        "smoke_run": smoke,
        "dataset": index.name,
        "split": index.split,
        "data_root": os.path.abspath(index.root),
        "no_hard": index.no_hard,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "lostreg_version": lostreg.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": sys.version.split()[0],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"note": SMOKE_NOTE} if smoke else {}),
    }


def write_config(run_dir: Path, config: RunConfig, identity: dict,
                 backbone: Backbone | BackboneInfo, index: DatasetIndex, device: torch.device,
                 numerics: dict, run_id: str, extra: dict | None = None) -> dict:
    payload = {
        "run_id": run_id,
        "identity": identity,
        # paths absolute: analyze, verify and the notebook read them from any directory
        "settings": {k: (os.path.abspath(v) if isinstance(v, Path) else v)
                     for k, v in dataclasses.asdict(config).items()},
        **provenance(backbone, index, device),
        "feature": identity["feature"],
        "k_patches": config.k_patches,
        "gram_bias": float(config.gram_bias),
        "precision": config.precision,
        "numerics": numerics,
        **(extra or {}),
    }
    atomic_write_json(run_dir / "config.json", payload)
    return payload


def _finalize(run_dir: Path, index_records: Sequence[ImageRecord], run_id: str, smoke: bool,
              summary_fields: dict, seconds: dict) -> tuple[float, int, int]:
    """Merge predictions (the file and any per-rank parts) in dataset order, so a resumed or
    distributed run's file equals an uninterrupted one's, and write metrics.json atomically."""
    ordered = distributed.merge_predictions(run_dir, [r.image_id for r in index_records])
    score, n_hits, n_images = corloc(line["hit"] for line in ordered)
    metrics = {
        "run_id": run_id,
        "corloc": round(score, 4),
        "n_images": n_images,
        "n_hits": n_hits,
        "smoke_run": smoke,
        "weights": "random" if smoke else "pretrained",
        "seconds": seconds,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **summary_fields,
    }
    if smoke:
        metrics["note"] = SMOKE_NOTE
    atomic_write_json(run_dir / "metrics.json", metrics)
    return score, n_hits, n_images


def _check_config(config: RunConfig) -> None:
    if config.precision not in PRECISIONS:
        raise LostregError(f"--precision {config.precision!r}: expected fp32, bf16 or fp16")
    if config.batch_size < 1:
        raise LostregError("--batch-size must be at least 1")
    if config.k_patches < 1:
        raise LostregError(f"--k-patches {config.k_patches}: must be at least 1")
    if config.limit is not None and config.limit < 1:
        raise LostregError(f"--limit {config.limit}: must be at least 1 (leave it out for all images)")
    if not math.isfinite(float(config.gram_bias)):
        raise LostregError(f"--gram-bias {config.gram_bias}: must be a finite number")
    if config.features is not None and config.features not in ("q", "k", "v"):
        raise LostregError(f"--features {config.features!r}: expected q, k or v")
    storage_dtype(config.cache_dtype, config.precision)  # validates --cache-dtype


# settings that may differ between the runs of one pass (everything else is shared)
_SWEPT = ("features", "k_patches", "gram_bias")


def _pass_key(config: RunConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _SWEPT}


def run_benchmark(config: RunConfig, backbone: Backbone | None = None,
                  index: DatasetIndex | None = None) -> RunResult:
    """Run (or resume) one benchmark run and return its CorLoc; see the module docstring."""
    return run_sweep([config], backbone=backbone, index=index)[0]


def run_sweep(configs: Sequence[RunConfig], backbone: Backbone | None = None,
              index: DatasetIndex | None = None) -> list[RunResult]:
    """Run (or resume) several runs that differ only in ``features``, ``k_patches`` and
    ``gram_bias`` in one pass over the images: each image goes through the backbone once
    (or comes from the feature cache) and LOST runs once per setting. One folder per run."""
    if not configs:
        return []
    base = configs[0]
    for config in configs:
        _check_config(config)
        if _pass_key(config) != _pass_key(base):
            raise ValueError("run_sweep: configs may differ only in features, k_patches and "
                             "gram_bias; use run_grid for other settings")
    return run_grid(base, pairs=[(base.model, base.dataset)], sweep=configs,
                    backbone=backbone, index=index)


def paper_suite() -> list[tuple[str, str]]:
    """``lostreg.leaderboard.PAPER_SUITE`` (the runs behind the comparison table)."""
    from lostreg.leaderboard import PAPER_SUITE

    return [(str(m), str(d)) for m, d in PAPER_SUITE]


def run_grid(base: RunConfig, models: Sequence[str] | None = None,
             datasets: Sequence[str] | None = None, *,
             features: Sequence[str | None] | None = None,
             k_patches: Sequence[int] | None = None,
             gram_biases: Sequence[float] | None = None,
             pairs: Sequence[tuple[str, str]] | None = None,
             sweep: Sequence[RunConfig] | None = None,
             backbone: Backbone | None = None, index: DatasetIndex | None = None,
             on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Every (model, dataset) pair (``pairs``, or ``models`` x ``datasets``) times every LOST
    setting (``features`` x ``k_patches`` x ``gram_biases``; None keeps ``base``'s value).

    Models run one after the other; each is described (weights hashed) once, built at most
    once and only if some image is not in the feature cache; each dataset is indexed once.
    ``on_result`` sees each run as soon as it is finished.
    """
    if pairs is None:
        pairs = [(m, d) for m in (models or [base.model]) for d in (datasets or [base.dataset])]
    by_model: dict[str, list[str]] = {}
    for model, dataset in pairs:
        if dataset not in by_model.setdefault(model, []):
            by_model[model].append(dataset)
    # fail on a typo before hours of work, not after
    specs = {m: (backbone.spec if backbone is not None else get_backbone_spec(m)) for m in by_model}
    if index is None:
        for dataset in dict.fromkeys(d for ds in by_model.values() for d in ds):
            spec_of_dataset = get_dataset(dataset)
            if not base.download and not spec_of_dataset.is_present(Path(base.data_root)):
                load_dataset(dataset, base.data_root, download=False)  # says what is missing
    if sweep is None:
        sweep = [dataclasses.replace(base, features=f, k_patches=k, gram_bias=float(b))
                 for f in (features if features is not None else [base.features])
                 for k in (k_patches if k_patches is not None else [base.k_patches])
                 for b in (gram_biases if gram_biases is not None else [base.gram_bias])]
    for config in sweep:
        _check_config(config)

    ctx = distributed.setup(resolve_device(base.device).type)
    device = distributed.local_device(resolve_device(base.device), ctx)
    use_device(device)
    if base.num_workers is None:  # config.json records the number used
        workers = decode_workers(device)
        sweep = [dataclasses.replace(config, num_workers=workers) for config in sweep]
    numerics = set_numerics(base.precision)
    indexes: dict[str, DatasetIndex] = {}
    results: list[RunResult] = []
    for model, datasets_of_model in by_model.items():
        spec = specs[model]
        lazy: _LazyBackbone | None = None
        for dataset in datasets_of_model:
            if index is not None:
                indexes[dataset] = index
            if dataset not in indexes:
                indexes[dataset] = ctx.main_first(lambda d=dataset: load_dataset(
                    d, base.data_root, no_hard=base.no_hard, download=base.download))
            check_dataset_complete(indexes[dataset], base.allow_partial_dataset)
            if lazy is None:
                info = backbone if backbone is not None else ctx.main_first(
                    lambda s=spec: describe_backbone(s, base.weights))
                lazy = _LazyBackbone(info, base.weights, device, backbone)
                if lazy.info.weights.is_random and ctx.is_main:
                    print(f"warning: {SMOKE_NOTE}", file=sys.stderr)
            configs = [dataclasses.replace(c, model=model, dataset=dataset) for c in sweep]
            for result in _run_pass(configs, lazy, indexes[dataset], device, numerics, ctx):
                results.append(result)
                if on_result is not None:
                    on_result(result)
        if lazy is not None:
            lazy.release()
    return results


@dataclass
class _Run:
    """One run folder inside a pass."""

    config: RunConfig
    feature: str
    identity: dict
    run_id: str
    run_dir: Path
    pending: set[int] = field(default_factory=set)  # dataset positions still missing (all ranks)
    out: JsonlAppender | None = None
    finished: bool = False  # complete before this command: its files are left as they are


def _remove_unused(run_dirs: Sequence[Path]) -> None:
    """Delete run folders this command created that still hold nothing but ``config.json``."""
    for run_dir in run_dirs:
        if {p.name for p in run_dir.iterdir()} <= {"config.json"}:
            (run_dir / "config.json").unlink(missing_ok=True)
            run_dir.rmdir()


def _summary_line(score: float, n_hits: int, n_images: int, index: DatasetIndex, spec_name: str,
                  run: _Run, smoke: bool) -> str:
    summary = (f"CorLoc {score:.2f} ({n_hits}/{n_images}) {index.name} {index.split} "
               f"{spec_name} {run.feature}")
    if run.config.k_patches != 100:
        summary += f" k={run.config.k_patches}"
    if float(run.config.gram_bias) != 0.0:
        summary += f" gram_bias={float(run.config.gram_bias):g}"
    if index.no_hard:
        summary += " no_hard"
    if run.config.precision != "fp32":
        summary += f" {run.config.precision}"
    if run.config.limit:
        summary += f" limit={run.config.limit}"
    if "feature_cache" in run.identity:  # rounded cached features: not the exact result
        summary += f" cache={run.identity['feature_cache']}"
    if smoke:
        summary += f"  [{SMOKE_NOTE}]"
    return summary


def _run_pass(configs: list[RunConfig], lazy: _LazyBackbone, index: DatasetIndex,
              device: torch.device, numerics: dict, ctx: DistContext) -> list[RunResult]:
    """One pass over one dataset for one backbone: every run of ``configs`` is resumed."""
    base = configs[0]
    info = lazy.info
    spec = info.spec
    smoke = info.weights.is_random
    records = list(index.records[: base.limit] if base.limit else index.records)
    storage = storage_dtype(base.cache_dtype, base.precision) if base.cache_features else None
    lossless = storage is None or is_lossless(storage, base.precision)

    runs: list[_Run] = []
    for config in configs:
        feature = config.features or spec.default_feature
        identity = run_identity(config, info, index, feature)
        if not lossless:
            identity["feature_cache"] = storage  # rounded features: never mixed with exact runs
        run_id = make_run_id(identity, smoke)
        runs.append(_Run(config, feature, identity, run_id, Path(config.output) / run_id))
    seen: dict[str, _Run] = {}
    for run in runs:
        if run.run_id in seen:
            raise LostregError(f"two runs of one command have the same settings ({run.run_id}); "
                               "list each --features/--k-patches/--gram-bias value once")
        seen[run.run_id] = run
    extra = {"world_size": ctx.world_size,
             "feature_cache": None if storage is None else {
                 "dir": str(base.cache_features), "dtype": storage, "lossless": lossless}}
    new_dirs = [run.run_dir for run in runs if not run.run_dir.exists()]
    for run in runs:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        done = distributed.done_ids(run.run_dir)
        run.pending = {p for p, r in enumerate(records) if r.image_id not in done}
        run.finished = _is_finished(run)
        if ctx.is_main and not run.finished:
            write_config(run.run_dir, run.config, run.identity, info, index, device, numerics,
                         run.run_id, extra)
    ctx.barrier()  # every rank has read the same state before any rank appends

    union = sorted(set().union(*(run.pending for run in runs)))
    mine = distributed.shard(union, ctx)
    todo: dict[int, set[int]] = {p: {i for i, run in enumerate(runs) if p in run.pending}
                                 for p in mine}
    stats = {"forward": 0.0, "backbone_images": 0, "cached_images": 0}
    errors: list[str] = []
    started = time.perf_counter()
    progress = _progress(
        total=len(records) if not ctx.enabled else len(mine),
        initial=len(records) - len(union) if not ctx.enabled else 0,
        enabled=base.progress and ctx.is_main and bool(mine),
        desc=f"{index.name} {spec.name}" + (f" [rank 0/{ctx.world_size}]" if ctx.enabled else ""))

    def emit(kind: str, feats: torch.Tensor, grid: tuple[int, int],
             entries: list[tuple[int, tuple[int, int]]]) -> None:
        """LOST for every run of ``kind`` that still needs some of ``entries`` (position,
        actual (H, W)), appending their lines durably."""
        rows, cols = grid
        for i, run in enumerate(runs):
            if run.feature != kind:
                continue
            chosen = [j for j, (p, _) in enumerate(entries) if i in todo[p]]
            if not chosen:
                continue
            sub = feats if len(chosen) == len(entries) else feats[chosen]
            result = lost(sub, grid, spec.patch_size, [entries[j][1] for j in chosen],
                          run.config.k_patches, run.config.gram_bias)
            lines = []
            for j, box, seed in zip(chosen, result.box.cpu().tolist(), result.seed.cpu().tolist(),
                                    strict=True):
                position, size = entries[j]
                record = records[position]
                if tuple(size) != (record.height, record.width):
                    record = dataclasses.replace(record, height=size[0], width=size[1])
                lines.append(prediction_record(record, box, divmod(seed, cols), index.root, smoke))
                todo[position].discard(i)
            if run.out is None:
                run.out = JsonlAppender(distributed.predictions_target(run.run_dir, ctx))
            run.out.write_many(lines)

    with contextlib.ExitStack() as stack:
        for run in runs:
            stack.callback(lambda r=run: r.out.close() if r.out is not None else None)
        caches: dict[str, FeatureCache] = {}
        if storage is not None and mine:
            for kind in sorted({runs[i].feature for p in mine for i in todo[p]}):
                key = _cache_key(info, index, kind, base.precision, storage)
                caches[kind] = FeatureCache(base.cache_features, key, writer_tag=f"r{ctx.rank}")
                stack.callback(caches[kind].close)
        writer = stack.enter_context(BackgroundWriter()) if caches else None
        sizes_on_disk = {p: file_size(records[p].path) for p in mine} if caches else {}

        # 1. images whose every needed feature is cached: no backbone
        def cached(p: int, kind: str):
            return caches[kind].lookup(records[p].image_id, sizes_on_disk[p])

        from_cache = [p for p in mine
                      if caches and all(cached(p, runs[i].feature) for i in todo[p])]
        for kind, cache in caches.items():
            wanted: dict[str, list[tuple[int, int]]] = {}
            for p in from_cache:
                if any(runs[i].feature == kind for i in todo[p]):
                    entry = cached(p, kind)
                    wanted.setdefault(entry.shard, []).append((p, entry.row))
            for name, shard in prefetch(cache.read, list(wanted)):
                members = wanted[name]
                if not isinstance(shard, CacheProblem) and any(
                        row >= len(shard.image_ids) or shard.image_ids[row] != records[p].image_id
                        for p, row in members):
                    shard = CacheProblem(f"{shard.path}: rows do not match the cache index")
                if isinstance(shard, CacheProblem):
                    warn(f"feature cache: {shard}; recomputing its {len(members)} images")
                    cache.forget(name)
                    continue
                tick = time.perf_counter()
                for start in range(0, len(members), base.batch_size):
                    chunk = members[start:start + base.batch_size]
                    rows = [row for _, row in chunk]
                    first, last = rows[0], rows[-1]
                    if rows == list(range(first, last + 1)):  # the usual case: no copy
                        feats = shard.feats[first:last + 1]
                    else:
                        feats = shard.feats.index_select(0, torch.tensor(rows))
                    feats = feats.to(device).float()
                    emit(kind, feats, shard.grid, [(p, shard.sizes[row]) for p, row in chunk])
                    finished = sum(1 for p, _ in chunk if not todo[p])
                    stats["cached_images"] += finished
                    progress.update(finished)
                stats["forward"] += time.perf_counter() - tick

        # 2. everything else through the backbone (and into the cache)
        compute = [p for p in mine if todo[p]]
        if compute:
            try:
                backbone = lazy.get()
            except LostregError:  # e.g. unreadable weights: leave no folder holding only a config
                if not ctx.enabled:
                    _remove_unused(new_dirs)
                raise
            autocast = PRECISIONS[base.precision]
            for loaded in iterate_batches([records[p] for p in compute], backbone,
                                          base.batch_size, base.num_workers, device):
                errors += loaded.errors
                for group in loaded.groups:
                    tick = time.perf_counter()
                    positions = [compute[i] for i in group.positions]
                    entries = list(zip(positions, group.sizes, strict=True))
                    images = group.images.to(device, non_blocking=True)
                    grid = (images.shape[-2] // spec.patch_size,
                            images.shape[-1] // spec.patch_size)
                    kinds = sorted({runs[i].feature for p in positions for i in todo[p]})
                    for kind, feats in extract_feature_kinds(backbone, images, kinds,
                                                             autocast).items():
                        if kind in caches:
                            stored = to_storage(feats, storage, lossless)
                            if not lossless:
                                feats = stored.float()
                            new = [j for j, p in enumerate(positions) if not cached(p, kind)]
                            if new:
                                writer.submit(  # type: ignore[union-attr]
                                    caches[kind], [records[positions[j]].image_id for j in new],
                                    [entries[j][1] for j in new],
                                    [sizes_on_disk[positions[j]] for j in new], grid,
                                    stored[new].to("cpu"))
                        emit(kind, feats, grid, entries)
                    stats["backbone_images"] += len(positions)
                    stats["forward"] += time.perf_counter() - tick
                progress.update(loaded.n_items)
    progress.close()

    def bad_images(messages: list[str]) -> str:
        where = runs[0].run_dir if len(runs) == 1 else f"the run folders under {base.output}"
        more = f" (and {len(messages) - 1} more bad images)" if len(messages) > 1 else ""
        return (f"{messages[0]}{more}; the other predictions are saved in {where}, "
                "fix the files and rerun the same command to finish")

    ctx.raise_if_any(errors, bad_images)
    everyone = ctx.gather(stats)  # also: every rank's appends are durable and closed
    total = time.perf_counter() - started
    outcomes: Any = None
    if ctx.is_main:
        try:
            outcomes = [_finish(run, records, index, spec, smoke, total, everyone, ctx, len(runs))
                        for run in runs]
        except LostregError as exc:
            outcomes = str(exc)
            ctx.broadcast(outcomes)
            raise
    outcomes = ctx.broadcast(outcomes)
    if isinstance(outcomes, str):
        raise CollectiveError(outcomes)
    return [RunResult(run.run_id, run.run_dir, score, n_images, n_hits, smoke,
                      _summary_line(score, n_hits, n_images, index, spec.name, run, smoke))
            for run, (score, n_hits, n_images) in zip(runs, outcomes, strict=True)]


def _is_finished(run: _Run) -> bool:
    """Whether a run was complete before this command: every prediction in its merged file,
    no per-rank part left, its config.json and metrics.json written. Rerunning such a run
    changes nothing on disk, so metrics.json keeps the timings of the work it did."""
    return (not run.pending and (run.run_dir / "metrics.json").is_file()
            and (run.run_dir / "config.json").is_file()
            and not distributed.part_files(run.run_dir))


def _finish(run: _Run, records: Sequence[ImageRecord], index: DatasetIndex, spec: BackboneSpec,
            smoke: bool, total: float, everyone: list[dict], ctx: DistContext,
            n_runs: int) -> tuple[float, int, int]:
    if run.finished:
        wanted = {r.image_id for r in records}
        return corloc(line["hit"] for line in read_jsonl(run.run_dir / distributed.PREDICTIONS)
                      if line["image_id"] in wanted)
    computed = len(run.pending)
    seconds = {
        "total": round(total, 3),
        "model_and_lost": round(max(s["forward"] for s in everyone), 3),
        "images_computed": computed,
        "images_per_second": round(computed / total, 3) if total > 0 else None,
        "backbone_images": sum(s["backbone_images"] for s in everyone),
        "cached_images": sum(s["cached_images"] for s in everyone),
        "world_size": ctx.world_size,
        "runs_in_pass": n_runs,
    }
    summary_fields = {"model": spec.name, "timm_name": spec.timm_name, "dataset": index.name,
                      "split": index.split, "feature": run.feature,
                      "k_patches": run.config.k_patches, "gram_bias": float(run.config.gram_bias),
                      "precision": run.config.precision, "no_hard": index.no_hard,
                      "resumed_with": len(records) - computed}
    return _finalize(run.run_dir, records, run.run_id, smoke, summary_fields, seconds)


def _cache_key(info: Backbone | BackboneInfo, index: DatasetIndex, kind: str, precision: str,
               storage: str) -> dict:
    return cache_key(
        model=info.spec.name, timm_name=info.spec.timm_name, model_kwargs=info.spec.model_kwargs,
        weights=info.weights.identity(), num_prefix_tokens=info.num_prefix_tokens,
        mean=info.mean, std=info.std, patch_size=info.spec.patch_size,
        pos_embed=info.spec.pos_embed, dataset=index.name, split=index.split, feature=kind,
        precision=precision, storage=storage, lostreg_version=lostreg.__version__)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="img",
                dynamic_ncols=True, file=sys.stderr)


# --- CLI -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lostreg-run",
        description=(
            "Score LOST object discovery (CorLoc) on a ViT's last-layer attention features. "
            "Features are q, k or v of the LAST block's attention (fused qkv, heads "
            "concatenated in head order) for the patch tokens only: the class token and every "
            "register token are removed. Images are not resized; they are zero-padded to a "
            "multiple of the patch size. Comma lists (--model a,b --dataset voc07,voc12 "
            "--gram-bias=0,-0.1) run every combination, one run folder each. Several GPUs: "
            "torchrun --nproc_per_node=N -m lostreg.run ..."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="backbone short name(s), comma separated, or timm:<name> "
                             f"(default dinov2_reg4); known: {', '.join(list_backbones())}")
    parser.add_argument("--dataset", default=None,
                        help="dataset(s), comma separated (default voc07); one of "
                             f"{', '.join(DATASETS)}")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="run a named suite instead of --model/--dataset (paper: the runs of "
                             "the comparison table), then rebuild the leaderboard")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset root (default: $LOSTREG_DATA or datasets/)")
    parser.add_argument("--weights", default="hub",
                        help="hub (timm from the Hugging Face hub), a checkpoint PATH, or random "
                             "(untrained: smoke run, never a result)")
    parser.add_argument("--features", default=None,
                        help="q, k or v (comma list for several) of the last-layer attention "
                             "(default: the backbone's)")
    parser.add_argument("--k-patches", default="100",
                        help="LOST's k (seed expansion); a comma list sweeps it")
    parser.add_argument("--gram-bias", default="0.0",
                        help="added to F F^T; a comma list sweeps it in one pass "
                             "(write --gram-bias=-0.1,0 when the list starts with a minus)")
    parser.add_argument("--no-hard", action="store_true",
                        help="drop VOC objects marked truncated or difficult (and emptied images)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="fp32 is exact (TF32 off); bf16/fp16 autocast the backbone")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--output", type=Path, default=Path("results/runs"),
                        help="where run folders go")
    parser.add_argument("--cache-features", type=Path, nargs="?", const=DEFAULT_CACHE_DIR,
                        default=None, metavar="DIR",
                        help=f"keep per-image features in DIR (default {DEFAULT_CACHE_DIR} when "
                             "given without DIR); reruns with other LOST settings skip the model")
    parser.add_argument("--cache-dtype", default="auto", choices=CACHE_DTYPES,
                        help="how cached features are stored; auto is exact (the dtype the "
                             "backbone produced: fp32 for fp32 runs); fp16 halves an fp32 "
                             "cache but rounds, so such runs get their own run id")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading a missing dataset")
    parser.add_argument("--allow-partial-dataset", action="store_true",
                        help="run even if a VOC07/VOC12/COCO20k split lists another number of "
                             "images than the benchmark's (not comparable; the run id records "
                             "the count); every listed image must still be there")
    add_compute_options(parser, "auto, cpu or cuda[:N] (under torchrun: cuda:LOCAL_RANK per rank)")
    return parser


def _split(text: str | None, flag: str, convert: Callable[[str], Any]) -> list[Any] | None:
    """A comma list, converted, duplicates dropped (order kept); None stays None."""
    if text is None:
        return None
    values: list[Any] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise LostregError(f"{flag} {text!r}: empty item in the comma list")
        try:
            value = convert(part)
        except ValueError:
            raise LostregError(f"{flag} {text!r}: {part!r} is not a valid value") from None
        if value not in values:
            values.append(value)
    return values


def _feature(text: str) -> str:
    if text not in ("q", "k", "v"):
        raise ValueError(text)
    return text


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The base config of a command (the first value of each comma list)."""
    def first(text: str | None, default: str) -> str:
        return (text or default).split(",")[0].strip()

    return RunConfig(
        model=first(args.model, "dinov2_reg4"), dataset=first(args.dataset, "voc07"),
        data_root=args.data_root if args.data_root is not None else default_data_root(),
        weights=args.weights, features=args.features.split(",")[0] if args.features else None,
        k_patches=int(first(args.k_patches, "100")),
        gram_bias=float(first(args.gram_bias, "0")), no_hard=args.no_hard, device=args.device,
        batch_size=args.batch_size, limit=args.limit, output=args.output,
        precision=args.precision, download=not args.no_download,
        num_workers=args.num_workers, progress=not args.no_progress,
        cache_features=args.cache_features, cache_dtype=args.cache_dtype,
        allow_partial_dataset=args.allow_partial_dataset,
    )


def _rebuild_leaderboard(output: Path) -> str:
    """Rebuild ``results/`` (leaderboard, comparison tables, figures) from the run folders."""
    from lostreg import leaderboard

    out_dir = Path(output).parent
    leaderboard.build_leaderboard(runs_dir=Path(output), out_dir=out_dir)
    return f"leaderboard rebuilt in {out_dir}"


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        models = _split(args.model, "--model", str)
        datasets = _split(args.dataset, "--dataset", str)
        features = _split(args.features, "--features", _feature)
        k_list = _split(args.k_patches, "--k-patches", int)
        biases = _split(args.gram_bias, "--gram-bias", float)
        pairs = None
        if args.suite is not None:
            if models or datasets:
                raise LostregError(f"--suite {args.suite} chooses the models and datasets; "
                                   "drop --model/--dataset")
            pairs = paper_suite()
        base = config_from_args(args)

        def report(result: RunResult) -> None:
            if distributed.current().is_main:
                print(result.summary, flush=True)

        run_grid(base, models, datasets, features=features, k_patches=k_list,
                 gram_biases=biases, pairs=pairs, on_result=report)
        if args.suite is not None and distributed.current().is_main:
            print(_rebuild_leaderboard(Path(args.output)))
    except (LostregError, OSError) as exc:
        if distributed.current().is_main or not isinstance(exc, CollectiveError):
            print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was written is kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lostreg.run``: see ``build_parser``; exit status 0, 2 (bad input) or 130."""
    return distributed.leave(_main(argv))


if __name__ == "__main__":
    sys.exit(main())

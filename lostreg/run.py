"""``python -m lostreg.run``: LOST CorLoc of one backbone on one dataset, resumable.

Stages: dataset index -> DataLoader (workers decode and pad while the model runs; batches hold
images of one padded size, so batching changes no result) -> last-layer q/k/v -> batched LOST
on the device -> CorLoc. Every batch's predictions are appended durably to
``predictions.jsonl``; a rerun of the same settings skips what is already written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import lostreg
from lostreg.backbones import Backbone, create_backbone, get_backbone_spec, list_backbones
from lostreg.datasets import DATASETS, default_data_root, load_dataset
from lostreg.datasets.base import DatasetIndex, ImageRecord, load_rgb
from lostreg.errors import LostregError
from lostreg.features import extract_features, padded_size, preprocess
from lostreg.io import JsonlAppender, atomic_write_json, atomic_write_text, read_jsonl
from lostreg.methods.lost import lost
from lostreg.metrics import best_iou, corloc, is_hit

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE_NOTE = "SMOKE RUN (weights: random): not a result, never enters the leaderboard"


@dataclass
class RunConfig:
    """Every setting of one run; the ones that change results define its run id."""

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
    num_workers: int = 2
    progress: bool = True


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
    return torch.device(name)


def set_numerics(precision: str) -> dict:
    """fp32 means exact fp32: no TF32 in matmuls or cuDNN convolutions (the patch embedding)."""
    exact = precision == "fp32"
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact
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


def size_batches(records: Sequence[ImageRecord], patch_size: int, batch_size: int) -> list[list[int]]:
    """Batches of positions whose images share one padded size (from the annotated size),
    in dataset order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        groups[padded_size(record.height, record.width, patch_size)].append(position)
    return [members[i:i + batch_size] for members in groups.values()
            for i in range(0, len(members), batch_size)]


def _keep_items(items: list[dict]) -> list[dict]:
    return items


def iterate_batches(records: Sequence[ImageRecord], backbone: Backbone, batch_size: int,
                    num_workers: int, pin_memory: bool) -> Iterator[list[dict]]:
    """Yield lists of decoded items; the annotated size may be wrong, so items are regrouped by
    their actual padded shape downstream."""
    dataset = PaddedImages(records, backbone.mean, backbone.std, backbone.patch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=size_batches(records, backbone.patch_size, batch_size),
        collate_fn=_keep_items,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    yield from loader


def group_by_shape(items: list[dict]) -> list[list[dict]]:
    groups: dict[tuple[int, ...], list[dict]] = defaultdict(list)
    for item in items:
        groups[tuple(item["tensor"].shape)].append(item)
    return list(groups.values())


# --- the run -------------------------------------------------------------------------------


def run_identity(config: RunConfig, backbone: Backbone, index: DatasetIndex, feature: str) -> dict:
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
    }


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


def write_config(run_dir: Path, config: RunConfig, identity: dict, backbone: Backbone,
                 index: DatasetIndex, device: torch.device, numerics: dict, run_id: str) -> dict:
    import timm

    smoke = backbone.weights.is_random
    payload = {
        "run_id": run_id,
        "identity": identity,
        "settings": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in dataclasses.asdict(config).items()},
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
        "data_root": str(index.root),
        "no_hard": index.no_hard,
        "feature": identity["feature"],
        "k_patches": config.k_patches,
        "gram_bias": float(config.gram_bias),
        "precision": config.precision,
        "numerics": numerics,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "lostreg_version": lostreg.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": sys.version.split()[0],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if smoke:
        payload["note"] = SMOKE_NOTE
    atomic_write_json(run_dir / "config.json", payload)
    return payload


def _finalize(run_dir: Path, index_records: Sequence[ImageRecord], run_id: str, smoke: bool,
              summary_fields: dict, seconds: dict) -> tuple[float, int, int]:
    """Rewrite predictions in dataset order (so a resumed run's file equals an uninterrupted
    one's) and write metrics.json atomically."""
    by_id = {line["image_id"]: line for line in read_jsonl(run_dir / "predictions.jsonl")}
    ordered = [by_id[r.image_id] for r in index_records]
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in ordered)
    atomic_write_text(run_dir / "predictions.jsonl", text)
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


def run_benchmark(config: RunConfig, backbone: Backbone | None = None,
                  index: DatasetIndex | None = None) -> RunResult:
    """Run (or resume) one benchmark run and return its CorLoc; see the module docstring."""
    if config.precision not in PRECISIONS:
        raise LostregError(f"--precision {config.precision!r}: expected fp32, bf16 or fp16")
    if config.batch_size < 1:
        raise LostregError("--batch-size must be at least 1")
    device = resolve_device(config.device)
    numerics = set_numerics(config.precision)
    spec = backbone.spec if backbone is not None else get_backbone_spec(config.model)
    feature = config.features or spec.default_feature
    if feature not in ("q", "k", "v"):
        raise LostregError(f"--features {feature!r}: expected q, k or v")
    if index is None:
        index = load_dataset(config.dataset, config.data_root, no_hard=config.no_hard,
                             download=config.download)
    if backbone is None:
        backbone = create_backbone(spec, config.weights, device)
    smoke = backbone.weights.is_random
    if smoke:
        print(f"warning: {SMOKE_NOTE}", file=sys.stderr)
    records = list(index.records[: config.limit] if config.limit else index.records)

    identity = run_identity(config, backbone, index, feature)
    run_id = make_run_id(identity, smoke)
    run_dir = Path(config.output) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config, identity, backbone, index, device, numerics, run_id)

    predictions_path = run_dir / "predictions.jsonl"
    done = {line["image_id"] for line in read_jsonl(predictions_path)}
    pending = [r for r in records if r.image_id not in done]
    errors: list[str] = []
    started = time.perf_counter()
    forward_seconds = 0.0
    autocast = PRECISIONS[config.precision]
    progress = _progress(total=len(records), initial=len(records) - len(pending),
                         enabled=config.progress, desc=f"{index.name} {spec.name}")
    with JsonlAppender(predictions_path) as out:
        for items in iterate_batches(pending, backbone, config.batch_size, config.num_workers,
                                     pin_memory=device.type == "cuda"):
            errors += [item["error"] for item in items if item["error"]]
            good = [item for item in items if not item["error"]]
            lines = []
            for group in group_by_shape(good) if good else []:
                tick = time.perf_counter()
                images = torch.stack([item["tensor"] for item in group]).to(device,
                                                                             non_blocking=True)
                feats = extract_features(backbone, images, feature, autocast)
                rows, cols = images.shape[-2] // spec.patch_size, images.shape[-1] // spec.patch_size
                result = lost(feats, (rows, cols), spec.patch_size,
                              [item["size"] for item in group], config.k_patches, config.gram_bias)
                boxes, seeds = result.box.cpu().tolist(), result.seed.cpu().tolist()
                forward_seconds += time.perf_counter() - tick
                for item, box, seed in zip(group, boxes, seeds, strict=True):
                    record = pending[item["position"]]
                    if tuple(item["size"]) != (record.height, record.width):
                        record = dataclasses.replace(record, height=item["size"][0],
                                                     width=item["size"][1])
                    lines.append(prediction_record(record, box, divmod(seed, cols), index.root,
                                                   smoke))
            out.write_many(lines)
            progress.update(len(items))
    progress.close()
    if errors:
        more = f" (and {len(errors) - 1} more bad images)" if len(errors) > 1 else ""
        raise LostregError(f"{errors[0]}{more}; the other predictions are saved in {run_dir}, "
                           "fix the files and rerun the same command to finish")

    total = time.perf_counter() - started
    seconds = {"total": round(total, 3), "model_and_lost": round(forward_seconds, 3),
               "images_computed": len(pending),
               "images_per_second": round(len(pending) / total, 3) if total > 0 else None}
    summary_fields = {"model": spec.name, "timm_name": spec.timm_name, "dataset": index.name,
                      "split": index.split, "feature": feature, "k_patches": config.k_patches,
                      "gram_bias": float(config.gram_bias), "precision": config.precision,
                      "no_hard": index.no_hard, "resumed_with": len(records) - len(pending)}
    score, n_hits, n_images = _finalize(run_dir, records, run_id, smoke, summary_fields, seconds)
    summary = f"CorLoc {score:.2f} ({n_hits}/{n_images}) {index.name} {index.split} {spec.name} {feature}"
    if smoke:
        summary += f"  [{SMOKE_NOTE}]"
    return RunResult(run_id, run_dir, score, n_images, n_hits, smoke, summary)


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
            "multiple of the patch size."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="dinov2_reg4",
                        help=f"backbone short name or timm:<name>; known: {', '.join(list_backbones())}")
    parser.add_argument("--dataset", default="voc07", help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset root (default: $LOSTREG_DATA or datasets/)")
    parser.add_argument("--weights", default="hub",
                        help="hub (timm from the Hugging Face hub), a checkpoint PATH, or random "
                             "(untrained: smoke run, never a result)")
    parser.add_argument("--features", choices=("q", "k", "v"), default=None,
                        help="which last-layer attention feature (default: the backbone's)")
    parser.add_argument("--k-patches", type=int, default=100, help="LOST's k (seed expansion)")
    parser.add_argument("--gram-bias", type=float, default=0.0, help="added to F F^T")
    parser.add_argument("--no-hard", action="store_true",
                        help="drop VOC objects marked truncated or difficult (and emptied images)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--batch-size", type=int, default=16, help="max images per batch")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="fp32 is exact (TF32 off); bf16/fp16 autocast the backbone")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--output", type=Path, default=Path("results/runs"),
                        help="where run folders go")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading a missing dataset")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image decoding processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=args.model, dataset=args.dataset,
        data_root=args.data_root if args.data_root is not None else default_data_root(),
        weights=args.weights, features=args.features, k_patches=args.k_patches,
        gram_bias=args.gram_bias, no_hard=args.no_hard, device=args.device,
        batch_size=args.batch_size, limit=args.limit, output=args.output,
        precision=args.precision, download=not args.no_download,
        num_workers=args.num_workers, progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_benchmark(config_from_args(args))
    except LostregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was written is kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

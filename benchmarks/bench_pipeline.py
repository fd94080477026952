"""The pipeline without the model: ``lostreg.run`` with a no-op backbone, in images/s.

Everything a run does except the forward: dataset indexing, decoding and padding, batching,
the copy to the device, LOST, formatting and durably appending the predictions, finishing the
run. The backbone is replaced by a fixed random projection of each patch's pixels to 384
dimensions (ViT-S/14's width), so LOST sees features of the usual shape and the pipeline's
own cost is what is timed. On a GPU this is the ceiling of what the pipeline can feed: if it is
not well above the forward's images/s, the GPU starves. On a CPU it is the proxy the issue asks
for in sessions without a GPU.

The breakdown comes from the run's own ``metrics.json`` (``seconds``): waiting for decoded
batches (decode + pad + stack; with workers, what was not hidden), the copy to the device, the
"features" (here the projection), the method (LOST) and the line writer (a background thread
that overlaps the rest). Runs with 0 and N decoding workers are measured in one process,
alternating, and their predictions are checked to be identical.

    python benchmarks/bench_pipeline.py                   # 200 VOC-sized images, CPU
    python benchmarks/bench_pipeline.py --device cuda --images 2000 --batch-size 64 --workers 0,8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import torch

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    add_output_options,
    facts_rows,
    machine_facts,
    median,
    resolve_device,
    result_block,
    sample_sizes,
    save_json,
    scratch_folder,
    synchronize,
    warm_up,
    write_voc_tree,
)
from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone  # noqa: E402
from lostreg.cli import workers_count  # noqa: E402
from lostreg.datasets.base import DatasetIndex  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.features import pipeline  # noqa: E402
from lostreg.features.extract import FeatureRequest  # noqa: E402
from lostreg.run import RunConfig, run_benchmark  # noqa: E402

SPEC = BackboneSpec("noop_vits14", "vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0,
                    pos_embed="dinov2", model_kwargs=dict(depth=1, embed_dim=384, num_heads=6))
DIM = 384
STAGES = (("load_wait", "wait for decoded batches"), ("transfer", "copy to the device"),
          ("features", "features (no-op projection)"), ("method", "LOST"),
          ("write", "line writer (background)"))


def projection(patch_size: int, device: torch.device) -> torch.Tensor:
    """The fixed random map from a patch's pixels to ``DIM`` features."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * patch_size * patch_size, DIM, generator=generator)
    return (weight / weight.shape[0] ** 0.5).to(device)


def noop_extract(weight: torch.Tensor, patch_size: int):
    """A stand-in for ``lostreg.features.extract.extract``: every request gets the projected patches."""
    def extract(backbone, images: torch.Tensor, requests: Sequence[FeatureRequest],
                autocast_dtype=None) -> dict[FeatureRequest, torch.Tensor]:
        patches = torch.nn.functional.unfold(images, patch_size, stride=patch_size)
        feats = (patches.transpose(1, 2) @ weight).contiguous()
        return {request: feats for request in requests}
    return extract


def run_once(index: DatasetIndex, device: torch.device, output: Path, batch_size: int,
             num_workers: int) -> tuple[float, dict, Path]:
    """One fresh run (a new output folder): wall seconds, its ``seconds`` and its folder."""
    config = RunConfig(model=SPEC.name, dataset=index.name, data_root=index.root,
                       weights="random", device=str(device), batch_size=batch_size,
                       output=output, download=False, num_workers=num_workers, progress=False)
    synchronize(device)
    start = time.perf_counter()
    result = run_benchmark(config, index=index)
    synchronize(device)
    wall = time.perf_counter() - start
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    return wall, metrics["seconds"], result.run_dir


def measure(index: DatasetIndex, device: torch.device, workdir: Path, batch_size: int,
            workers: Sequence[int], repeats: int) -> dict:
    """Alternate runs with each number of workers ``repeats`` times (after one warm-up run)."""
    weight = projection(SPEC.patch_size, device)
    BACKBONES[SPEC.name] = SPEC
    try:
        with mock.patch.object(pipeline, "extract", noop_extract(weight, SPEC.patch_size)):
            warm_up(device)
            create_backbone(SPEC, "random", device)  # timm's import and first build, untimed
            run_once(index, device, workdir / "warm", batch_size, 0)
            results: dict[int, dict] = {n: {"wall": [], "seconds": []} for n in workers}
            predictions: dict[int, bytes] = {}
            for repeat in range(repeats):
                for n in workers:
                    wall, seconds, run_dir = run_once(index, device, workdir / f"w{n}-{repeat}",
                                                      batch_size, n)
                    results[n]["wall"].append(wall)
                    results[n]["seconds"].append(seconds)
                    predictions[n] = (run_dir / "predictions.jsonl").read_bytes()
    finally:
        BACKBONES.pop(SPEC.name, None)
    identical = len(set(predictions.values())) == 1
    return {"n_images": len(index.records), "results": results, "identical": identical}


def summary_rows(result: dict) -> list[tuple[str, object]]:
    n = result["n_images"]
    rows: list[tuple[str, object]] = []
    for workers, runs in result["results"].items():
        wall = median(runs["wall"])
        rows.append((f"workers={workers}: images/s (run wall)", f"{n / wall:.1f}"))
        for key, label in STAGES:
            share = median([s[key] / w for s, w in zip(runs["seconds"], runs["wall"],
                                                      strict=True)])
            per_image = median([s[key] for s in runs["seconds"]]) / n * 1e3
            rows.append((f"workers={workers}:   {label}", f"{per_image:.2f} ms/image "
                                                          f"({100 * share:.0f}% of the wall)"))
        rest = median([(w - sum(s[k] for k, _ in STAGES if k != "write")) / w
                       for s, w in zip(runs["seconds"], runs["wall"], strict=True)])
        rows.append((f"workers={workers}:   everything else", f"{100 * rest:.0f}% of the wall "
                     "(index, folders, loader start-up, merge, metrics)"))
    rows.append(("predictions identical across worker counts", result["identical"]))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--images", type=int, default=200, help="generated images")
    parser.add_argument("--size-scale", type=float, default=1.0,
                        help="scale of the VOC-like sizes (1.0 = 500 px long side)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", default="0,2",
                        help="comma list of decoding-worker counts to compare")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing rounds")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "pipeline") as workdir:
        try:
            device = resolve_device(args.device)
            workers = [workers_count(w) for w in args.workers.split(",")]
            if args.repeats < 1 or any(w is None for w in workers):
                raise LostregError("--repeats must be at least 1 and --workers whole numbers")
            index = write_voc_tree(workdir / "data", sample_sizes(args.images, args.seed,
                                                                    args.size_scale), args.seed)
            result = measure(index, device, workdir, args.batch_size, workers, args.repeats)
        except (LostregError, argparse.ArgumentTypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    facts = machine_facts(device)
    rows = [("images", f"{result['n_images']} generated, VOC-like sizes x{args.size_scale}"),
            ("batch size / repeats", f"{args.batch_size} / {args.repeats}"),
            *summary_rows(result)]
    print(result_block("bench_pipeline: lostreg.run with a no-op backbone", rows
                       + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_pipeline",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **result, "machine": facts})
    if not result["identical"]:
        print("error: predictions differ between worker counts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

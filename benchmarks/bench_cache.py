"""Feature cache: a LOST rerun from cached features vs the first run that extracted them.

On a generated VOC-format tree (VOC-like sizes, random weights), times three calls of
``lostreg.run.run_benchmark`` with ``RunConfig.cache_features`` set (what
``--cache-features DIR`` sets), each building what it needs as the CLI would (the model is
created only by a run that has to compute features):

1. ``first``: ``--k-patches 100``; extracts every image's features and writes the cache;
2. ``rerun k``: ``--k-patches 50``; every image comes from the cache, no backbone;
3. ``rerun bias``: ``--gram-bias 0.1``; the same.

Ratio = first / rerun (goal >= 50x). Then, untimed, each rerun's boxes are checked against a
run with the same settings and no cache (the cache must be exact, not just fast).

    python benchmarks/bench_cache.py                 # CPU defaults: 48 images, VOC sizes
    python benchmarks/bench_cache.py --device cuda --images 1000 --model dinov2_vitl14_reg4 \\
        --batch-size 64 --num-workers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    add_output_options,
    add_run_options,
    facts_rows,
    machine_facts,
    resolve_device,
    result_block,
    sample_sizes,
    save_json,
    scratch_folder,
    timed,
    warm_up,
    workers_label,
    write_voc_tree,
)
from lostreg.datasets.base import DatasetIndex  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.io import read_jsonl  # noqa: E402
from lostreg.run import RunConfig, run_benchmark  # noqa: E402


def _boxes(run_dir: Path) -> dict[str, list[int]]:
    return {line["image_id"]: line["box"] for line in read_jsonl(run_dir / "predictions.jsonl")}


def _metrics_seconds(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "metrics.json").read_text())["seconds"]


def cache_config(index: DatasetIndex, model: str, weights: str, device: str, workdir: Path,
                 batch_size: int, precision: str, num_workers: int | None) -> RunConfig:
    """The first run's settings; reruns replace only ``k_patches`` / ``gram_bias``."""
    if not hasattr(RunConfig(), "cache_features"):
        raise LostregError("lostreg.run.RunConfig has no cache_features field yet: this "
                           "lostreg does not have --cache-features")
    return RunConfig(model=model, dataset=index.name, data_root=index.root, weights=weights,
                     k_patches=100, gram_bias=0.0, device=device, batch_size=batch_size,
                     output=workdir / "runs", precision=precision, download=False,
                     num_workers=num_workers, progress=False,
                     cache_features=workdir / "cache")


def measure(index: DatasetIndex, config: RunConfig, rerun_k: int = 50,
            rerun_bias: float = 0.1, check: bool = True) -> dict:
    """Time the first (cache-writing) run and two cached reruns; optionally check the reruns
    against uncached runs of the same settings."""
    device = resolve_device(config.device)
    warm_up(device)  # in-process reruns would skip CUDA's start-up that the first run paid
    variants = {
        "first": config,
        "rerun_k": dataclasses.replace(config, k_patches=rerun_k),
        "rerun_bias": dataclasses.replace(config, gram_bias=rerun_bias),
    }
    seconds, run_dirs, metrics = {}, {}, {}
    for name, variant in variants.items():
        elapsed, result = timed(lambda v=variant: run_benchmark(v, index=index), device)
        if result.n_images != len(index.records):
            raise LostregError(f"{result.run_dir}: scored {result.n_images} of "
                               f"{len(index.records)} images")
        seconds[name], run_dirs[name] = elapsed, result.run_dir
        metrics[name] = _metrics_seconds(result.run_dir)
    out: dict = {
        "n_images": len(index.records),
        "seconds": seconds,
        "run_seconds": metrics,
        "ratio_k": seconds["first"] / seconds["rerun_k"],
        "ratio_bias": seconds["first"] / seconds["rerun_bias"],
        "rerun_backbone_images": {name: metrics[name].get("backbone_images")
                                  for name in ("rerun_k", "rerun_bias")},
    }
    if check:
        same = {}
        for name in ("rerun_k", "rerun_bias"):
            plain = dataclasses.replace(variants[name], cache_features=None,
                                        output=Path(config.output).parent / f"plain-{name}")
            reference = _boxes(run_benchmark(plain, index=index).run_dir)
            cached = _boxes(run_dirs[name])
            same[name] = (sum(cached.get(i) == box for i, box in reference.items()),
                          len(reference))
        out["same_boxes_as_uncached"] = same
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="lostreg backbone name")
    parser.add_argument("--weights", default="random", help="random, hub or PATH")
    parser.add_argument("--images", type=int, default=48, help="generated images")
    parser.add_argument("--size-scale", type=float, default=1.0,
                        help="scale of the VOC-like sizes (1.0 = 500 px long side)")
    add_run_options(parser)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--rerun-k-patches", type=int, default=50)
    parser.add_argument("--rerun-gram-bias", type=float, default=0.1)
    parser.add_argument("--no-check", action="store_true",
                        help="skip the untimed comparison with uncached runs")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "cache") as workdir:
        try:
            device = resolve_device(args.device)
            sizes = sample_sizes(args.images, args.seed, args.size_scale)
            index = write_voc_tree(workdir / "data", sizes, args.seed)
            config = cache_config(index, args.model, args.weights, str(device), workdir,
                                  args.batch_size, args.precision, args.num_workers)
            result = measure(index, config, args.rerun_k_patches, args.rerun_gram_bias,
                             check=not args.no_check)
        except LostregError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    n = result["n_images"]
    secs = result["seconds"]
    rows: list[tuple[str, object]] = [
        ("model / weights", f"{args.model} / {args.weights}"),
        ("images", f"{n} generated, VOC-like sizes x{args.size_scale}"),
        ("batch size / precision / workers",
         f"{args.batch_size} / {args.precision} / {workers_label(args.num_workers, device)}"),
        ("first run (extract + cache write), s", f"{secs['first']:.2f}"),
        (f"rerun --k-patches {args.rerun_k_patches} (cached), s", f"{secs['rerun_k']:.3f}"),
        (f"rerun --gram-bias {args.rerun_gram_bias} (cached), s", f"{secs['rerun_bias']:.3f}"),
        ("reruns: images through the backbone", result["rerun_backbone_images"]),
        ("RATIO first / rerun k", f"{result['ratio_k']:.1f}x"),
        ("RATIO first / rerun bias", f"{result['ratio_bias']:.1f}x"),
        ("goal (first / rerun)",
         f">= 50x: {'MET' if min(result['ratio_k'], result['ratio_bias']) >= 50 else 'NOT MET'}"),
    ]
    mismatch = False
    for name, (same, total) in result.get("same_boxes_as_uncached", {}).items():
        rows.append((f"{name}: boxes == uncached run", f"{same}/{total}"))
        mismatch |= same != total
    facts = machine_facts(device)
    print(result_block("bench_cache: cached LOST rerun vs first run", rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_cache",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **result, "machine": facts})
    if mismatch:
        print("error: a cached rerun's boxes differ from the uncached run's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

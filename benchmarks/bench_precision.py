"""bf16 / fp16 autocast vs exact fp32: the share of images whose LOST box changes.

Runs ``lostreg.run.run_benchmark`` once per precision on the same generated VOC-format tree
with the same backbone object, then compares every image's box (and seed) with fp32's.
Also prints the mean IoU between the changed boxes and fp32's and each run's images/s.

With random weights (the default here: no download) this is only a smoke measure of how
fragile LOST's sign tests are to rounding on noise-like features; with real weights on a GPU
(``--weights hub --device cuda``) the share is the number to quote for ``--precision``.

    python benchmarks/bench_precision.py                       # CPU defaults
    python benchmarks/bench_precision.py --device cuda --weights hub --images 1000 \\
        --size-scale 1 --model dinov2_vitl14_reg4 --batch-size 64 --num-workers 8
"""

from __future__ import annotations

import argparse
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
    write_voc_tree,
)
from lostreg.backbones import Backbone, create_backbone  # noqa: E402
from lostreg.datasets.base import DatasetIndex  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.evaluation.iou import best_iou  # noqa: E402
from lostreg.io import read_jsonl  # noqa: E402
from lostreg.run import RunConfig, run_benchmark  # noqa: E402


def compare(base: dict[str, dict], other: dict[str, dict]) -> dict:
    """Images whose box / seed differ from ``base`` (both: image_id -> prediction line)."""
    if set(base) != set(other):
        raise LostregError("the runs did not predict the same images")
    changed = [i for i in base if base[i]["box"] != other[i]["box"]]
    return {
        "images": len(base),
        "box_differs": len(changed),
        "seed_differs": sum(base[i]["seed"] != other[i]["seed"] for i in base),
        "share_box_differs": len(changed) / len(base) if base else 0.0,
        "mean_iou_of_changed": (sum(best_iou(base[i]["box"], [other[i]["box"]]) for i in changed)
                                / len(changed) if changed else None),
        "hits_delta": sum(other[i]["hit"] for i in base) - sum(base[i]["hit"] for i in base),
    }


def measure(index: DatasetIndex, backbone: Backbone, workdir: Path, device: str,
            precisions: Sequence[str] = ("fp32", "bf16", "fp16"), batch_size: int = 16,
            num_workers: int | None = None) -> dict:
    """One run per precision (fp32 first: the yardstick), then the comparisons."""
    if not precisions or precisions[0] != "fp32":
        precisions = ["fp32", *[p for p in precisions if p != "fp32"]]
    predictions, speed = {}, {}
    warm_up(resolve_device(device))  # else fp32, timed first, alone pays cuBLAS/cuDNN start-up
    for precision in precisions:
        config = RunConfig(model=backbone.spec.name, dataset=index.name, data_root=index.root,
                           weights="random" if backbone.weights.is_random else "hub",
                           device=device, batch_size=batch_size, precision=precision,
                           output=workdir / "runs", download=False, num_workers=num_workers,
                           progress=False)
        elapsed, result = timed(lambda c=config: run_benchmark(c, backbone=backbone,
                                                               index=index),
                                resolve_device(device))
        predictions[precision] = {line["image_id"]: line
                                  for line in read_jsonl(result.run_dir / "predictions.jsonl")}
        speed[precision] = len(predictions[precision]) / elapsed
    base = predictions["fp32"]
    return {"images_per_second": speed,
            "fp32_whole_image_boxes": sum(
                line["box"] == [0, 0, line["width"], line["height"]] for line in base.values()),
            "vs_fp32": {p: compare(base, predictions[p]) for p in precisions if p != "fp32"}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="lostreg backbone name")
    parser.add_argument("--weights", default="random", help="random, hub or PATH")
    parser.add_argument("--images", type=int, default=64, help="generated images")
    parser.add_argument("--size-scale", type=float, default=0.5,
                        help="scale of the VOC-like sizes (1.0 = 500 px long side)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16",
                        help="comma-separated; fp32 is always run first")
    add_run_options(parser)
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "precision") as workdir:
        try:
            device = resolve_device(args.device)
            precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
            bad = [p for p in precisions if p not in ("fp32", "bf16", "fp16")]
            if bad:
                raise LostregError(f"--precisions: unknown {', '.join(bad)}; expected fp32, bf16, fp16")
            index = write_voc_tree(workdir / "data",
                                   sample_sizes(args.images, args.seed, args.size_scale), args.seed)
            backbone = create_backbone(args.model, args.weights, device)
            result = measure(index, backbone, workdir, str(device), precisions, args.batch_size,
                             args.num_workers)
        except LostregError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    rows: list[tuple[str, object]] = [
        ("model / weights", f"{args.model} / {args.weights}"
                            + (" (SMOKE: random weights)" if args.weights == "random" else "")),
        ("images", f"{len(index.records)} generated, VOC-like sizes x{args.size_scale}"),
        ("fp32 boxes covering the whole image",
         f"{result['fp32_whole_image_boxes']}/{len(index.records)} (many = degenerate masks, "
         "typical of random weights: a box can hardly change)"),
    ]
    for precision, speed in result["images_per_second"].items():
        rows.append((f"{precision}: images/s (end to end)", f"{speed:.2f}"))
    for precision, c in result["vs_fp32"].items():
        iou = c["mean_iou_of_changed"]
        rows += [
            (f"SHARE {precision}: box differs from fp32",
             f"{c['share_box_differs']:.3f} ({c['box_differs']}/{c['images']})"),
            (f"{precision}: seed differs / hits delta",
             f"{c['seed_differs']} / {c['hits_delta']:+d}"),
            (f"{precision}: mean IoU(changed box, fp32 box)",
             f"{iou:.3f}" if iou is not None else "n/a (none changed)"),
        ]
    facts = machine_facts(device)
    print(result_block("bench_precision: low-precision autocast vs fp32", rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_precision",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **result, "machine": facts})
    return 0


if __name__ == "__main__":
    sys.exit(main())

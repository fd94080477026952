"""End to end: ``lostreg.run`` images/s vs a bare timm forward loop over the same tensors.

A VOC-format tree of generated scenes with VOC-like sizes is written to a temporary folder.
The baseline decodes and pads every image up front (untimed), stacks them into the batches
``lostreg.run`` forms (one padded size per batch) and times only ``.to(device)`` plus
``model.forward_features`` per batch. The run is timed as a whole: ``run_benchmark`` with
the same backbone object (decoding in DataLoader workers, padding, last-layer k, LOST,
CorLoc, durable writes). Ratio = run images/s / forward images/s; the goal (>= 0.9) says
decoding, padding, LOST and writing hide behind the forward.

Also timed: lostreg's own ``extract_features`` (stops at the last block's qkv) over the same
tensors; the pipeline's non-finite check (``finite_images``: one reduction per batch, issue 20
row 1) against the extraction it follows, each batch timed on its own in the same loop (so a
busy machine slows both alike); and, once untimed, the run's boxes are checked against
``lost`` on those features. The run itself includes the check.

    python benchmarks/bench_extraction.py            # CPU defaults: 64 images at half size
    python benchmarks/bench_extraction.py --device cuda --images 500 --size-scale 1 \\
        --batch-size 64 --num-workers 8 --precision bf16 --model dinov2_vitl14_reg4
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    add_output_options,
    add_run_options,
    facts_rows,
    machine_facts,
    median,
    resolve_device,
    result_block,
    sample_sizes,
    save_json,
    scratch_folder,
    timed,
    workers_label,
    write_voc_tree,
)
from lostreg.backbones import Backbone, create_backbone  # noqa: E402
from lostreg.datasets.base import DatasetIndex, load_rgb  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.features.extract import extract_features, preprocess  # noqa: E402
from lostreg.features.pipeline import (  # noqa: E402
    AUTOCAST_DTYPES,  # noqa: E402
    finite_images,
    set_numerics,
    size_batches,
)
from lostreg.io import read_jsonl  # noqa: E402
from lostreg.methods.lost import lost  # noqa: E402
from lostreg.run import RunConfig, run_benchmark  # noqa: E402
from lostreg.runs.config import PRECISIONS  # noqa: E402


@dataclass
class ReadyBatch:
    """Decoded, normalised, padded images of one padded size, stacked on the host."""

    positions: list[int]
    images: torch.Tensor
    sizes: list[tuple[int, int]]


def prepare_batches(index: DatasetIndex, backbone: Backbone, batch_size: int) -> list[ReadyBatch]:
    """Decode and pad every image once, batched exactly as ``lostreg.run`` batches them."""
    batches = []
    for positions in size_batches(index.records, backbone.patch_size, batch_size):
        decoded = [preprocess(load_rgb(index.records[p].path), backbone.mean, backbone.std,
                              backbone.patch_size) for p in positions]
        batches.append(ReadyBatch(list(positions), torch.stack([t for t, _ in decoded]),
                                  [size for _, size in decoded]))
    return batches


@torch.inference_mode()
def forward_loop(batches: Sequence[ReadyBatch], backbone: Backbone, device: torch.device,
                 precision: str, mode: str = "timm") -> list[torch.Tensor]:
    """The bare loop: ``timm`` = ``model.forward_features``; ``qkv`` = lostreg's
    ``extract_features`` (the last block's k only). Returns one small tensor per batch so the
    work cannot be skipped (a copy, not a view: a view would keep every batch's whole output
    alive on the device); on a GPU the caller's timer synchronises."""
    autocast = AUTOCAST_DTYPES[precision]
    outputs = []
    for batch in batches:
        images = batch.images.to(device, non_blocking=True)
        if mode == "qkv":
            outputs.append(extract_features(backbone, images, "k", autocast)[:, 0, 0].clone())
            continue
        with torch.autocast(device.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            outputs.append(backbone.model.forward_features(images)[:, 0, 0].clone())
    return outputs


@torch.inference_mode()
def check_overhead(batches: Sequence[ReadyBatch], backbone: Backbone, device: torch.device,
                   precision: str) -> tuple[float, float]:
    """Seconds of ``extract_features`` and of the non-finite check on its output, summed over
    the batches, each step timed alone (synchronised on a GPU: a benchmark may wait where the
    pipeline does not)."""
    autocast = AUTOCAST_DTYPES[precision]
    extract_s = check_s = 0.0
    for batch in batches:
        images = batch.images.to(device)
        seconds, feats = timed(lambda i=images: extract_features(backbone, i, "k", autocast),
                               device)
        extract_s += seconds
        check_s += timed(lambda f=feats: finite_images(f), device)[0]
    return extract_s, check_s


def run_once(index: DatasetIndex, backbone: Backbone, output: Path, device: torch.device,
             batch_size: int, precision: str, num_workers: int | None, k_patches: int = 100):
    """One fresh ``run_benchmark`` (a new output folder, so nothing is resumed)."""
    config = RunConfig(model=backbone.spec.name, dataset=index.name, data_root=index.root,
                       weights="random" if backbone.weights.is_random else "hub",
                       k_patches=k_patches, device=str(device), batch_size=batch_size,
                       output=output, precision=precision, download=False,
                       num_workers=num_workers, progress=False)
    return run_benchmark(config, backbone=backbone, index=index)


def check_run(run_dir: Path, batches: Sequence[ReadyBatch], backbone: Backbone,
              device: torch.device, precision: str, index: DatasetIndex,
              k_patches: int = 100) -> tuple[int, int]:
    """Boxes in the run's predictions.jsonl that equal ``lost`` on the baseline's own
    features, out of all images: both paths must do the same work."""
    by_id = {line["image_id"]: line for line in read_jsonl(run_dir / "predictions.jsonl")}
    same = 0
    patch = backbone.patch_size
    for batch in batches:
        images = batch.images.to(device)
        feats = extract_features(backbone, images, backbone.spec.default_feature,
                                 AUTOCAST_DTYPES[precision])
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        boxes = lost(feats, grid, patch, batch.sizes, k_patches).box.cpu().tolist()
        for position, box in zip(batch.positions, boxes, strict=True):
            line = by_id.get(index.records[position].image_id)
            same += line is not None and line["box"] == box
    return same, len(index.records)


def measure(index: DatasetIndex, backbone: Backbone, device: torch.device, workdir: Path,
            batch_size: int = 16, precision: str = "fp32", num_workers: int | None = None,
            repeats: int = 1, check: bool = True) -> dict:
    """Warm up, then alternate forward loops and full runs ``repeats`` times (the loops under
    the numerics the run sets: TF32 off, which the first round would otherwise not have)."""
    set_numerics(precision)
    batches = prepare_batches(index, backbone, batch_size)
    n = len(index.records)
    forward_loop(batches[:1], backbone, device, precision, "timm")  # lazy init, kernels
    forward_loop(batches[:1], backbone, device, precision, "qkv")
    seconds: dict[str, list[float]] = {"timm_forward": [], "lostreg_qkv": [], "run": []}
    check_rounds: list[tuple[float, float]] = []
    run_dir = None
    for repeat in range(repeats):
        seconds["timm_forward"].append(timed(
            lambda: forward_loop(batches, backbone, device, precision, "timm"), device)[0])
        seconds["lostreg_qkv"].append(timed(
            lambda: forward_loop(batches, backbone, device, precision, "qkv"), device)[0])
        check_rounds.append(check_overhead(batches, backbone, device, precision))
        output = workdir / f"runs-{repeat}"
        elapsed, result = timed(lambda o=output: run_once(
            index, backbone, o, device, batch_size, precision, num_workers), device)
        seconds["run"].append(elapsed)
        run_dir = result.run_dir
        if result.n_images != n:
            raise LostregError(f"{run_dir}: the run scored {result.n_images} of {n} images")
    speed = {name: n / median(values) for name, values in seconds.items()}
    ratio = median([f / r for f, r in zip(seconds["timm_forward"], seconds["run"], strict=True)])
    ratio_qkv = median([f / r for f, r in zip(seconds["lostreg_qkv"], seconds["run"],
                                              strict=True)])
    ratio_check = median([e / (e + c) for e, c in check_rounds])
    out = {"n_images": n, "n_batches": len(batches), "seconds": seconds,
           "images_per_second": speed, "ratio_run_vs_timm_forward": ratio,
           "ratio_run_vs_lostreg_qkv": ratio_qkv,
           "ratio_qkv_vs_qkv_with_finite_check": ratio_check,
           "finite_check_seconds": [c for _, c in check_rounds], "run_dir": str(run_dir)}
    if check and run_dir is not None:
        out["same_boxes"] = check_run(run_dir, batches, backbone, device, precision, index)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", help="lostreg backbone name")
    parser.add_argument("--weights", default="random",
                        help="random (default: speed does not depend on weights), hub or PATH")
    parser.add_argument("--images", type=int, default=64, help="generated images")
    parser.add_argument("--size-scale", type=float, default=0.5,
                        help="scale of the VOC-like sizes (1.0 = 500 px long side)")
    add_run_options(parser)
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timing rounds")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the untimed check that the run's boxes equal lost on the "
                             "baseline's features")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "extraction") as workdir:
        try:
            device = resolve_device(args.device)
            if args.repeats < 1:
                raise LostregError("--repeats must be at least 1")
            sizes = sample_sizes(args.images, args.seed, args.size_scale)
            index = write_voc_tree(workdir / "data", sizes, args.seed)
            backbone = create_backbone(args.model, args.weights, device)
            result = measure(index, backbone, device, workdir, args.batch_size, args.precision,
                             args.num_workers, args.repeats, check=not args.no_check)
        except LostregError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    speed = result["images_per_second"]
    heights = sorted(h for h, _ in sizes)
    rows: list[tuple[str, object]] = [
        ("model / weights", f"{backbone.spec.name} ({backbone.spec.timm_name}) / {args.weights}"),
        ("images", f"{result['n_images']} generated, VOC-like sizes x{args.size_scale} "
                   f"(median height {heights[len(heights) // 2]} px)"),
        ("batches", f"{result['n_batches']} (batch size {args.batch_size})"),
        ("precision / workers / repeats",
         f"{args.precision} / {workers_label(args.num_workers, device)} / {args.repeats}"),
        ("timm forward_features: images/s", f"{speed['timm_forward']:.2f}"),
        ("lostreg extract_features: images/s", f"{speed['lostreg_qkv']:.2f}"),
        ("lostreg.run end to end: images/s", f"{speed['run']:.2f}"),
        ("seconds per round: timm / qkv / run", " / ".join(
            ",".join(f"{v:.2f}" for v in result["seconds"][k])
            for k in ("timm_forward", "lostreg_qkv", "run"))),
        ("finite check: seconds per round", ",".join(
            f"{v:.4f}" for v in result["finite_check_seconds"])),
        ("RATIO run / timm forward", f"{result['ratio_run_vs_timm_forward']:.3f}"),
        ("RATIO run / lostreg extract_features", f"{result['ratio_run_vs_lostreg_qkv']:.3f}"),
        ("RATIO extract_features / extract_features + finite check",
         f"{result['ratio_qkv_vs_qkv_with_finite_check']:.3f}"),
        ("goal (run / timm forward)",
         f">= 0.9: {'MET' if result['ratio_run_vs_timm_forward'] >= 0.9 else 'NOT MET'}"),
    ]
    if "same_boxes" in result:
        same, total = result["same_boxes"]
        rows.append(("run boxes == lost on baseline features", f"{same}/{total}"))
    facts = machine_facts(device)
    print(result_block("bench_extraction: lostreg.run vs bare forward", rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_extraction",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **{k: v for k, v in result.items() if k != "run_dir"},
                          "machine": facts})
    if "same_boxes" in result and result["same_boxes"][0] != result["same_boxes"][1]:
        print("error: the run's boxes differ from lost on the baseline's features",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A saliency study end to end (``--suite saliency``'s runs of one backbone on one set) vs a
bare forward loop over the same resized images.

A DUTS-TE-layout tree of generated scenes with known masks is written to a temporary folder
(``--images 5019`` is DUTS-TE's size; the default is a small smoke size). Its sides are drawn
in ``--sides`` (DUTS-TE's images are about 300-400 px a side) times ``--size-scale``.

* The baseline decodes every image and resizes it as TokenCut's saliency code does (LANCZOS
  to the nearest patch multiple), stacks them into the batches a run forms (one resized shape
  per batch), all untimed, then times ``.to(device)`` plus ``model.forward_features`` per batch.
* The run is timed as a whole: ``run_grid`` with the same backbone object and the suite's
  runs (LOST, TokenCut, TokenCut + bilateral solver, DINO-seg) in one pass: decoding and
  resizing, the forward (stopped at the last block's qkv), the methods batched on the device,
  the masks upsampled to each original size, the bilateral solver, the GT read and the
  per-image counts, durable predictions, metrics.json.

Ratio = run seconds / bare-forward seconds (lower is better: 1.0 means everything else hides
behind the forward). The run's ``metrics.json`` breaks its time down (the line writer, where
the masks are upsampled, refined and counted, is a background thread). With
``--refine none`` the bilateral solver is left out, to show what it costs; ``--refine all``
runs it four times per image (LOST and TokenCut, soft and binary scoring), which share each
image's decoded original, prepared solver and, per method, the solve
(``mask_lines.ImageRefinement``).

    python benchmarks/bench_saliency.py                      # CPU smoke: 24 images, half size
    python benchmarks/bench_saliency.py --device cuda --images 5019 --size-scale 1 \\
        --batch-size 64 --num-workers 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extraction import ReadyBatch, forward_loop  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_output_options,
    facts_rows,
    machine_facts,
    resolve_device,
    result_block,
    save_json,
    scratch_folder,
    synchronize,
    timed,
    warm_up,
)
from lostreg.backbones import Backbone, create_backbone, get_backbone_spec  # noqa: E402
from lostreg.cli import workers_count  # noqa: E402
from lostreg.datasets import load_dataset  # noqa: E402
from lostreg.datasets.base import DatasetIndex, load_rgb  # noqa: E402
from lostreg.datasets.mask_demo import generate_mask_tree  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.evaluation.saliency_protocol import resize_to_patch_multiple  # noqa: E402
from lostreg.features.extract import preprocess  # noqa: E402
from lostreg.features.pipeline import set_numerics, size_batches  # noqa: E402
from lostreg.run import RunConfig, run_grid  # noqa: E402

REFINES = {  # --refine: the refinements of each method in the pass
    "none": None,
    "bilateral": {"tokencut": ["none", "bilateral"]},
    "all": {m: ["none", "bilateral", "bilateral-binary"] for m in ("lost", "tokencut")},
}
STAGES = (("load_wait", "wait for decoded batches"), ("transfer", "copy to the device"),
          ("features", "features (forward)"), ("method", "methods (batched)"),
          ("write", "line writer: upsample, refine, count, write (background)"))


def prepare_batches(index: DatasetIndex, backbone: Backbone, batch_size: int) -> list[ReadyBatch]:
    """Decode and resize every image once, batched exactly as a saliency run batches them."""
    batches = []
    patch = backbone.patch_size
    for positions in size_batches(index.records, patch, batch_size, "resize"):
        tensors = []
        for p in positions:
            image = resize_to_patch_multiple(load_rgb(index.records[p].path), patch)
            tensors.append(preprocess(image, backbone.mean, backbone.std, patch)[0])
        batches.append(ReadyBatch(list(positions), torch.stack(tensors),
                                  [(t.shape[1], t.shape[2]) for t in tensors]))
    return batches


def run_suite(index: DatasetIndex, backbone: Backbone, output: Path, device: torch.device,
              batch_size: int, num_workers: int | None, refine: str) -> float:
    """The saliency suite's runs of one backbone on ``index``, in one pass (seconds)."""
    config = RunConfig(model=backbone.spec.name, dataset=index.name, data_root=index.root,
                       weights="random" if backbone.weights.is_random else "hub",
                       device=str(device), batch_size=batch_size, output=output,
                       download=False, num_workers=num_workers, progress=False,
                       allow_partial_dataset=True)
    refines = REFINES[refine]
    synchronize(device)
    start = time.perf_counter()
    run_grid(config, pairs=[(backbone.spec.name, index.name)],
             methods=["lost", "tokencut", "dinoseg"], refine_by_method=refines,
             backbone=backbone, index=index)
    synchronize(device)
    return time.perf_counter() - start


def measure(index: DatasetIndex, backbone: Backbone, device: torch.device, workdir: Path,
            batch_size: int, num_workers: int | None, refine: str) -> dict:
    """The bare forward, then the run (fresh folder), then the forward again; the ratio uses
    the mean of the two forwards (the machine's load drifts)."""
    set_numerics("fp32")
    warm_up(device)
    batches = prepare_batches(index, backbone, batch_size)
    forward_loop(batches[:1], backbone, device, "fp32")  # first-call costs, untimed
    first, _ = timed(lambda: forward_loop(batches, backbone, device, "fp32"), device)
    run_seconds = run_suite(index, backbone, workdir / "runs", device, batch_size, num_workers,
                            refine)
    second, _ = timed(lambda: forward_loop(batches, backbone, device, "fp32"), device)
    stages = {}
    for run_dir in sorted((workdir / "runs").iterdir()):
        config = json.loads((run_dir / "config.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        stages[f"{config['method']}/{config['refine']}"] = metrics["seconds"]
    forward = (first + second) / 2
    return {"n_images": len(index.records), "forward_seconds": [first, second],
            "run_seconds": run_seconds, "ratio": run_seconds / forward, "runs": stages}


def summary_rows(result: dict) -> list[tuple[str, object]]:
    n = result["n_images"]
    first, second = result["forward_seconds"]
    rows: list[tuple[str, object]] = [
        ("bare forward (before / after the run)",
         f"{first:.2f} s / {second:.2f} s ({1e3 * (first + second) / 2 / n:.1f} ms/image)"),
        ("saliency run, every run of the pass", f"{result['run_seconds']:.2f} s "
                                                f"({1e3 * result['run_seconds'] / n:.1f} ms/image)"),
        ("ratio run / bare forward", f"{result['ratio']:.2f}"),
    ]
    pass_seconds = next(iter(result["runs"].values()))
    for key, label in STAGES:
        rows.append((f"  {label}", f"{1e3 * pass_seconds[key] / n:.1f} ms/image"))
    rows.append(("runs in the pass", ", ".join(result["runs"])))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--model", default="dino_vits16",
                        help="backbone (random weights: speed does not depend on them)")
    parser.add_argument("--images", type=int, default=24, help="generated images (DUTS-TE: 5019)")
    parser.add_argument("--sides", default="300,400", help="min,max side in pixels")
    parser.add_argument("--size-scale", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", default="auto", help="decoding workers (auto, or N)")
    parser.add_argument("--refine", default="bilateral", choices=tuple(REFINES),
                        help="bilateral: TokenCut also with the solver, as the suite runs it; "
                             "all: LOST and TokenCut each plain, bilateral and "
                             "bilateral-binary (four refined runs sharing each image's solver)")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "saliency") as workdir:
        try:
            device = resolve_device(args.device)
            low, high = (round(int(v) * args.size_scale) for v in args.sides.split(","))
            if args.images < 1 or not 16 <= low <= high:
                raise LostregError("--images must be >= 1 and --sides x --size-scale at least "
                                   "16 px")
            generate_mask_tree(workdir / "data", "duts_te", args.images, seed=args.seed,
                               sizes=(low, high), grey_borders=True)
            index = load_dataset("duts_te", workdir / "data", download=False)
            backbone = create_backbone(get_backbone_spec(args.model), "random", device)
            result = measure(index, backbone, device, workdir, args.batch_size,
                             workers_count(args.num_workers), args.refine)
        except (LostregError, ValueError, argparse.ArgumentTypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    facts = machine_facts(device)
    rows = [("images", f"{result['n_images']} generated (DUTS-TE layout), sides "
                       f"{low}-{high} px"),
            ("model / batch size", f"{args.model} (random weights) / {args.batch_size}"),
            *summary_rows(result)]
    print(result_block("bench_saliency: a saliency pass vs the bare forward", rows
                       + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_saliency",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **result, "machine": facts})
    return 0


if __name__ == "__main__":
    sys.exit(main())

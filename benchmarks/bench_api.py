"""``lostreg.evaluate(module)`` (a training-loop look) vs a bare forward loop over the same images.

A VOC-format tree of generated scenes with VOC-like sizes is written to a temporary folder. The
baseline decodes and pads every image up front (untimed), stacks them into the batches a run
forms and times only ``module.forward_features`` per batch. ``evaluate`` is timed as a whole, as
a training loop would call it: the module's state hashed (its identity), its adapter chosen and
its layout probed, the dataset indexed, the run folder written, the forward (stopped at the last
block's qkv), LOST, the durable predictions and metrics. Each round scores a fresh output folder
(a new look); then one call on the same folder (already finished: what a repeated call costs)
and the state hash alone (it grows with the parameters, not the images) are timed.

    python benchmarks/bench_api.py                                # CPU: 50 images at half size
    python benchmarks/bench_api.py --device cuda --images 500 --size-scale 1 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extraction import forward_loop, prepare_batches  # noqa: E402
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
    timed,
    write_voc_tree,
)
from lostreg.api import evaluate  # noqa: E402
from lostreg.backbones.plugin import IMAGENET_MEAN, IMAGENET_STD, state_sha256  # noqa: E402
from lostreg.datasets.base import DatasetIndex  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.features.pipeline import set_numerics  # noqa: E402

GOAL = 1.25  # evaluate's seconds / the bare forward's: the look's overheads stay small


def tiny_vit(arch: str, depth: int, device: torch.device) -> torch.nn.Module:
    """A randomly initialised timm ViT (speed does not depend on the weights) at any size."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, dynamic_img_size=True, depth=depth)
    return model.to(device).eval()


def look(model: torch.nn.Module, index: DatasetIndex, output: Path, device: torch.device,
         batch_size: int):
    """One ``evaluate`` call as a training loop makes it (scratch, all the tree's images)."""
    return evaluate(model, dataset="voc07", data_root=index.root.parent, output=output,
                    device=str(device), batch_size=batch_size, num_workers=0, no_progress=True,
                    no_download=True, allow_partial_dataset=True, scratch=True)


def measure(index: DatasetIndex, model: torch.nn.Module, device: torch.device, workdir: Path,
            batch_size: int = 16, repeats: int = 2) -> dict:
    """Warm up, then alternate the bare forward loop and a fresh ``evaluate`` ``repeats``
    times (under the numerics a run sets: TF32 off); then one already-finished call and the
    state hash alone."""
    set_numerics("fp32")
    patch = int(model.patch_embed.patch_size[0])
    shim = SimpleNamespace(model=model, patch_size=patch, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batches = prepare_batches(index, shim, batch_size)  # type: ignore[arg-type]
    forward_loop(batches[:1], shim, device, "fp32", "timm")  # type: ignore[arg-type]
    seconds: dict[str, list[float]] = {"forward": [], "evaluate": []}
    result = None
    for repeat in range(repeats):
        seconds["forward"].append(timed(lambda: forward_loop(
            batches, shim, device, "fp32", "timm"), device)[0])  # type: ignore[arg-type]
        elapsed, result = timed(lambda r=repeat: look(model, index, workdir / f"runs-{r}",
                                                      device, batch_size), device)
        seconds["evaluate"].append(elapsed)
        if result.runs[0].n_images != len(index.records):
            raise LostregError(f"{result.run_dirs[0]}: scored {result.runs[0].n_images} of "
                               f"{len(index.records)} images")
    again, repeated = timed(lambda: look(model, index, workdir / f"runs-{repeats - 1}", device,
                                         batch_size), device)
    tick = time.perf_counter()
    state_sha256([model])
    hashing = time.perf_counter() - tick
    ratio = median([e / f for e, f in zip(seconds["evaluate"], seconds["forward"], strict=True)])
    return {"n_images": len(index.records), "n_batches": len(batches), "seconds": seconds,
            "ratio_evaluate_vs_forward": ratio, "already_finished_seconds": again,
            "already_finished_status": repeated.runs[0].status, "state_hash_seconds": hashing,
            "num_params": sum(p.numel() for p in model.parameters()),
            "corloc": result.corloc if result is not None else None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch16_224", help="timm architecture")
    parser.add_argument("--depth", type=int, default=12, help="transformer blocks")
    parser.add_argument("--images", type=int, default=50, help="generated images")
    parser.add_argument("--size-scale", type=float, default=0.5,
                        help="scale of the VOC-like sizes (1.0 = 500 px long side)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with scratch_folder(args.workdir, "api") as workdir:
        try:
            device = resolve_device(args.device)
            if args.repeats < 1:
                raise LostregError("--repeats must be at least 1")
            sizes = sample_sizes(args.images, args.seed, args.size_scale)
            index = write_voc_tree(workdir / "data" / "VOC2007", sizes, args.seed)
            model = tiny_vit(args.arch, args.depth, device)
            result = measure(index, model, device, workdir, args.batch_size, args.repeats)
        except LostregError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    n = result["n_images"]
    forward, look_s = median(result["seconds"]["forward"]), median(result["seconds"]["evaluate"])
    rows: list[tuple[str, object]] = [
        ("model", f"{args.arch} depth {args.depth}, random init "
                  f"({result['num_params'] / 1e6:.1f} M parameters)"),
        ("images / batches", f"{n} generated, VOC-like sizes x{args.size_scale} / "
                             f"{result['n_batches']} (batch size {args.batch_size})"),
        ("bare forward_features: s (images/s)", f"{forward:.2f} ({n / forward:.2f})"),
        ("evaluate, a fresh look: s (images/s)", f"{look_s:.2f} ({n / look_s:.2f})"),
        ("seconds per round: forward / evaluate", " / ".join(
            ",".join(f"{v:.2f}" for v in result["seconds"][k]) for k in ("forward", "evaluate"))),
        ("evaluate again (already finished): s", f"{result['already_finished_seconds']:.2f} "
                                                  f"({result['already_finished_status']})"),
        ("state sha256 alone: s", f"{result['state_hash_seconds']:.3f}"),
        ("RATIO evaluate / bare forward (seconds)", f"{result['ratio_evaluate_vs_forward']:.3f}"),
        ("goal", f"<= {GOAL}: {'MET' if result['ratio_evaluate_vs_forward'] <= GOAL else 'NOT MET'}"),
    ]
    facts = machine_facts(device)
    print(result_block("bench_api: lostreg.evaluate(module) vs bare forward", rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_api", "args": {k: str(v) for k, v in vars(args).items()},
                          **result, "machine": facts})
    return 0


if __name__ == "__main__":
    sys.exit(main())

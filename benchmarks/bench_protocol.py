"""The whole protocol grid vs one run: ``lostreg.reports.protocol`` (144 LOST settings in one pass)
against a single ``lostreg.run`` of the same model on the same images, in one run.

A VOC-format tree of generated scenes with VOC-like sizes is written to a temporary folder.
Each round times, with the same built backbone and the same indexed images, in fresh output
folders: (1) one run (last-layer keys, no normalisation, bias 0, k 100); (2) the protocol's
pass over the default grid (q/k/v x the last four blocks x none/l2 and 12 biases), then its
study (reading the 144 run folders back, bootstrap intervals, selection, figures, report).
Rounds alternate, so load on a shared machine hits both alike; medians are reported.

Where the time goes is measured by wrapping, in every round, the feature extraction
(``lostreg.features.pipeline.extract``), the LOST method's ``run`` and ``run_many`` (one Gram
matrix for all the biases and k of a feature map), formatting and appending the prediction
lines (``Pass._write`` on the line writer's thread, overlapping the main thread,
with ``RunFolder.append``; files are synced when the writer is idle), opening and finishing
the run folders
(``lostreg.runs.sweep.open_runs`` / ``finish_run``, and ``git_commit`` inside the first), the
per-run L2 normalisation and image decoding; on a GPU each wrapper
synchronises the device so the seconds are the work's own. The single run's boxes are checked
against the protocol's run of the same setting (identical predictions files).

    python benchmarks/bench_protocol.py                       # CPU: ViT-S/14, 24 images x0.6
    python benchmarks/bench_protocol.py --profile             # + cProfile of an extra pass
    python benchmarks/bench_protocol.py --device cuda --images 500 --size-scale 1 \\
        --batch-size 64 --model dinov2_vitl14_reg4 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lostreg.features.pipeline as pipeline_module  # noqa: E402
import lostreg.reports.protocol.files as files_module  # noqa: E402
import lostreg.reports.protocol.study as study_module  # noqa: E402
import lostreg.runs.folder as rundir_module  # noqa: E402
import lostreg.runs.sweep as sweep_module  # noqa: E402
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
    synchronize,
    warm_up,
    workers_label,
    write_voc_tree,
)
from lostreg.backbones import Backbone, create_backbone  # noqa: E402
from lostreg.datasets.base import DatasetIndex  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.methods import METHODS  # noqa: E402
from lostreg.reports.protocol import ProtocolGrid, run_passes  # noqa: E402
from lostreg.run import RunConfig, run_grid  # noqa: E402
from lostreg.runs.folder import RunFolder  # noqa: E402

GOAL_GPU = 3.0  # protocol / one run, on a GPU (issue 12)
# parts of a pass timed on the main thread (they add up, with "other", to the pass)
PARTS = ("extract", "lost", "normalize", "open_runs", "finish_runs", "decode")
# timed inside another part, or on the line writer's thread (overlapping the main thread):
# shown, not subtracted
NESTED = {"git_commit": "open_runs", "write_lines": "line writer thread",
          "append": "write_lines"}
STUDY_PARTS = ("study_read", "study_cis", "study_draw", "study_save_figures")


@contextlib.contextmanager
def instrumented(device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent in each part of a pass (``PARTS``) while the block runs."""
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)

    def timer(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            synchronize(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(device)
                seconds[name] += time.perf_counter() - start
                counts[name] += 1
        return wrapped

    lost = METHODS["lost"]
    with pytest_free_patch() as patch:
        patch(pipeline_module, "extract", timer("extract", pipeline_module.extract))
        patch(RunFolder, "append", timer("append", RunFolder.append))
        patch(sweep_module.Pass, "_write", timer("write_lines", sweep_module.Pass._write))
        patch(sweep_module, "open_runs", timer("open_runs", sweep_module.open_runs))
        patch(sweep_module, "finish_run", timer("finish_runs", sweep_module.finish_run))
        patch(pipeline_module.PaddedImages, "__getitem__",
              timer("decode", pipeline_module.PaddedImages.__getitem__))
        patch(torch.nn.functional, "normalize", timer("normalize", torch.nn.functional.normalize))
        patch(rundir_module, "checkout_commit", timer("git_commit", rundir_module.checkout_commit))
        patch(study_module, "load_grid_runs", timer("study_read", study_module.load_grid_runs))
        patch(study_module, "protocol_frame", timer("study_cis", study_module.protocol_frame))
        patch(files_module, "study_figures", timer("study_draw", files_module.study_figures))
        patch(files_module, "save_figure", timer("study_save_figures", files_module.save_figure))
        METHODS["lost"] = dataclasses.replace(lost, run=timer("lost", lost.run),
                                              run_many=timer("lost", lost.run_many))
        try:
            yield seconds
        finally:
            METHODS["lost"] = lost
    seconds.update({f"calls_{k}": v for k, v in counts.items()})


@contextlib.contextmanager
def pytest_free_patch() -> Iterator[Callable[[Any, str, Any], None]]:
    """``setattr`` that is undone on exit (monkeypatch without pytest)."""
    undo: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    try:
        yield patch
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)


def base_config(backbone: Backbone, index: DatasetIndex, output: Path, device: torch.device,
                batch_size: int, num_workers: int | None) -> RunConfig:
    """One run's settings: LOST's defaults on last-layer keys (a point of the grid)."""
    return RunConfig(model=backbone.spec.name, dataset=index.name, weights=backbone.weights.source,
                     device=str(device), batch_size=batch_size, output=output,
                     num_workers=num_workers, progress=False, features="k")


def single_round(backbone: Backbone, index: DatasetIndex, config: RunConfig,
                 device: torch.device) -> dict[str, Any]:
    with instrumented(device) as parts:
        start = time.perf_counter()
        (result,) = run_grid(config, pairs=[(config.model, config.dataset)], sweep=[config],
                             backbone=backbone, index=index)
        total = time.perf_counter() - start
    return {"total": total, "parts": dict(parts), "run_dir": result.run_dir}


def protocol_round(backbone: Backbone, index: DatasetIndex, config: RunConfig,
                   device: torch.device, study_dir: Path,
                   profile: cProfile.Profile | None = None) -> dict[str, Any]:
    grid = ProtocolGrid()
    with instrumented(device) as parts:
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        results = run_passes(config, grid, backbone=backbone, index=index)
        if profile is not None:
            profile.disable()
        passed = time.perf_counter()
        study = study_module.build_study([r.run_dir for r in results], grid,
                                         runs_dir=config.output, default_feature="k")
        files_module.write_study(study, study_dir)
        done = time.perf_counter()
    return {"pass": passed - start, "study": done - passed, "total": done - start,
            "parts": dict(parts), "n_runs": len(results),
            "reference_dir": (study.point_row(study.reference)["run_id"]
                              if study.reference is not None else None)}


def measure(index: DatasetIndex, backbone: Backbone, device: torch.device, workdir: Path,
            batch_size: int, num_workers: int | None, repeats: int,
            profile: bool = False) -> dict[str, Any]:
    """Alternating rounds of one run and the protocol; medians, shares and the box check."""
    singles, protocols = [], []
    warm_up(device)
    for round_ in range(repeats):
        config = base_config(backbone, index, workdir / f"single{round_}", device, batch_size,
                             num_workers)
        singles.append(single_round(backbone, index, config, device))
        config = dataclasses.replace(config, output=workdir / f"protocol{round_}")
        protocols.append(protocol_round(backbone, index, config, device,
                                        workdir / f"study{round_}"))
    same = None
    last = protocols[-1]
    if last["reference_dir"] is not None:
        mine = (singles[-1]["run_dir"] / "predictions.jsonl").read_bytes()
        theirs = (workdir / f"protocol{repeats - 1}" / last["reference_dir"]
                  / "predictions.jsonl").read_bytes()
        same = mine == theirs
    single_total = median([s["total"] for s in singles])
    protocol_total = median([p["total"] for p in protocols])
    result = {
        "n_images": len(index.records), "repeats": repeats,
        "seconds": {"single": [s["total"] for s in singles],
                    "protocol_pass": [p["pass"] for p in protocols],
                    "protocol_study": [p["study"] for p in protocols]},
        "ratio_protocol_vs_single": protocol_total / single_total,
        "ratio_pass_vs_single": median([p["pass"] for p in protocols]) / single_total,
        "single_parts": _median_parts([s["parts"] for s in singles]),
        "protocol_parts": _median_parts([p["parts"] for p in protocols]),
        "protocol_total": protocol_total, "protocol_pass": median([p["pass"] for p in protocols]),
        "protocol_study": median([p["study"] for p in protocols]), "single_total": single_total,
        "n_runs": last["n_runs"], "same_boxes_as_single": same,
    }
    if profile:  # an extra round, not timed: cProfile slows what it watches
        profiler = cProfile.Profile()
        config = dataclasses.replace(config, output=workdir / "protocol-profiled")
        protocol_round(backbone, index, config, device, workdir / "study-profiled", profiler)
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(25)
        result["profile"] = buffer.getvalue()
    return result


def _median_parts(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for parts in rounds for k in parts})
    return {k: median([parts.get(k, 0.0) for parts in rounds]) for k in keys}


def share_rows(label: str, parts: dict[str, float], total: float) -> list[tuple[str, object]]:
    """``label: part`` rows with seconds and share of ``total`` (and the rest as ``other``)."""
    rows = []
    for name in PARTS:
        value = parts.get(name, 0.0)
        calls = int(parts.get(f"calls_{name}", 0))
        rows.append((f"{label} {name}", f"{value:.2f} s ({100 * value / total:.1f}%, "
                                        f"{calls} calls)"))
    for name, owner in NESTED.items():
        value = parts.get(name, 0.0)
        rows.append((f"{label} {owner}: {name}" if owner.endswith("thread")
                     else f"{label} {owner}: of which {name}",
                     f"{value:.2f} s ({int(parts.get(f'calls_{name}', 0))} calls)"))
    other = total - sum(parts.get(name, 0.0) for name in PARTS)  # the pass: study excluded
    rows.append((f"{label} other", f"{other:.2f} s ({100 * other / total:.1f}%)"))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dinov2_vits14_reg4")
    parser.add_argument("--weights", default="random",
                        help="random (timing only), hub or a checkpoint PATH")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size-scale", type=float, default=0.6,
                        help="scale of the VOC-like image sizes (1 = 500 px long side)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of the last protocol pass")
    add_output_options(parser)
    add_run_options(parser)
    return parser


def report(args: argparse.Namespace, result: dict[str, Any], backbone: Backbone,
           device: torch.device) -> str:
    ratio = result["ratio_protocol_vs_single"]
    goal = (f"<= {GOAL_GPU:g}: {'MET' if ratio <= GOAL_GPU else 'NOT MET'}" if device.type ==
            "cuda" else f"<= {GOAL_GPU:g} on a GPU; not applicable to this CPU figure")
    rows: list[tuple[str, object]] = [
        ("model / weights", f"{backbone.spec.name} ({backbone.spec.timm_name}) / {args.weights}"),
        ("images", f"{result['n_images']} generated, VOC-like sizes x{args.size_scale}"),
        ("batch size / workers / repeats",
         f"{args.batch_size} / {workers_label(args.num_workers, device)} / {args.repeats}"),
        ("protocol settings (run folders)", result["n_runs"]),
        ("seconds per round: single", ", ".join(f"{v:.1f}" for v in result["seconds"]["single"])),
        ("seconds per round: protocol pass", ", ".join(
            f"{v:.1f}" for v in result["seconds"]["protocol_pass"])),
        ("seconds per round: protocol study", ", ".join(
            f"{v:.1f}" for v in result["seconds"]["protocol_study"])),
        ("RATIO protocol (pass + study) / single run", f"{ratio:.2f}"),
        ("RATIO protocol pass only / single run", f"{result['ratio_pass_vs_single']:.2f}"),
        ("goal", goal),
        *share_rows("single:", result["single_parts"], result["single_total"]),
        *share_rows("protocol:", result["protocol_parts"], result["protocol_pass"]),
        ("protocol: study (read back, CIs, figures)",
         f"{result['protocol_study']:.2f} s "
         f"({100 * result['protocol_study'] / result['protocol_total']:.1f}% of the total)"),
        *((f"protocol: study: {name[6:]}", f"{result['protocol_parts'].get(name, 0.0):.2f} s")
          for name in STUDY_PARTS),
        ("share of the protocol's total in LOST",
         f"{100 * result['protocol_parts'].get('lost', 0.0) / result['protocol_total']:.1f}%"),
        ("single run's boxes == protocol's same setting", result["same_boxes_as_single"]),
    ]
    return result_block("bench_protocol: lostreg.reports.protocol (144 settings) vs one lostreg.run",
                        rows + facts_rows(machine_facts(device)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "protocol") as workdir:
        try:
            device = resolve_device(args.device)
            if args.repeats < 1:
                raise LostregError("--repeats must be at least 1")
            index = write_voc_tree(workdir / "data", sample_sizes(args.images, args.seed,
                                                                  args.size_scale), args.seed)
            backbone = create_backbone(args.model, args.weights, device)
            result = measure(index, backbone, device, workdir, args.batch_size, args.num_workers,
                             args.repeats, args.profile)
        except LostregError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(report(args, result, backbone, device))
    if "profile" in result:
        print(result["profile"])
    save_json(args.json, {"benchmark": "bench_protocol",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **{k: v for k, v in result.items() if k != "profile"},
                          "machine": machine_facts(device)})
    if result["same_boxes_as_single"] is False:
        print("error: the single run's predictions differ from the protocol's run of the same "
              "setting", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

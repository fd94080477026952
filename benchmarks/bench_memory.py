"""Peak memory of a run vs dataset size: 200 vs 2000 small generated images (goal <= 1.2x).

Memory of a run must not grow with the number of images (predictions are streamed to disk,
features are never all held). Each run happens in a fresh child process (the same
``run_benchmark`` the CLI calls, random weights); the child reports its own peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the largest peak among its DataLoader
workers (``RUSAGE_CHILDREN``). Images are VOC-like shapes scaled to ~64x48 so 2000 images
take seconds on a CPU.

    python benchmarks/bench_memory.py                          # 200 vs 2000, CPU
    python benchmarks/bench_memory.py --small 500 --large 20000 --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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
    workers_label,
    write_voc_tree,
)
from lostreg.errors import LostregError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_RESULT_PREFIX = "BENCH_MEMORY_RESULT "


def child_main(data: Path, output: Path, model: str, device: str, batch_size: int,
               num_workers: int | None) -> dict:
    """Inside the child: one run over the VOC tree at ``data``; returns peak RSS in MiB."""
    import torch

    from lostreg.datasets.voc import load_voc_folder
    from lostreg.features.pipeline import decode_workers
    from lostreg.run import RunConfig, run_benchmark

    index = load_voc_folder(data, "bench")
    config = RunConfig(model=model, dataset=index.name, data_root=data, weights="random",
                       device=device, batch_size=batch_size, output=output, download=False,
                       num_workers=num_workers, progress=False)
    result = run_benchmark(config, index=index)
    workers = num_workers if num_workers is not None else decode_workers(torch.device(device))
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux
    return {
        "n_images": result.n_images,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
        # without workers RUSAGE_CHILDREN only sees short forks (git), which report the
        # parent's resident pages: not a worker's memory
        "workers_peak_rss_mib": (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale
                                 if workers else 0.0),
        **gpu_peak(device),
    }


def gpu_peak(device: str) -> dict:
    """Peak GPU memory the run's tensors took (the RSS does not see it), on CUDA only."""
    import torch

    if not device.startswith("cuda"):
        return {}
    return {"gpu_peak_mib": torch.cuda.max_memory_allocated(torch.device(device)) / 2**20}


def run_child(data: Path, output: Path, model: str, device: str, batch_size: int,
              num_workers: int | None, timeout: float = 900) -> dict:
    """Run ``child_main`` in a fresh interpreter and parse its one result line."""
    command = [sys.executable, "-m", "benchmarks.bench_memory", "--child", str(data),
               "--child-output", str(output), "--model", model, "--device", device,
               "--batch-size", str(batch_size),
               "--num-workers", "auto" if num_workers is None else str(num_workers)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise LostregError(f"memory child for {data} failed (exit {done.returncode}): {tail}")


def measure(workdir: Path, counts: Sequence[int], model: str = "dinov2_vits14",
            device: str = "cpu", batch_size: int = 16, num_workers: int | None = None,
            scale: float = 0.128, seed: int = 0) -> dict[int, dict]:
    """Generate one tree per image count (the larger a superset-like draw of the smaller) and
    run each in its own child process."""
    results = {}
    for count in counts:
        data = workdir / f"data-{count}"
        write_voc_tree(data, sample_sizes(count, seed, scale), seed)
        results[count] = run_child(data, workdir / f"runs-{count}", model, device, batch_size,
                                   num_workers)
        if results[count]["n_images"] != count:
            raise LostregError(f"{data}: the run scored {results[count]['n_images']} of {count}")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--small", type=int, default=200, help="images in the small run")
    parser.add_argument("--large", type=int, default=2000, help="images in the large run")
    parser.add_argument("--size-scale", type=float, default=0.128,
                        help="scale of the VOC-like sizes (0.128: 500x375 -> 64x48)")
    parser.add_argument("--model", default="dinov2_vits14")
    add_run_options(parser, device="cpu")
    add_output_options(parser)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None:  # inside the measured process
        result = child_main(args.child, args.child_output, args.model, args.device,
                            args.batch_size, args.num_workers)
        print(_RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    with scratch_folder(args.workdir, "memory") as workdir:
        try:
            device = resolve_device(args.device)
            if not 0 < args.small < args.large:
                raise LostregError(f"--small {args.small} --large {args.large}: need 0 < small < large")
            results = measure(workdir, [args.small, args.large], args.model, str(device),
                              args.batch_size, args.num_workers, args.size_scale, args.seed)
        except (LostregError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    small, large = results[args.small], results[args.large]
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    worker_ratio = (large["workers_peak_rss_mib"] / small["workers_peak_rss_mib"]
                    if small["workers_peak_rss_mib"] else None)
    rows: list[tuple[str, object]] = [
        ("model / device / batch / workers",
         f"{args.model} (random) / {device} / {args.batch_size} / "
         f"{workers_label(args.num_workers, device)}"),
        ("image sizes", f"VOC-like shapes x{args.size_scale} (500x375 -> "
                        f"{round(500 * args.size_scale)}x{round(375 * args.size_scale)})"),
        (f"peak RSS, {args.small} images (MiB)", f"{small['peak_rss_mib']:.1f}"),
        (f"peak RSS, {args.large} images (MiB)", f"{large['peak_rss_mib']:.1f}"),
        ("workers' peak RSS small / large (MiB)",
         f"{small['workers_peak_rss_mib']:.1f} / {large['workers_peak_rss_mib']:.1f}"
         if worker_ratio is not None else "n/a (no workers)"),
        (f"RATIO peak RSS {args.large} / {args.small}", f"{ratio:.3f}"),
        ("RATIO workers' peak RSS",
         f"{worker_ratio:.3f}" if worker_ratio is not None else "n/a (no workers)"),
        ("goal (main process)", f"<= 1.2: {'MET' if ratio <= 1.2 else 'NOT MET'}"),
    ]
    if "gpu_peak_mib" in small:
        rows.append(("peak GPU memory small / large (MiB), RATIO",
                     f"{small['gpu_peak_mib']:.1f} / {large['gpu_peak_mib']:.1f}, "
                     f"{large['gpu_peak_mib'] / max(small['gpu_peak_mib'], 1e-9):.3f}"))
    facts = machine_facts(device)
    print(result_block("bench_memory: peak RSS vs number of images", rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_memory",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          "results": {str(k): v for k, v in results.items()},
                          "ratio": ratio, "workers_ratio": worker_ratio, "machine": facts})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up: seconds from process start to each step of ``python -m lostreg.run``.

Runs the real command in fresh processes (``LOSTREG_TIMELINE=1``, see ``lostreg.timeline``) on
a generated VOC-format tree and reports, per step, the median time since the process started:
imports, device, dataset indexed, timm imported (and CUDA started, in a background thread),
backbone described, model built, first batch decoded / sent to the device / through the
methods, first run finished. The goal on a GPU: the first batch on the device within 4 s.
Also printed: the largest imports of ``import lostreg.run`` (``-X importtime``).

    python benchmarks/bench_startup.py                              # CPU, 64 images
    python benchmarks/bench_startup.py --device cuda --images 5011 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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
    write_voc_tree,
)
from lostreg.errors import LostregError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^timeline:\s+([0-9.]+) s  (.+)$")


def run_command(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """One fresh ``python -m lostreg.run``: its timeline marks (step -> seconds)."""
    done = subprocess.run([sys.executable, "-m", "lostreg.run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise LostregError(f"lostreg.run exited {done.returncode}: {done.stderr.strip()[-300:]}")
    marks = {}
    for line in done.stderr.splitlines():
        match = MARK.match(line)
        if match:
            marks[match.group(2)] = float(match.group(1))
    return marks


HEAVY = ("torch", "timm", "scipy", "scipy.ndimage", "scipy.linalg", "pandas", "matplotlib",
         "numpy", "PIL", "pycocotools", "huggingface_hub", "safetensors", "tqdm")


def heavy_imports() -> list[tuple[str, float]]:
    """Cumulative seconds of the heavy packages ``import lostreg.run`` loads (``-X
    importtime``); a package missing from the list is not imported at start-up."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import lostreg.run"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and parts[2].strip() in HEAVY:
            totals[parts[2].strip()] = int(parts[1]) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])


def run_tree(args: argparse.Namespace, device, workdir: Path, repeat: int,
             env: dict[str, str]) -> dict[str, float]:
    """The command on the generated tree, read as a partial VOC07 (``--allow-partial-dataset``):
    the real adapter indexes its XML files, as on VOC07."""
    return run_command(
        ["--model", args.model, "--weights", "random", "--dataset", "voc07",
         "--data-root", str(workdir / "voc"), "--no-download", "--allow-partial-dataset",
         "--output", str(workdir / f"r{repeat}"), "--device", str(device),
         "--batch-size", str(args.batch_size), "--precision", args.precision, "--no-progress"],
        env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--images", type=int, default=64, help="generated images")
    parser.add_argument("--size-scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "startup") as workdir:
        try:
            device = resolve_device(args.device)
            write_voc_tree(workdir / "voc" / "VOC2007", sample_sizes(args.images, args.seed,
                                                                      args.size_scale), args.seed)
            env = {**os.environ, "LOSTREG_TIMELINE": "1", "HF_HUB_OFFLINE": "1"}
            runs = [run_tree(args, device, workdir, repeat, env)  # a new output each time
                    for repeat in range(args.repeats)]
            imports = heavy_imports()
        except LostregError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    steps = list(dict.fromkeys(step for marks in runs for step in marks))
    rows: list[tuple[str, object]] = [
        ("model / device / precision", f"{args.model} / {device} / {args.precision}"),
        ("images / fresh processes", f"{args.images} / {args.repeats}"),
        *[(f"{step}", f"{median([m[step] for m in runs if step in m]):.2f} s") for step in steps],
        *[(f"import {name}", f"{seconds:.2f} s") for name, seconds in imports],
    ]
    first = [m["first batch sent to the device"] for m in runs if "first batch sent to the device" in m]
    if first and device.type == "cuda":
        rows.append(("goal (first batch on the GPU)", "<= 4 s: "
                     + ("MET" if median(first) <= 4 else "NOT MET")))
    facts = machine_facts(device)
    print(result_block("bench_startup: python -m lostreg.run, seconds since process start",
                       rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_startup", "runs": runs, "imports": imports,
                          "args": {k: str(v) for k, v in vars(args).items()}, "machine": facts})
    return 0


if __name__ == "__main__":
    sys.exit(main())

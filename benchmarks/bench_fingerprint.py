"""Image fingerprints: what keying the feature cache by content (sha256 of each image file)
costs, against decoding the same image.

On a generated VOC-format tree (VOC-like sizes, JPEG quality 90), per image and interleaved
over ``--rounds`` rounds (medians, so machine load hits every path alike):

* ``fingerprint``: ``lostreg.features.cache.image_fingerprint`` (sha256 of the file's bytes);
* ``decode``: ``lostreg.datasets.base.load_rgb`` (PIL decode to RGB), the least a run that
  computes features does per image;
* ``shard checksum``: sha256 over the fp32 features of one image of that size for a
  ViT-S/14 (``--dim`` 384), the check a cached rerun already does per image.

Ratio = fingerprint / decode (goal <= 0.1: the fingerprint must stay small next to the
decode); fingerprint / shard checksum says what it adds to a cached rerun. Files are in the
page cache (just written), so this is CPU cost; a cold read costs decode and hash alike.

    python benchmarks/bench_fingerprint.py
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    add_output_options,
    facts_rows,
    machine_facts,
    median,
    result_block,
    sample_sizes,
    save_json,
    scratch_folder,
    write_voc_tree,
)
from lostreg.datasets.base import load_rgb  # noqa: E402
from lostreg.errors import LostregError  # noqa: E402
from lostreg.features.cache import image_fingerprint  # noqa: E402

GOAL = 0.1


def _per_image(fn: Callable[[Path], object], paths: Sequence[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return (time.perf_counter() - start) / len(paths)


def measure(paths: Sequence[Path], feature_bytes: Sequence[bytes], rounds: int) -> dict:
    """Median seconds per image of each path over interleaved rounds."""
    times: dict[str, list[float]] = {"fingerprint": [], "decode": [], "shard_checksum": []}
    for _ in range(rounds):
        times["fingerprint"].append(_per_image(image_fingerprint, paths))
        times["decode"].append(_per_image(load_rgb, paths))
        start = time.perf_counter()
        for payload in feature_bytes:
            hashlib.sha256(payload).digest()
        times["shard_checksum"].append((time.perf_counter() - start) / len(feature_bytes))
    seconds = {name: median(values) for name, values in times.items()}
    sizes = [p.stat().st_size for p in paths]
    return {
        "n_images": len(paths),
        "mean_file_bytes": sum(sizes) / len(sizes),
        "mean_feature_bytes": sum(map(len, feature_bytes)) / len(feature_bytes),
        "seconds_per_image": seconds,
        "ratio_decode": seconds["fingerprint"] / seconds["decode"],
        "ratio_shard_checksum": seconds["fingerprint"] / seconds["shard_checksum"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="generated images")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--dim", type=int, default=384, help="feature dim for the checksum")
    add_output_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with scratch_folder(args.workdir, "fingerprint") as workdir:
        try:
            sizes = sample_sizes(args.images, args.seed)
            index = write_voc_tree(workdir / "data", sizes, args.seed)
            paths = [record.path for record in index.records]
            feature_bytes = [bytes(4 * args.dim * (-(-h // args.patch_size)) * (-(-w // args.patch_size)))
                             for h, w in sizes]
            result = measure(paths, feature_bytes, max(1, args.rounds))
        except LostregError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    secs = result["seconds_per_image"]
    rows: list[tuple[str, object]] = [
        ("images", f"{result['n_images']} generated, VOC-like sizes, JPEG q90, "
                   f"mean {result['mean_file_bytes'] / 1e3:.0f} kB"),
        ("fingerprint (sha256 of the file), ms/image", f"{1e3 * secs['fingerprint']:.3f}"),
        ("decode (PIL to RGB), ms/image", f"{1e3 * secs['decode']:.3f}"),
        (f"shard checksum ({result['mean_feature_bytes'] / 1e6:.2f} MB fp32 features), "
         "ms/image", f"{1e3 * secs['shard_checksum']:.3f}"),
        ("RATIO fingerprint / decode", f"{result['ratio_decode']:.3f}"),
        ("RATIO fingerprint / shard checksum", f"{result['ratio_shard_checksum']:.3f}"),
        ("goal (fingerprint / decode)",
         f"<= {GOAL}: {'MET' if result['ratio_decode'] <= GOAL else 'NOT MET'}"),
    ]
    facts = machine_facts()
    print(result_block("bench_fingerprint: image content hash vs decode", rows + facts_rows(facts)))
    save_json(args.json, {"benchmark": "bench_fingerprint",
                          "args": {k: str(v) for k, v in vars(args).items()},
                          **result, "machine": facts})
    return 0


if __name__ == "__main__":
    sys.exit(main())

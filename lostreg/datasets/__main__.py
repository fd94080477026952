"""``python -m lostreg.datasets download NAME`` / ``info NAME``: fetch or inspect a dataset.

Errors are one line on stderr (``error: ...``) with exit status 2, never a traceback: they are
about the user's files or network, and the message says which and what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lostreg.datasets import DATASETS, default_data_root, get_dataset, load_dataset
from lostreg.errors import LostregError, close_progress_bars, error_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lostreg.datasets", description="Download or inspect benchmark datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    names = ", ".join(DATASETS)

    download = commands.add_parser("download", help="download and unpack a dataset")
    download.add_argument("name", help=f"dataset name ({names})")
    download.add_argument("--data-root", type=Path, default=None,
                          help="data folder (default: $LOSTREG_DATA or ./datasets)")
    download.add_argument("--keep-archives", action="store_true",
                          help="keep the downloaded archives after unpacking")
    download.add_argument("--no-progress", action="store_true", help="no progress bars")

    info = commands.add_parser("info", help="index a dataset and print its size")
    info.add_argument("name", help=f"dataset name ({names})")
    info.add_argument("--data-root", type=Path, default=None,
                      help="data folder (default: $LOSTREG_DATA or ./datasets)")
    info.add_argument("--no-hard", action="store_true",
                      help="drop truncated/difficult objects and images left without one")
    info.add_argument("--download", action="store_true",
                      help="download (or generate) the dataset first if it is missing")
    return parser


def _download(name: str, root: Path, keep_archives: bool, progress: bool) -> None:
    from lostreg.datasets.demo import generate_demo
    from lostreg.datasets.download import NetworkError, prepare_coco20k, prepare_voc

    spec = get_dataset(name)
    if spec.is_present(root):
        print(f"{name}: already present under {root}")
        return
    try:
        if name == "demo":
            generate_demo(root)
        elif name in ("voc07", "voc12"):
            prepare_voc(root, 2007 if name == "voc07" else 2012, progress=progress,
                        keep_archive=keep_archives)
        elif name == "coco20k":
            prepare_coco20k(root, progress=progress, keep_archive=keep_archives)
        elif spec.download is not None:  # the saliency sets: their registry entry's recipe
            spec.download(root)
        else:  # pragma: no cover - a registry entry without a download recipe
            raise LostregError(f"{name}: no download recipe")
    except NetworkError as exc:
        raise LostregError(
            f"{exc}; offline? copy {spec.title} from a machine that has it to {root} "
            f"({spec.layout}), see 'Offline use' in datasets/README.md"
        ) from None
    print(f"{name}: ready under {root}")


def _info(name: str, root: Path, no_hard: bool, download: bool) -> None:
    spec = get_dataset(name)
    index = load_dataset(name, root, no_hard=no_hard, download=download,
                         download_hint="or add --download")
    n_objects = sum(len(record.boxes) for record in index.records)
    empty = sum(1 for record in index.records if not record.boxes)
    expected = "" if spec.expected_images is None or no_hard else (
        f" (expected {spec.expected_images})"
    )
    print(f"dataset: {name} ({spec.title}, {index.split}{', no_hard' if no_hard else ''})")
    print(f"folder: {index.root}")
    print(f"images: {len(index)}{expected}")
    print(f"objects: {n_objects}")
    print(f"images without objects: {empty}")
    checks = index.checks
    print("boxes clipped to their image: {boxes_clipped}, zero-area boxes: {zero_area_boxes}"
          .format(**checks))
    for check, where in index.check_examples.items():
        print(f"  first {check}: {where}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = args.data_root if args.data_root is not None else default_data_root()
    try:
        if args.command == "download":
            _download(args.name, root, args.keep_archives, not args.no_progress)
        else:
            _info(args.name, root, args.no_hard, args.download)
    except (LostregError, OSError) as exc:
        close_progress_bars()
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()  # the message on its own line, not after a download's bar
        print("error: interrupted", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

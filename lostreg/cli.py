"""``lostreg <command> ...``: one entry point for every stage's CLI."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS = {
    "run": ("lostreg.run", "score LOST CorLoc for a backbone on a dataset"),
    "datasets": ("lostreg.datasets.__main__", "download / inspect datasets"),
    "leaderboard": ("lostreg.leaderboard", "rebuild results/leaderboard.csv and comparison tables"),
    "analyze": ("lostreg.analyze", "token-norm diagnostics, failure attribution, visual report"),
    "verify": ("lostreg.verify", "compare our LOST with the official predictions"),
}


def add_compute_options(parser: argparse.ArgumentParser,
                        device_help: str = "auto, cpu or cuda[:N]") -> None:
    """``--device --batch-size --num-workers --no-progress``: the same for every command that
    runs a backbone over images (run, analyze, verify)."""
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument("--batch-size", type=int, default=16, help="max images per batch")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image decoding processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: lostreg <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:12s} {text}")
        print("\nLOST runs on the last block's attention keys (or q/v) of the patch tokens only:"
              "\nthe class token and every register token are removed. `lostreg run --help`.")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

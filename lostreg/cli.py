"""``lostreg <command> ...``: one entry point for every stage's CLI."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "run": ("lostreg.run", "score LOST CorLoc for a backbone on a dataset"),
    "datasets": ("lostreg.datasets.__main__", "download / inspect datasets"),
    "leaderboard": ("lostreg.leaderboard", "rebuild results/leaderboard.csv and comparison tables"),
    "analyze": ("lostreg.analyze", "token-norm diagnostics, failure attribution, visual report"),
    "verify": ("lostreg.verify", "compare our LOST with the official predictions"),
}


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

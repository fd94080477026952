"""``lostreg <command> ...``: one entry point for every stage's CLI."""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lostreg
from lostreg.version import checkout_commit

COMMANDS = {
    "run": ("lostreg.run", "score object discovery (LOST, TokenCut, DINO-seg) CorLoc for "
            "backbones on datasets"),
    "datasets": ("lostreg.datasets.__main__", "download / inspect datasets"),
    "leaderboard": ("lostreg.leaderboard", "rebuild results/leaderboard.csv and comparison tables"),
    "analyze": ("lostreg.analyze", "token-norm diagnostics, failure attribution, visual report"),
    "verify": ("lostreg.verify", "compare our LOST with the official predictions"),
    "protocol": ("lostreg.protocol", "LOST over a grid of protocols: published figures, best-of "
                 "and its held-out estimate"),
    "cache": ("lostreg.cache", "list the feature cache's folders; --delete-stale frees those of "
              "other lostreg versions"),
}


def version_text() -> str:
    """``lostreg 0.1.0 (commit 1a2b...)``: what ``--version`` prints, so that a bug report
    names the code that ran."""
    commit = checkout_commit()
    return f"lostreg {lostreg.__version__}" + (f" (commit {commit})" if commit else "")


class ListsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads a comma list starting with a minus (``--layer -1,-2``,
    ``--gram-bias -0.1,0``) as a value. Python 3.11's argparse takes only a lone negative
    number for a value and ``-1,-2`` for an unknown option; newer Pythons match any
    ``-<digit>`` start, as this does. Safe while no option of these parsers looks like a
    negative number."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not where the help text already says it, nor for
    options without one (``None``) or flags (``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def workers_count(text: str) -> int | None:
    """argparse type of ``--num-workers``: ``auto`` (None) or a whole number >= 0."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more (0 decodes in the main process)")
    return value


RUNS_DIR = Path("results/runs")


def add_runs_option(parser: argparse.ArgumentParser, help: str, *aliases: str,
                    dest: str = "runs") -> None:
    """``--runs DIR``: the folder that holds the run folders, spelled the same in every command
    (run, protocol, leaderboard, verify); ``aliases`` are a command's older spellings
    (``run --output``, ``verify --runs-dir``), kept working."""
    older = f" ({', '.join(aliases)}: older spelling{'s' if len(aliases) > 1 else ''})" \
        if aliases else ""
    parser.add_argument("--runs", *aliases, dest=dest, type=Path, default=RUNS_DIR,
                        metavar="DIR", help=help + older)


def comma_items(values: Sequence[str], flag: str) -> list[str]:
    """``["-1,-2", "-3"]`` -> ``["-1", "-2", "-3"]``: a list option's values, comma lists or
    separate words alike; an empty item (``-1,,-2``) is refused."""
    items = []
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                raise argparse.ArgumentTypeError(f"{flag} {value!r}: empty item in the comma list")
            items.append(part.strip())
    return items


class ListOption(argparse.Action):
    """A list option that takes a comma list (``--layers -1,-2``), the spelling of every
    lostreg command, and still the space-separated words it took before (``--layers -1 -2``).
    ``convert`` turns each item into its value; a bad item is argparse's one usage error."""

    def __init__(self, option_strings: Sequence[str], dest: str,
                 convert: Any = str, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.convert = convert

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        flag = option_string or self.dest
        try:
            items = comma_items(values if isinstance(values, list) else [values], flag)
            converted = [self.convert(item) for item in items]
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        except ValueError:
            bad = next(item for item in items if not _converts(self.convert, item))
            parser.error(f"{flag}: {bad!r} is not a valid value")
        setattr(namespace, self.dest, converted)


def _converts(convert: Any, item: str) -> bool:
    try:
        convert(item)
    except ValueError:
        return False
    return True


def add_model_data_options(parser: argparse.ArgumentParser, known_models: Sequence[str],
                           datasets: Sequence[str], model_help: str | None = None) -> None:
    """``--model --dataset --data-root --weights`` of the commands that take one backbone on
    one dataset (protocol, analyze norms and register-neurons). ``model_help`` given: the
    model is required and this is its help."""
    if model_help is None:
        parser.add_argument("--model", default="dinov2_reg4",
                            help="backbone short name or timm:<name>; known: "
                                 + ", ".join(known_models))
    else:
        parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--dataset", default="voc07", help=f"one of {', '.join(datasets)}")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset root (default: $LOSTREG_DATA or datasets/)")
    parser.add_argument("--weights", default="hub",
                        help="hub, a checkpoint PATH, or random (smoke run, never a result)")


def add_ttr_neurons_option(parser: argparse.ArgumentParser) -> None:
    """``--ttr-neurons FILE``: the register neurons of a ``+ttr`` model, the same in every
    command that builds one."""
    parser.add_argument("--ttr-neurons", type=Path, default=None, metavar="FILE",
                        help="the register neurons of a +ttr model (default: the list shipped "
                             "for it; python -m lostreg.analyze register-neurons finds them)")


def add_compute_options(parser: argparse.ArgumentParser,
                        device_help: str = "auto, cpu or cuda[:N]") -> None:
    """``--device --batch-size --num-workers --no-progress``: the same for every command that
    runs a backbone over images (run, analyze, verify)."""
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument("--batch-size", type=int, default=16, help="max images per batch")
    parser.add_argument("--num-workers", type=workers_count, default=None,
                        help="image decoding processes; 0 decodes in the main process (default: "
                             "auto = 0 when the model runs on the CPU, min(8, CPUs) on a GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def print_usage() -> None:
    """The commands, one line each, and where to read on."""
    lines = ["usage: lostreg <command> [options]   (lostreg --help, lostreg --version)",
             "", "commands:"]
    lines += [f"  {name:12s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Every method reads a block's attention features (LOST and TokenCut: keys, or q/v;",
              "DINO-seg: the class token's attention) of the patch tokens only: the class token",
              "and every register token are removed. `lostreg run --help`."]
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """``lostreg <command> ...``: hand the rest of the line to the command's own ``main``.
    Exit status 0 for ``--help``/``--version``; 2 for no command (a script that forgot it must
    not look successful) or an unknown one: the usage, then one error line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print_usage()
        return 0
    if args and args[0] in ("-V", "--version"):
        print(version_text())
        return 0
    if not args or args[0] not in COMMANDS:
        print_usage()
        if not args:
            print("error: name a command", file=sys.stderr)
            return 2
        close = difflib.get_close_matches(args[0], list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"error: unknown command {args[0]!r}{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

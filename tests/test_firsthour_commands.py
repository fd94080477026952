"""Issue #21 row 6: one spelling per concept across the commands, and usage lines that name
commands that exist.

* lists are comma lists everywhere (``analyze norms --layers -1,-2`` as ``run --layer -1,-2``),
  the space-separated words ``analyze`` took before still working;
* the folder of run folders is ``--runs`` in every command that reads or writes runs, the
  older ``run --output`` and ``verify --runs-dir`` kept as aliases;
* every usage line names ``python -m lostreg.<command>``: no ``lostreg-analyze``.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from lostreg import analyze, cli, run, verify
from lostreg import cache as cache_command
from lostreg.datasets import __main__ as datasets_main
from lostreg.reports import leaderboard
from lostreg.reports.protocol import cli as protocol_cli

REPO = Path(__file__).resolve().parents[1]


def installed_scripts() -> set[str]:
    """The console scripts ``pyproject.toml`` installs (``[project.scripts]``; tomllib is
    Python 3.11+, the project supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.MULTILINE))

PARSERS = {
    "run": run.build_parser,
    "protocol": protocol_cli.build_parser,
    "leaderboard": leaderboard.build_parser,
    "verify": verify.build_parser,
    "analyze": analyze.build_parser,
    "datasets": datasets_main._parser,
    "cache": cache_command.build_parser,
}
# list options that take paths: a path may hold a comma, so these stay space separated
PATH_LISTS = {"run", "norms"}


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += subparsers(child)
    return found


def norms(*argv: str) -> argparse.Namespace:
    return analyze.build_parser().parse_args(["norms", *argv])


@pytest.mark.parametrize("argv", [["--layers", "-1,-2"], ["--layers", "-1", "-2"],
                                  ["--layer", "-1,-2"], ["--layers=-1,-2"],
                                  ["--layers", "-1,-2", "--limit", "3"]])
def test_norms_layers_take_a_comma_list_and_the_older_words(argv) -> None:
    assert norms(*argv).layers == [-1, -2]


def test_norms_thresholds_and_show_images_take_comma_lists() -> None:
    assert norms("--threshold", "10,20.5").threshold == [10.0, 20.5]
    assert norms("--threshold", "10", "20.5").threshold == [10.0, 20.5]
    shown = analyze.build_parser().parse_args(["show", "--run", "r", "--images", "a,b", "c"])
    assert shown.images == ["a", "b", "c"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--layers", "-1,,-2"], "--layers '-1,,-2': empty item in the comma list"),
    (["--layers", "-1,x"], "--layers: 'x' is not a valid value"),
])
def test_a_bad_list_item_is_one_usage_error(capsys, argv, needle) -> None:
    with pytest.raises(SystemExit) as stopped:
        norms(*argv)
    assert stopped.value.code == 2
    assert needle in capsys.readouterr().err


def test_every_command_reads_blocks_as_layer_or_layers() -> None:
    assert run.build_parser().parse_args(["--layers", "-1,-2"]).layer == "-1,-2"
    assert run.build_parser().parse_args(["--layer", "-1,-2"]).layer == "-1,-2"
    assert protocol_cli.build_parser().parse_args(["--layer", "-1,-2"]).layers == "-1,-2"


@pytest.mark.parametrize(("name", "older", "dest"), [
    ("run", "--output", "output"), ("verify", "--runs-dir", "runs_dir"),
    ("protocol", None, "runs"), ("leaderboard", None, "runs")])
def test_the_runs_folder_is_runs_everywhere(name, older, dest) -> None:
    lead = ["lost-voc07"] if name == "verify" else []
    parser = PARSERS[name]()
    assert getattr(parser.parse_args([*lead, "--runs", "here"]), dest) == Path("here")
    if older is not None:
        assert getattr(parser.parse_args([*lead, older, "here"]), dest) == Path("here")
        assert older in parser.format_help()  # the older spelling is documented


def test_leaderboard_output_folder_is_output_like_the_other_commands() -> None:
    parser = leaderboard.build_parser()
    assert parser.parse_args(["--output", "o"]).out == Path("o")
    assert parser.parse_args(["--out", "o"]).out == Path("o")  # older spelling


def test_every_list_option_takes_a_comma_list() -> None:
    """A list option is a ``ListOption`` (commas, or the older words) unless it takes paths."""
    for name, build in PARSERS.items():
        for parser in subparsers(build()):
            for action in parser._actions:
                if action.nargs in ("+", "*") and action.dest not in PATH_LISTS:
                    assert isinstance(action, cli.ListOption), (name, action.option_strings)


def test_usage_lines_name_commands_that_exist() -> None:
    scripts = installed_scripts()
    for name, build in PARSERS.items():
        for parser in subparsers(build()):
            usage = parser.format_usage()
            match = re.match(r"usage: python -m (lostreg[\w.]*)", usage)
            assert match, (name, usage)
            importlib.import_module(match.group(1))  # a module python -m can run
            assert not re.search(r"lostreg-(?!run\b)\w+", parser.format_help()), name
    for command in ("run", "datasets", "leaderboard", "analyze", "verify", "protocol", "cache"):
        assert command in cli.COMMANDS
    assert scripts == {"lostreg", "lostreg-run"}


def test_no_document_names_a_command_that_is_not_installed() -> None:
    scripts = installed_scripts()
    for path in [REPO / "README.md", *(REPO / "lostreg").rglob("*.py"),
                 *(REPO / "scripts").glob("*.sh")]:
        for found in re.findall(r"`(lostreg-[a-z]+)\b", path.read_text(encoding="utf-8")):
            assert found in scripts, (path, found)

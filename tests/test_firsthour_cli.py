"""Issue #21 row 10: ``lostreg`` with no command is an error (exit 2, usage on stderr), and
``lostreg --version`` names the version and, in a checkout, the commit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lostreg
from lostreg import cli

REPO = Path(__file__).resolve().parents[1]
VERSION = re.compile(r"lostreg \d+\.\d+\.\d+( \(commit [0-9a-f]{40}(-dirty)?\))?")


def test_no_command_prints_the_usage_and_exits_2(capsys) -> None:
    """The usage on stdout as for --help, one error line on stderr (as for an unknown
    command), and a status that fails a script that forgot the command."""
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: lostreg <command>") and "  run " in captured.out
    assert captured.err == "error: name a command\n"


def test_no_command_from_the_shell_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "lostreg"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, "error: name a command\n")
    assert done.stdout.startswith("usage: lostreg <command>")


def test_help_still_exits_0(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: lostreg <command>")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_the_version_and_the_commit(flag, capsys) -> None:
    assert cli.main([flag]) == 0
    line = capsys.readouterr().out.strip()
    assert VERSION.fullmatch(line), line
    assert line.startswith(f"lostreg {lostreg.__version__}")
    if (REPO / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        assert f"(commit {head}" in line


def test_an_installed_copy_reports_no_commit(tmp_path, monkeypatch) -> None:
    """Outside a checkout (site-packages) there is no commit to name: not even the one of a
    repository the environment happens to sit in."""
    package = tmp_path / "site-packages" / "lostreg"
    package.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=False, capture_output=True)
    from lostreg.version import checkout_commit

    monkeypatch.setattr(lostreg, "__file__", str(package / "__init__.py"))
    checkout_commit.cache_clear()  # asked once per process: ask again for this copy
    try:
        assert checkout_commit() is None
        assert cli.version_text() == f"lostreg {lostreg.__version__}"
    finally:
        checkout_commit.cache_clear()

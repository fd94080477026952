"""Issue #21 rows 1 and 7: scripts/setup.sh installs only when pyproject.toml, the venv's
Python or the installed packages changed (stamp in .venv), installs without setuptools'
editable-install banner, and refuses a torch/torchvision pair that does not work together.

Nothing is installed: the script runs in a copy of the repository whose ``.venv/bin/python``
logs ``-m pip`` calls and runs everything else with the test's interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_setup_check_torch import BROKEN_TORCHVISION, WORKING_TORCH, fake_package

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "${1-}" = "-m" ] && [ "${2-}" = "pip" ]; then
  echo "pip ${*:3} | PYTHONWARNINGS=${PYTHONWARNINGS-}" >> "$PIP_LOG"
  exit 0
fi
exec %s "$@"
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of what setup.sh reads, with a .venv made by an older set-up (no stamp)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "scripts/check_torch.py", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON % sys.executable)
    python.chmod(0o755)
    return root


def setup(root: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run setup.sh; its result and the pip calls it made."""
    log = root / "pip.log"
    log.unlink(missing_ok=True)
    done = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PIP_LOG": str(log), **env})
    return done, log.read_text().splitlines() if log.exists() else []


def test_installs_once_then_only_when_pyproject_changes(checkout) -> None:
    done, pip = setup(checkout)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "setup: installing lostreg and its dependencies into .venv (a fresh " \
                          ".venv takes minutes)\n" and done.stdout == ""
    assert [call.split(" | ")[0] for call in pip] == [
        "pip install --quiet --upgrade pip", "pip install --quiet -e .[dev]"]
    assert pip[1].endswith("| PYTHONWARNINGS=ignore:Editable installation")
    stamp = (checkout / ".venv" / ".lostreg-setup").read_text()
    assert stamp.startswith("pyproject.toml sha256 ") and "\npython 3." in stamp

    done, pip = setup(checkout)
    assert (done.returncode, done.stdout, done.stderr, pip) == (0, "", "", [])

    with (checkout / "pyproject.toml").open("a") as file:
        file.write("\n# a new dependency\n")
    done, pip = setup(checkout)
    assert done.returncode == 0 and len(pip) == 2


def test_a_new_torch_is_checked_again(checkout, tmp_path) -> None:
    """The stamp holds torch's and torchvision's versions: a pair changed by hand is checked
    at the next call, and a pair that does not work is refused in one line, stamp-less, so
    every later call says it again until it is fixed."""
    assert setup(checkout)[0].returncode == 0
    site = tmp_path / "site"
    fake_package(site, "torch", "2.13.0+cpu", "2.13.0+cpu", WORKING_TORCH)
    fake_package(site, "torchvision", "0.28.0", "0.28.0+cu130", BROKEN_TORCHVISION,
                 requires="torch (==2.13.0)")
    for _ in range(2):
        done, pip = setup(checkout, PYTHONPATH=str(site))
        assert done.returncode == 1 and len(pip) == 2
        last = done.stderr.splitlines()[-1]
        assert last.startswith("error: torch 2.13.0+cpu is a CPU build but torchvision "
                               "0.28.0+cu130 is a CUDA 13.0 build; fix: ")
        assert " -m pip install --force-reinstall --no-deps torchvision==0.28.0+cpu " in last
        assert not (checkout / ".venv" / ".lostreg-setup").exists()

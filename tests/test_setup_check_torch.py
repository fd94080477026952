"""Issue #21 row 1: scripts/check_torch.py names a torch/torchvision pair that does not work
together, in one line with the command that fixes it. Nothing is installed here: the check
runs against fake ``torch``/``torchvision`` packages put first on PYTHONPATH, and its logic
against the records it reads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_torch.py"
CPU_FIX = ("pip install --force-reinstall --no-deps torchvision==0.28.0+cpu --index-url "
           "https://download.pytorch.org/whl/cpu")


def load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_torch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check = load_check()
Installed = check.Installed

WORKING_TORCH = '''__version__ = "{version}"
class version:
    cuda = None
class _Values(list):
    def tolist(self):
        return list(self)
def tensor(values):
    return _Values(values)
'''
WORKING_TORCHVISION = '''__version__ = "{version}"
from torchvision import ops
'''
NMS = '''import torch
def nms(boxes, scores, threshold):
    return torch.tensor([0])
'''
BROKEN_TORCHVISION = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def fake_package(site: Path, name: str, dist_version: str, build_version: str, init: str,
                 requires: str | None = None) -> None:
    """``site/name`` with ``version.py`` (the build tag) and a dist-info (what pip installed)."""
    package = site / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init.format(version=build_version))
    (package / "version.py").write_text(f"__version__ = '{build_version}'\ngit_version = 'x'\n")
    info = site / f"{name}-{dist_version}.dist-info"
    info.mkdir()
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {dist_version}\n"
    if requires:
        metadata += f"Requires-Dist: {requires}\n"
    (info / "METADATA").write_text(metadata)


def run_check(site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_reported_pair_is_named_with_its_fix(tmp_path) -> None:
    """What pip installed here when PyTorch's CPU index was unreachable: torch 2.13.0+cpu from
    a local wheel, torchvision 0.28.0 (CUDA 13.0) from PyPI; torchvision does not import."""
    fake_package(tmp_path, "torch", "2.13.0+cpu", "2.13.0+cpu", WORKING_TORCH)
    fake_package(tmp_path, "torchvision", "0.28.0", "0.28.0+cu130", BROKEN_TORCHVISION,
                 requires="torch (==2.13.0)")
    done = run_check(tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    line = done.stderr.strip()
    assert line.startswith("error: torch 2.13.0+cpu is a CPU build but torchvision 0.28.0+cu130 "
                           "is a CUDA 13.0 build; fix: ")
    assert CPU_FIX in line and "where that index is unreachable: " in line


def test_a_working_pair_passes_silently(tmp_path) -> None:
    fake_package(tmp_path, "torch", "2.14.1+cpu", "2.14.1+cpu", WORKING_TORCH)
    fake_package(tmp_path, "torchvision", "0.29.1+cpu", "0.29.1+cpu", WORKING_TORCHVISION,
                 requires="torch (==2.14.1)")
    (tmp_path / "torchvision" / "ops.py").write_text(NMS)
    done = run_check(tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_this_environment_passes() -> None:
    """The interpreter running the tests has a working pair (CI's .venv): no false alarm."""
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr) == (0, "")


def test_torchvision_built_for_another_torch() -> None:
    found = Installed("2.14.1", "2.14.1+cu130", "0.28.0", "0.28.0+cu130", "2.13.0")
    assert check.problem(found) == (
        "error: torchvision 0.28.0+cu130 is built for torch 2.13.0, not for the installed torch "
        "2.14.1+cu130; fix: pip install --force-reinstall --no-deps torchvision==0.29.1")


def test_a_cuda_torch_with_a_cpu_torchvision_is_caught_though_it_imports() -> None:
    """nms runs on CPU tensors then; it is the first CUDA box that would fail."""
    found = Installed("2.14.1", "2.14.1+cu130", "0.29.1+cpu", "0.29.1+cpu", "2.14.1")
    line = check.problem(found)
    assert line == ("error: torch 2.14.1+cu130 is a CUDA 13.0 build but torchvision 0.29.1+cpu "
                    "is a CPU build; fix: pip install --force-reinstall --no-deps "
                    "torchvision==0.29.1")


def test_a_failing_nms_is_reported_with_its_error() -> None:
    found = Installed("2.14.1", "2.14.1+cu130", "0.29.1", "0.29.1+cu130", "2.14.1",
                      torchvision_error="RuntimeError: CUDA driver missing")
    assert check.problem(found, pip=".venv/bin/python -m pip") == (
        "error: torchvision 0.29.1+cu130 does not work with torch 2.14.1+cu130 (RuntimeError: "
        "CUDA driver missing); fix: .venv/bin/python -m pip install --force-reinstall "
        "--no-deps torchvision==0.29.1")


def test_in_the_project_venv_the_fallback_is_a_fresh_set_up() -> None:
    found = Installed("2.13.0+cpu", "2.13.0+cpu", "0.28.0", "0.28.0+cu130", "2.13.0",
                      torchvision_error="RuntimeError: operator torchvision::nms does not exist")
    line = check.problem(found, fresh="rm -rf .venv && bash scripts/setup.sh")
    assert line is not None and "\n" not in line
    assert line.endswith(f"fix: {CPU_FIX} (where that index is unreachable: rm -rf .venv && "
                         "bash scripts/setup.sh, PyPI's CUDA build, about 6 GB)")


def test_a_source_build_without_a_pin_is_paired_by_its_release_number() -> None:
    mismatched = Installed("2.14.1", "2.14.1+cu130", "0.28.0a0", "0.28.0a0+abc", None)
    assert "is built for torch 2.13, not for the installed torch 2.14.1+cu130" in check.problem(mismatched)
    assert check.problem(Installed("2.14.1", "2.14.1+cu130", "0.29.0a0", "0.29.0a0", None)) is None


@pytest.mark.parametrize(("found", "start"), [
    (Installed(None, None), "error: torch is not installed; fix: pip install"),
    (Installed("2.14.1", "2.14.1+cu130"), "error: torchvision is not installed (timm and the tests "
                                          "import it); fix: pip install --no-deps torchvision==0.29.1"),
    (Installed("2.14.1", "2.14.1", torch_error="OSError: libcudart.so.13: cannot open"),
     "error: torch 2.14.1 does not import (OSError: libcudart.so.13: cannot open); fix: "),
])
def test_missing_or_broken_torch(found, start) -> None:
    line = check.problem(found)
    assert line is not None and line.startswith(start) and "\n" not in line


@pytest.mark.parametrize(("torch", "vision"), [
    ("2.1.2", "0.16.2"), ("2.13.0+cpu", "0.28.0"), ("2.14.1", "0.29.1"), ("1.13.1", None),
])
def test_release_pairing(torch, vision) -> None:
    assert check.paired_torchvision(torch) == vision

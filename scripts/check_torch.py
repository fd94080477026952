"""Does the installed torch work with the installed torchvision? One line when not, and the fix.

``scripts/setup.sh`` runs this after every install, because pip can pair a CPU torch with a
CUDA torchvision without a word: when PyTorch's CPU wheel index cannot be reached but other
indexes can, it falls back to them and takes torchvision's default (CUDA) build. That pair
installs "successfully", then ``import torchvision`` (which timm does, so every model build)
fails with ``operator torchvision::nms does not exist``. lostreg itself never imports
torchvision; timm and the tests do.

Checked, in order: both import; torchvision is the build for this torch version (its own
requirement ``torch==X``, else the 2.x <-> 0.(x+15) rule); both are the same build (``+cpu``,
``+cu130``, ...); ``torchvision.ops.nms`` runs on a tiny tensor. Exit status 0 and no output
when all hold, 1 and one line on stderr otherwise. Cheap: two imports and one tiny op.
Standalone (no lostreg import), so it runs in any environment: ``python scripts/check_torch.py``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

PYTORCH_INDEX = "https://download.pytorch.org/whl/"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Installed:
    """What is installed, read without trusting that it imports. ``*_dist``: the version pip
    installed (a ``+cpu``/``+cuXXX`` tag means PyTorch's own index, none means PyPI);
    ``*_build``: the version the package reports, whose tag says CPU or which CUDA (PyPI's
    torch 2.14.1 reports 2.14.1+cu130). None: not installed."""

    torch_dist: str | None
    torch_build: str | None
    torchvision_dist: str | None = None
    torchvision_build: str | None = None
    torchvision_wants: str | None = None  # the torch version torchvision's metadata requires
    torch_error: str | None = None  # why ``import torch`` failed
    torchvision_error: str | None = None  # why ``import torchvision`` or nms failed


def base(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``."""
    return version.split("+", 1)[0]


def tag(version: str | None) -> str:
    """``2.13.0+cpu`` -> ``cpu``; ``""`` when there is none."""
    return version.split("+", 1)[1] if version and "+" in version else ""


def describe_build(build_tag: str) -> str:
    if build_tag == "cpu":
        return "a CPU build"
    if re.fullmatch(r"cu\d{3,}", build_tag):
        return f"a CUDA {build_tag[2:-1]}.{build_tag[-1]} build"
    return f"a {build_tag} build" if build_tag else "PyPI's default build"


def paired_torchvision(torch_version: str) -> str | None:
    """The torchvision release built for ``torch_version``: torch 2.x.y pairs with
    torchvision 0.(x+15).y (2.1 <-> 0.16 ... 2.14 <-> 0.29). None outside torch 2."""
    match = re.fullmatch(r"2\.(\d+)\.(\d+)", base(torch_version))
    return None if match is None else f"0.{int(match[1]) + 15}.{match[2]}"


def built_for(found: Installed) -> str | None:
    """The torch release torchvision was built for: the ``torch==X`` its wheel requires or,
    without one (a source build), ``2.x`` from its 0.(x+15) release number."""
    if found.torchvision_wants:
        return base(found.torchvision_wants)
    match = re.match(r"0\.(\d+)\.", found.torchvision_dist or "")
    return f"2.{int(match[1]) - 15}" if match and int(match[1]) >= 16 else None


def same_release(wanted: str, torch_version: str) -> bool:
    """``2.13`` or ``2.13.0`` against ``2.13.0+cpu``: as many parts as ``wanted`` has."""
    parts = wanted.split(".")
    return base(torch_version).split(".")[:len(parts)] == parts


def fix_command(found: Installed, pip: str, fresh: str | None) -> str:
    """The command that reinstalls torchvision's build for the installed torch from the index
    torch came from (torch itself is kept: ``--no-deps``), and, when that index is PyTorch's
    (which may be unreachable: the reason this check exists), the way to PyPI's pair."""
    torch_version = found.torch_dist or ""
    wanted = paired_torchvision(torch_version)
    index_tag = tag(found.torch_dist)
    spec = "torchvision" if wanted is None else f"torchvision=={wanted}"
    if not index_tag:
        return f"{pip} install --force-reinstall --no-deps {spec}"
    if wanted is not None:
        spec += f"+{index_tag}"
    command = f"{pip} install --force-reinstall --no-deps {spec} --index-url {PYTORCH_INDEX}{index_tag}"
    pair = f"torch=={base(torch_version)} " + ("torchvision" if wanted is None else f"torchvision=={wanted}")
    alternative = fresh or f"{pip} install --force-reinstall {pair}"
    return f"{command} (where that index is unreachable: {alternative}, PyPI's CUDA build, about 6 GB)"


def problem(found: Installed, pip: str = "pip", fresh: str | None = None) -> str | None:
    """The one line saying what is wrong with ``found`` and how to fix it; None when torch and
    torchvision work together. ``pip``: how to call pip for this environment; ``fresh``: a
    command that rebuilds the environment from PyPI (the project's set-up), if there is one."""
    if found.torch_dist is None:
        return f"error: torch is not installed; fix: {pip} install 'torch<=2.14.1' torchvision"
    torch_version = found.torch_build or found.torch_dist
    if found.torch_error is not None:
        return (f"error: torch {torch_version} does not import ({found.torch_error}); fix: "
                f"{pip} install --force-reinstall --no-deps torch=={found.torch_dist}")
    fix = fix_command(found, pip, fresh)
    if found.torchvision_dist is None:
        return ("error: torchvision is not installed (timm and the tests import it); fix: "
                + fix.replace(" --force-reinstall --no-deps", " --no-deps"))
    vision = found.torchvision_build or found.torchvision_dist
    wanted = built_for(found)
    if wanted is not None and not same_release(wanted, torch_version):
        return (f"error: torchvision {vision} is built for torch {wanted}, not for the installed "
                f"torch {torch_version}; fix: {fix}")
    torch_tag, vision_tag = tag(found.torch_build), tag(found.torchvision_build)
    if torch_tag and vision_tag and torch_tag != vision_tag:
        return (f"error: torch {torch_version} is {describe_build(torch_tag)} but torchvision "
                f"{vision} is {describe_build(vision_tag)}; fix: {fix}")
    if found.torchvision_error is not None:
        return (f"error: torchvision {vision} does not work with torch {torch_version} "
                f"({found.torchvision_error}); fix: {fix}")
    return None


def static_version(package: str) -> str | None:
    """``<package>/version.py``'s ``__version__``, read without importing the package (whose
    import may be what fails): it carries the build tag that pip's metadata of a PyPI wheel
    lacks."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "version.py"
        if path.is_file():
            match = re.search(r"""^__version__\s*(?::[^=]*)?=\s*['"]([^'"]+)['"]""",
                              path.read_text(errors="replace"), re.M)
            if match:
                return match[1]
    return None


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def required_torch() -> str | None:
    """The torch version torchvision's metadata pins (``torch==2.13.0``), if it pins one."""
    for requirement in importlib.metadata.requires("torchvision") or []:
        match = re.match(r"torch\s*\(?\s*==\s*([0-9][^\s,;)]*)", requirement)
        if match:
            return match[1]
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def probe() -> Installed:
    """Read what is installed, then import torch and torchvision and run nms on two boxes."""
    torch_dist = dist_version("torch")
    if torch_dist is None:
        return Installed(None, None)
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any failure is what this check reports
        return Installed(torch_dist, static_version("torch"), torch_error=first_line(exc))
    found = dict(torch_dist=torch_dist, torch_build=str(torch.__version__))
    vision_dist = dist_version("torchvision")
    if vision_dist is None:
        return Installed(**found)
    found.update(torchvision_dist=vision_dist, torchvision_build=static_version("torchvision"),
                 torchvision_wants=required_torch())
    try:
        import torchvision

        boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.9]])
        keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
        if keep.tolist() != [0]:
            raise RuntimeError(f"torchvision.ops.nms kept {keep.tolist()} of two overlapping boxes")
        found["torchvision_build"] = str(torchvision.__version__)
    except Exception as exc:  # noqa: BLE001
        return Installed(**found, torchvision_error=first_line(exc))
    return Installed(**found)


def pip_and_fresh() -> tuple[str, str | None]:
    """How to call pip for this interpreter (relative to the current folder when inside it),
    and, when this is the project's ``.venv``, the set-up command that rebuilds it."""
    python = Path(sys.executable)
    try:
        shown = os.path.relpath(python) if not os.path.relpath(python).startswith("..") else str(python)
    except ValueError:
        shown = str(python)
    in_project = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()
    fresh = "rm -rf .venv && bash scripts/setup.sh" if in_project else None
    return f"{shown} -m pip", fresh


def main() -> int:
    line = problem(probe(), *pip_and_fresh())
    if line is None:
        return 0
    print(line, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

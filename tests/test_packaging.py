"""lostreg works installed from a wheel, outside the repository: everything a command reads at
run time ships inside the package, and every listed dependency is one lostreg imports.

The wheel is built from the tracked tree without network (setuptools is already installed)
and installed into a fresh virtual environment in a temporary folder; that environment sees the
test environment's third-party packages (torch, timm, ...) through one ``.pth`` line, but not
the editable install of the checkout, so ``import lostreg`` can only find the wheel's copy.
From another folder it then runs the demo, loads the published-figures table and downloads a
dataset from a local HTTP server (through ``$LOSTREG_DOWNLOAD_MANIFEST``, a mirror's manifest).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
# distribution name -> the module lostreg imports it as
IMPORT_NAMES = {"pillow": "PIL", "huggingface_hub": "huggingface_hub"}


def _dependencies() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = []
    for requirement in project["dependencies"]:
        name = requirement
        for stop in "<>=!~[; ":
            name = name.split(stop)[0]
        names.append(name.strip().lower().replace("-", "_"))
    return names


def _imported_modules() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "lostreg").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_every_listed_dependency_is_imported_by_lostreg() -> None:
    imported = _imported_modules()
    unused = [name for name in _dependencies() if IMPORT_NAMES.get(name, name) not in imported]
    assert unused == []


def _build_options() -> list[str]:
    """Offline with the installed setuptools when it is new enough for pyproject.toml (SPDX
    ``license``: setuptools >= 77); else pip's isolated build, which fetches it from the
    package index (a venv of Python 3.11 starts with setuptools 65)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        major = 0
    return ["--no-build-isolation", "--no-index"] if major >= 77 else []


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel of this checkout; returns its python."""
    if shutil.which("git") is None:
        pytest.skip("needs git to list the tracked tree")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file() and not name.startswith(("tests/", "results/", "notebooks/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                            *_build_options(), "-w", str(work / "whl")],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (work / "whl").glob("lostreg-*.whl")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env_site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    # the test environment's third-party packages, without its .pth files (the editable
    # install of this checkout is one of them)
    (env_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                                "--target", str(env_site), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python


def _run(python: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **env}
    environment.pop("PYTHONPATH", None)
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=environment)


def test_the_wheel_is_what_imports(installed: Path, tmp_path: Path) -> None:
    done = _run(installed, ["-c", "import lostreg; print(lostreg.__file__)"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(REPO) not in done.stdout and "site-packages" in done.stdout


def test_the_demo_runs_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    done = _run(installed, ["-m", "lostreg.run", "--dataset", "demo", "--data-root", "data",
                            "--model", "dinov2_vits14_reg4", "--weights", "random", "--limit", "2",
                            "--output", "runs", "--no-progress", "--device", "cpu"], tmp_path,
                OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("CorLoc ") and "(weights: random)" in done.stdout


def test_the_published_figures_ship_in_the_wheel(installed: Path, tmp_path: Path) -> None:
    code = ("from lostreg.reports.leaderboard import DEFAULT_PUBLISHED, load_published; "
            "print(len(load_published()), DEFAULT_PUBLISHED)")
    done = _run(installed, ["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    count, path = done.stdout.split()
    assert int(count) > 0 and "site-packages" in path


def test_a_dataset_downloads_through_the_wheel(installed: Path, tmp_path: Path) -> None:
    import threading

    from test_datasets_download import _Handler, _Server  # the download tests' local server

    members = {
        "VOCdevkit/VOC2007/Annotations/000001.xml": (
            b"<annotation><filename>000001.jpg</filename><size><width>10</width>"
            b"<height>10</height><depth>3</depth></size><object><name>dog</name>"
            b"<difficult>0</difficult><truncated>0</truncated><bndbox><xmin>2</xmin>"
            b"<ymin>3</ymin><xmax>8</xmax><ymax>9</ymax></bndbox></object></annotation>"),
        "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt": b"000001\n",
        "VOCdevkit/VOC2007/JPEGImages/000001.jpg": b"not really a jpeg",
    }
    archive = tmp_path / "voc.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            (tmp_path / "member").write_bytes(data)
            tar.add(tmp_path / "member", arcname=name)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.honour_range, httpd.ranges = {"/voc.tar": archive.read_bytes()}, True, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        data = archive.read_bytes()
        manifest = tmp_path / "mirror.json"
        manifest.write_text(json.dumps({"voc07": {"files": [{
            "role": "archive", "url": f"http://127.0.0.1:{httpd.server_address[1]}/voc.tar",
            "file": "voc.tar", "sha256": hashlib.sha256(data).hexdigest(),
            "md5": hashlib.md5(data).hexdigest()}]}}))
        done = _run(installed, ["-m", "lostreg.datasets", "download", "voc07", "--data-root",
                                "data"], tmp_path, LOSTREG_DOWNLOAD_MANIFEST=str(manifest))
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "data" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").is_file()
    assert httpd.ranges == [None]  # fetched from the local server, once

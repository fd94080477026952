"""``RunConfig`` is plain data: its module imports no subsystem, and its defaults are the
subsystems' own (the checks that need the registries live in ``lostreg.runs.checks``)."""

from __future__ import annotations

import ast
from pathlib import Path

from lostreg.features.pipeline import AUTOCAST_DTYPES
from lostreg.features.pipeline import DEFAULT_MAX_PIXELS as PIPELINE_MAX_PIXELS
from lostreg.methods import DEFAULT_METHOD
from lostreg.runs import config as config_module
from lostreg.runs.checks import with_defaults
from lostreg.runs.config import DEFAULT_MAX_PIXELS, PRECISIONS, RunConfig


def test_config_imports_nothing_of_lostreg() -> None:
    tree = ast.parse(Path(config_module.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names]
    assert not [name for name in imported if name and name.startswith("lostreg")]


def test_defaults_are_the_subsystems_own() -> None:
    config = RunConfig()
    assert config.method == DEFAULT_METHOD
    assert config.max_pixels == DEFAULT_MAX_PIXELS == PIPELINE_MAX_PIXELS
    assert tuple(AUTOCAST_DTYPES) == PRECISIONS


def test_the_data_root_is_resolved_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LOSTREG_DATA", str(tmp_path))
    assert RunConfig().data_root is None
    assert with_defaults(RunConfig()).data_root == tmp_path
    assert with_defaults(RunConfig(data_root=Path("x"))).data_root == Path("x")
    monkeypatch.delenv("LOSTREG_DATA")
    assert with_defaults(RunConfig()).data_root == Path("datasets")

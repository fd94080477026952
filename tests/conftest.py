"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``scripts/test.sh``), each worker gets its share of the cores for
    torch's threads: two workers each spinning two OpenMP threads on two cores wait for each
    other and run slower than one worker alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def one_thread():
    """Run in-process pipelines with one thread, like subprocesses started with
    OMP_NUM_THREADS=1: on a busy 2-core machine, OpenMP threads waiting for each other make
    runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_builds(monkeypatch) -> list[str]:
    """The names of the backbones built while the test runs (a pass that needs no forward,
    e.g. one served by the feature cache, builds none)."""
    import lostreg.features.pipeline as pipeline_module

    built: list[str] = []
    real = pipeline_module.create_backbone

    def counting(spec, *args, **kwargs):
        built.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "create_backbone", counting)
    return built


@pytest.fixture
def tiny_model():
    """``tiny_runs.TINY`` registered under its name for one test (the run-side hardening
    tests; a test module with a tiny model of its own defines its own ``tiny_model``)."""
    from tiny_runs import TINY

    from lostreg.backbones import BACKBONES

    BACKBONES[TINY.name] = TINY
    yield TINY
    BACKBONES.pop(TINY.name, None)

"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run in-process pipelines with one thread, like subprocesses started with
    OMP_NUM_THREADS=1: on a busy 2-core machine, OpenMP threads waiting for each other make
    runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

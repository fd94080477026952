"""CPU-bound work spread over worker processes, when there is enough of it to pay for them.

The reports do two things per run that take tens to hundreds of milliseconds of pure Python
each and share nothing: checking a run's predictions into its summary, and drawing its IoU
figure. With hundreds of runs, one process per core does them side by side. Workers are
forked (they inherit the imported modules, so they start in milliseconds and need nothing
pickled but each item and its result); where ``fork`` does not exist, or for a handful of
items, everything runs in this process. Results come back in the items' order, so a report
is the same bytes however many workers made it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

MAX_WORKERS = 8


def worker_count(items: int, parallel_from: int) -> int:
    """Processes to use for ``items`` items: 1 below ``parallel_from`` items or without
    ``fork``, else one per core the process may use (at most ``MAX_WORKERS``)."""
    if items < parallel_from or not hasattr(os, "fork"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, cores or 1, items))


def ordered_map(function: Callable[[Any], Any], items: Sequence[Any],
                parallel_from: int = 8) -> list[Any]:
    """``[function(item) for item in items]``, in worker processes when worthwhile.
    ``function`` must be a module-level function (workers find it by name)."""
    workers = worker_count(len(items), parallel_from)
    if workers < 2:
        return [function(item) for item in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunk = max(1, len(items) // (4 * workers))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(function, items, chunksize=chunk))

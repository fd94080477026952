"""Several processes on one run (``torchrun``): who computes which image, and how parts merge.

A run started by ``torchrun --nproc_per_node=N -m lostreg.run ...`` has one process per
device. Every process reads the same run state (what is already written), then takes every
N-th still-missing image in dataset order, so the split is deterministic and balanced even on
a resumed run. Each rank appends its predictions durably to its own
``predictions.rank{r}.jsonl``; rank 0 waits for all of them, merges every part into
``predictions.jsonl`` in dataset order and deletes the parts. The merged file is the one a
single process writes: a prediction does not depend on which process or batch computed it.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here starts a process
group and every helper is a no-op, so a single process runs exactly as before.
Multi-node runs need the output folder (and the feature cache) on a shared filesystem.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lostreg.background import background_running, wait_for_background
from lostreg.datasets.base import ImageRecord
from lostreg.errors import LostregError, close_progress_bars, error_line
from lostreg.runs.predictions import (
    PART_PATTERN,  # noqa: F401 - re-exported
    PREDICTIONS,
    LineFormat,
    LoadedPredictions,
    load_predictions,
    prediction_files,
    write_merged,
)
from lostreg.signals import Terminated, exit_status, running_handlers

T = TypeVar("T")
# ranks wait for each other at the end of a run; a resumed run can be uneven, so be patient
TIMEOUT_ENV = "LOSTREG_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 720.0


class CollectiveError(LostregError):
    """Raised on every rank for one failure: only rank 0 prints it, the others exit quietly."""


@dataclass
class DistContext:
    """This process's place among the ranks; ``world_size == 1`` means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    group: Any = None  # a gloo group for barriers and object collectives (no device needed)
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]  # type: ignore[return-value]

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 first (downloads, dataset generation), then on the other ranks.

        If it fails on rank 0 with a ``LostregError`` every rank raises, so no rank waits
        forever for one that has already stopped.
        """
        if not self.enabled:
            return fn()
        failure: str | None = None
        if self.is_main:
            try:
                result = fn()
            except LostregError as exc:
                failure = str(exc)
                self.broadcast(failure)
                raise
            self.broadcast(None)
            return result
        failure = self.broadcast(None)
        if failure is not None:
            raise CollectiveError(failure)
        return fn()

    def raise_if_any(self, errors: Sequence[str], message: Callable[[list[str]], str]) -> None:
        """Gather every rank's error strings; if there is any, every rank raises the same."""
        everything = [e for part in self.gather(list(errors)) for e in part]
        if everything:
            raise CollectiveError(message(everything))


SINGLE = DistContext()
_CONTEXT: DistContext | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise LostregError(f"environment variable {name}={value!r}: expected an integer") from None


def env_world_size() -> int:
    """The world size torchrun announced (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device_type: str) -> DistContext:
    """The process's context, starting the process group once if torchrun asked for one.

    The default group uses NCCL on CUDA and gloo on the CPU; barriers and object exchange go
    through a gloo group either way. A group someone else started is used as it is.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if dist.is_available() and dist.is_initialized():
        _CONTEXT = _context_from_group(owns=False)
        return _CONTEXT
    if env_world_size() <= 1:
        _CONTEXT = SINGLE
        return _CONTEXT
    if not dist.is_available():
        raise LostregError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank_gpu(local_rank))
    dist.init_process_group(backend=backend, timeout=_timeout())
    _CONTEXT = _context_from_group(owns=True)
    return _CONTEXT


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(raw)
    except ValueError:
        raise LostregError(f"environment variable {TIMEOUT_ENV}={raw!r}: expected minutes"
                           ) from None
    return timedelta(minutes=minutes)


def _context_from_group(owns: bool) -> DistContext:
    backend = dist.get_backend()
    group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=_timeout())
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=_env_int("LOCAL_RANK", 0), backend=backend, group=group,
                       owns_group=owns)


def current() -> DistContext:
    """The context set up so far (a single process before ``setup``)."""
    return _CONTEXT if _CONTEXT is not None else SINGLE


SHUTDOWN_WAIT = timedelta(seconds=60)


def shutdown() -> None:
    """Tear down a process group this module started (no-op otherwise).

    Ranks first wait for each other (at most ``SHUTDOWN_WAIT``, so a rank that died does not
    hold the others), so no rank tears its group down while another is still in the last
    collective. A torchrun worker then ends through ``leave``.
    """
    global _CONTEXT
    if _CONTEXT is not None and _CONTEXT.owns_group and dist.is_initialized():
        try:
            dist.monitored_barrier(group=_CONTEXT.group, timeout=SHUTDOWN_WAIT)
        except RuntimeError:  # a rank is gone: tear down anyway
            pass
        dist.destroy_process_group()
    _CONTEXT = None


def command_status(body: Callable[[], None],
                   hint: Callable[[BaseException], str] = lambda exc: "") -> int:
    """Run a command that may be one of torchrun's ranks; its exit status: 0, 2 for bad input
    (one line on stderr, ``error_line`` plus ``hint``; printed by the main rank, or by the rank
    whose own error it is, so N ranks do not print one failure N times), 130 when interrupted
    (Ctrl-C), 143 or 129 when terminated (SIGTERM, SIGHUP: ``lostreg.signals``), each with one
    line. Either way the process group is shut down and the background threads are
    waited for (``wait_for_background``), so no exit races them."""
    try:
        with running_handlers():
            body()
    except (LostregError, OSError) as exc:
        close_progress_bars()
        if current().is_main or not isinstance(exc, CollectiveError):
            print(error_line(exc) + hint(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()  # the message on its own line, not after the bar
        print("interrupted: what was written is kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Terminated as exc:  # SIGTERM or SIGHUP: the same clean-up as Ctrl-C
        close_progress_bars()
        print(f"terminated by {exc.name}: what was written is kept; rerun the same command to "
              "resume", file=sys.stderr)
        return exit_status(exc.signum)
    finally:
        shutdown()
        wait_for_background()
    return 0


def rank_gpu(local_rank: int) -> int:
    """The GPU index of the process with ``local_rank``: ``cuda:LOCAL_RANK`` when it sees every
    GPU of its node (torchrun), ``cuda:0`` when the launcher shows each process only its own
    (``CUDA_VISIBLE_DEVICES`` per task, as SLURM binding does)."""
    visible = torch.cuda.device_count()
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise LostregError(f"LOCAL_RANK={local_rank} but this process sees {visible} CUDA "
                       "device(s): start at most one process per GPU")


def leave(code: int) -> int:
    """End a torchrun worker with ``code`` right after ``shutdown``, without interpreter teardown.

    A core dump of a rank that died with SIGABRT ("terminate called without an active
    exception") after a complete run showed the main thread in ``Py_FinalizeEx`` while a
    gloo worker thread, still alive because ``destroy_process_group`` had not freed the group,
    was destroying the last broadcast's work and needed the GIL, which a finalizing
    interpreter refuses by ending the thread (pytorch/pytorch#179291 describes the same
    mechanism). Every file is closed and durable by then, so nothing is lost by skipping the
    teardown. A single process (no torchrun) returns ``code`` as usual, unless a background
    thread outlived ``wait_for_background``'s bounded wait: teardown would kill that thread
    the same way, so it is skipped too.
    """
    if env_world_size() <= 1 and not background_running():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    """Each rank's own GPU (see ``rank_gpu``) when the run is on CUDA and distributed."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", rank_gpu(ctx.local_rank))
    return device


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share: every ``world_size``-th item starting at ``rank``."""
    return list(items[ctx.rank::ctx.world_size])


# --- prediction parts ----------------------------------------------------------------------


def part_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"predictions.rank{rank}.jsonl"


def part_files(run_dir: Path) -> list[Path]:
    return prediction_files(run_dir)[1:]


def predictions_target(run_dir: Path, ctx: DistContext) -> Path:
    """Where this process appends: the run's file, or its own part under torchrun."""
    return part_path(run_dir, ctx.rank) if ctx.enabled else Path(run_dir) / PREDICTIONS


RunImages = Sequence[ImageRecord] | Sequence[str] | None


def _load(run_dir: Path, images: RunImages, root: Path | None,
          fmt: LineFormat | None = None) -> LoadedPredictions:
    """The validated predictions (``lostreg.runs.predictions``) of a run. ``images``: the run's
    records (full checks, hit/best_iou recomputed) or, from callers that only have them, its
    image ids. Only rank 0 repairs (quarantines bad lines); every rank sees the same lines."""
    images = list(images) if images is not None else None
    if images and isinstance(images[0], str):
        return load_predictions(run_dir, None, image_ids=images, repair=current().is_main,
                                fmt=fmt)
    return load_predictions(run_dir, images, root=root, repair=current().is_main, fmt=fmt)


def _all_lines(run_dir: Path, images: RunImages = None, root: Path | None = None
               ) -> dict[str, dict]:
    """Every durable, valid prediction of a run: the merged file plus parts left by any earlier
    attempt (with any world size); a torn last line is not durable and is left out, a bad line
    is quarantined (its image is recomputed), a line of another run is an error."""
    return _load(run_dir, images, root).lines


def done_ids(run_dir: Path, images: RunImages = None, root: Path | None = None) -> set[str]:
    """Image ids whose predictions are already durable (and valid) in the run folder."""
    return set(_all_lines(run_dir, images, root))


def merge_predictions(run_dir: Path, images: Sequence[ImageRecord] | Sequence[str],
                      root: Path | None = None, fmt: LineFormat | None = None) -> list[dict]:
    """Write ``predictions.jsonl`` in ``images`` order (records, or image ids) from the
    validated file and all parts, then delete the parts; a kill at any point leaves files a
    rerun merges the same way."""
    images = list(images)
    ids = [i if isinstance(i, str) else i.image_id for i in images]
    return write_merged(Path(run_dir), ids, _load(Path(run_dir), images, root, fmt).lines)

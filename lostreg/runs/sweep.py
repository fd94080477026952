"""One pass: one backbone over one dataset, serving every run that shares it.

The runs of a pass differ only in what they do with the backbone's output (method and its
parameters, feature kind, layer, normalisation), so each image is decoded and goes through the
backbone once (or comes from the feature cache) and every run's method then runs on the same
batch. Each run keeps its own folder and resumes on its own (``lostreg.runs.folder``); under
torchrun each rank takes every N-th image still missing from any run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lostreg import timeline
from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.datasets.registry import image_protocol
from lostreg.errors import LostregError
from lostreg.features.cache import BackgroundWriter, FeatureCache, is_lossless, storage_dtype
from lostreg.features.extract import FeatureRequest
from lostreg.features.pipeline import (
    AUTOCAST_DTYPES,
    FeatureBatch,
    FeatureSource,
    LazyBackbone,
    check_image_sizes,
    describe_images,
    feature_cache_key,
    out_of_memory_as_error,
)
from lostreg.runs import distributed
from lostreg.runs.config import RunConfig
from lostreg.runs.distributed import CollectiveError, DistContext
from lostreg.runs.folder import (
    RunFolder,
    RunResult,
    RunScore,
    check_unique,
    clear_unused,
    config_payload,
    describe_run,
    finish_run,
    open_runs,
    remove_empty,
    run_status,
    summary_line,
)
from lostreg.runs.lock import hold_runs
from lostreg.runs.mask_lines import ImageRefinement, mask_prediction, mask_threads
from lostreg.runs.nonfinite import NonFiniteFeatures
from lostreg.runs.predictions import NONFINITE
from lostreg.version import RESULT_VERSION


def run_pass(configs: list[RunConfig], lazy: LazyBackbone, index: DatasetIndex,
             device: torch.device, numerics: dict, ctx: DistContext) -> list[RunResult]:
    """One pass over one dataset for one backbone: every run of ``configs`` is resumed."""
    return Pass(configs, lazy, index, device, numerics, ctx).run()


@dataclasses.dataclass
class MaskJob:
    """One saliency run's share of a batch: the images it still needs (``positions`` and
    their original ``sizes``) and the method's output for them, on the host (``masks``: patch
    masks ``(B, rows, cols)``, ``seeds``, ``finite``; ``cols``: the grid's width)."""

    run: RunFolder
    positions: list[int]
    sizes: list[tuple[int, int]]
    masks: torch.Tensor
    seeds: torch.Tensor
    cols: int
    finite: torch.Tensor


class Pass:
    """The state of one pass: its runs, which images each still needs, and the timings."""

    def __init__(self, configs: list[RunConfig], lazy: LazyBackbone, index: DatasetIndex,
                 device: torch.device, numerics: dict, ctx: DistContext) -> None:
        base = configs[0]
        self.base, self.lazy, self.index, self.device, self.ctx = base, lazy, index, device, ctx
        self.info = lazy.info
        self.smoke = self.info.weights.is_random
        self.image_protocol = image_protocol(index.name)  # "resize": a saliency set
        self.records: list[ImageRecord] = list(
            index.records[: base.limit] if base.limit else index.records)
        self.storage = (storage_dtype(base.cache_dtype, base.precision)
                        if base.cache_features else None)
        self.lossless = self.storage is None or is_lossless(self.storage, base.precision)
        rounded = {} if self.lossless else {"feature_cache": self.storage}  # never mixed
        self.runs: list[RunFolder] = [describe_run(c, self.info, index, rounded) for c in configs]
        self.numerics = numerics
        self.todo: dict[int, set[int]] = {}
        self.stats: dict[str, Any] = {"load": 0.0, "transfer": 0.0, "forward": 0.0,
                                      "method": 0.0, "write": 0.0,
                                      "backbone_images": 0, "cached_images": 0}
        self.lines: LineWriter
        self._pool: ThreadPoolExecutor | None = None

    # --- set-up ---------------------------------------------------------------------------

    def _open(self) -> None:
        extra = {"world_size": self.ctx.world_size,
                 "feature_cache": None if self.storage is None else {
                     "dir": str(self.base.cache_features), "dtype": self.storage,
                     "lossless": self.lossless}}
        failure = None
        try:
            open_runs(self.runs, self.records, self.index.root, self.info.patch_size,
                      self.ctx.is_main, lambda run: config_payload(
                          run, self.info, self.index, self.device, self.numerics, extra))
        except LostregError as exc:  # rank 0's refusal (another run's folder, a version mix)
            if not self.ctx.enabled:
                raise
            failure = str(exc)
        # every rank has read the same state before any rank appends (a gather waits for all),
        # and runs the same result version of the code
        everyone = self.ctx.gather((RESULT_VERSION, failure))
        refused = [line for _, line in everyone if line]
        if refused:
            raise CollectiveError(refused[0])
        if len({version for version, _ in everyone}) > 1:
            raise CollectiveError(f"the ranks run code of different result versions "
                                  f"({sorted({v for v, _ in everyone})}); run one checkout")

    def _plan(self) -> tuple[list[int], int]:
        """This rank's positions (each with the runs that still need it) and how many
        positions no run needs."""
        union = sorted(set().union(*(run.pending for run in self.runs)))
        mine = distributed.shard(union, self.ctx)
        self.todo = {p: {i for i, run in enumerate(self.runs) if p in run.pending} for p in mine}
        return mine, len(self.records) - len(union)

    def needs(self, position: int) -> set[FeatureRequest]:
        return {self.runs[i].request for i in self.todo[position]}

    def _caches(self, mine: Sequence[int], stack: contextlib.ExitStack
                ) -> dict[FeatureRequest, FeatureCache]:
        caches: dict[FeatureRequest, FeatureCache] = {}
        if self.storage is None or not mine:
            return caches
        for request in sorted(set().union(*(self.needs(p) for p in mine))):
            key = feature_cache_key(self.info, self.index, request, self.base.precision,
                                    self.storage)
            caches[request] = FeatureCache(self.base.cache_features, key,
                                           writer_tag=f"r{self.ctx.rank}")
            stack.callback(caches[request].close)
        return caches

    # --- the work -------------------------------------------------------------------------

    def run(self) -> list[RunResult]:
        """Resume every run, holding each run folder's lock (one writer per folder) from
        reading what it holds until its metrics are written."""
        check_unique(self.runs)
        created = [run.run_dir for run in self.runs if not run.run_dir.exists()]
        emptied: list = []
        try:
            with hold_runs([run.run_dir for run in self.runs], self.base.wait, self.ctx):
                try:
                    self._open()
                    errors, started = self._work()
                    return self._finish(errors, started)
                except LostregError:  # e.g. unreadable weights: no folder holding only a config
                    if not self.ctx.enabled:  # cleared under the locks: nobody else is inside
                        emptied = clear_unused(created)
                    raise
        finally:
            remove_empty(emptied)  # once released; a refused command touches no folder

    def _work(self) -> tuple[list[str], float]:
        mine, already = self._plan()
        check_image_sizes([self.records[p] for p in mine], self.base.max_pixels)
        errors: list[str] = []
        started = time.perf_counter()
        progress = _progress(
            total=len(self.records) if not self.ctx.enabled else len(mine),
            initial=already if not self.ctx.enabled else 0,
            enabled=self.base.progress and self.ctx.is_main and bool(mine),
            desc=f"{self.index.name} {self.info.spec.name}"
                 + (f" [rank 0/{self.ctx.world_size}]" if self.ctx.enabled else ""))
        with contextlib.ExitStack() as stack:
            for run in self.runs:
                stack.callback(run.close)
            stack.callback(self._close_pool)
            self.lines = stack.enter_context(LineWriter(  # drained before the runs close
                on_idle=lambda: [run.sync() for run in self.runs]))
            caches = self._caches(mine, stack)
            writer = stack.enter_context(BackgroundWriter()) if caches else None
            source = FeatureSource(
                self.records, self.lazy, self.device, batch_size=self.base.batch_size,
                num_workers=self.base.num_workers, autocast=AUTOCAST_DTYPES[self.base.precision],
                caches=caches, storage=self.storage, lossless=self.lossless, writer=writer,
                stats=self.stats, max_pixels=self.base.max_pixels,
                image_protocol=self.image_protocol)
            for step in source.cached(source.fully_cached(mine, self.needs), self.needs):
                for batch in step.batches:
                    finished = self.serve(batch)
                    self.stats["cached_images"] += finished
                    progress.update(finished)
            compute = [p for p in mine if self.todo[p]]
            for step in source.computed(compute, self.needs) if compute else ():
                errors += step.errors
                for batch in step.batches:
                    self.serve(batch)
                progress.update(step.n_items)
        progress.close()
        return errors, started

    def serve(self, batch: FeatureBatch) -> int:
        """Run the method of every run that reads ``batch``'s map and still needs some of its
        images; their lines are queued for the line writer (nothing here waits for the
        device). Runs that share a method, a normalisation and images are served by one call
        (``MethodSpec.run_all``: LOST computes one Gram matrix for a whole bias/k sweep).
        Returns how many of the batch's images no run needs any more."""
        tick = time.perf_counter()
        normalized: dict[str, torch.Tensor] = {"none": batch.feats}
        groups: dict[tuple, list[int]] = {}
        for i, run in enumerate(self.runs):
            if run.request == batch.request:
                chosen = tuple(j for j, p in enumerate(batch.positions) if i in self.todo[p])
                if chosen:
                    groups.setdefault((run.method.name, run.config.normalize, chosen), []).append(i)
        jobs: list[Callable[[], None]] = []
        mask_jobs: list[MaskJob] = []
        for (_, normalize, chosen), members in groups.items():
            if normalize not in normalized:  # once per batch, whatever the number of runs
                normalized[normalize] = F.normalize(batch.feats, dim=-1)
            feats = normalized[normalize]
            if len(chosen) != len(batch.positions):
                feats = feats[list(chosen)]
            box_jobs, group_mask_jobs = self._serve_group(
                batch, feats, list(chosen), [self.runs[i] for i in members], members)
            jobs += box_jobs
            mask_jobs += group_mask_jobs
        if mask_jobs:  # every mask run of the batch in one job: each image's runs together
            jobs.append(functools.partial(self._write_masks, mask_jobs))
        ready = ready_event(batch.feats.device)  # after the copies: the writer waits for them
        for job in jobs:
            self.lines.submit(job, ready)
        self.stats["method"] += time.perf_counter() - tick
        timeline.mark("first batch through the methods")
        return sum(1 for p in batch.positions if not self.todo[p])

    def _serve_group(self, batch: FeatureBatch, feats: torch.Tensor, chosen: list[int],
                     runs: list[RunFolder], members: list[int]
                     ) -> tuple[list[Callable[[], None]], list[MaskJob]]:
        """One method call for runs that differ only in the method's parameters (runs that
        differ only in their saliency refinement share one output); returns their writes:
        the box runs' jobs and the saliency runs' ``MaskJob``s."""
        sizes = [batch.sizes[j] for j in chosen]
        method = runs[0].method
        where = describe_images(self.records, batch.positions, batch.sizes)
        settings = list({repr(sorted(r.params.items())): r.params for r in runs}.values())
        with out_of_memory_as_error(lambda: f"{where} in {method.name}"):
            outputs = method.run_all(feats, batch.grid, self.info.patch_size,
                                     to_device(self._method_sizes(sizes, batch.grid),
                                               feats.device), settings)
        by_setting = {repr(sorted(p.items())): out for p, out in zip(settings, outputs, strict=True)}
        positions = [batch.positions[j] for j in chosen]
        finite = to_host(batch.finite if len(chosen) == len(batch.positions)  # type: ignore[arg-type]
                         else batch.finite[chosen])  # type: ignore[index]
        jobs: list[Callable[[], None]] = []
        mask_jobs: list[MaskJob] = []
        for i, run in zip(members, runs, strict=True):
            out = by_setting[repr(sorted(run.params.items()))]
            for p in positions:
                self.todo[p].discard(i)
            if run.fmt.target.kind == "mask":
                mask_jobs.append(MaskJob(run, positions, sizes,
                                         to_host(method.mask_for_saliency(out)),
                                         to_host(out.seed), batch.grid[1], finite))
            else:
                jobs.append(functools.partial(self._write, run, positions, sizes,
                                              to_host(out.box), to_host(out.seed),
                                              batch.grid[1], finite))
        return jobs, mask_jobs

    def _method_sizes(self, sizes: list[tuple[int, int]], grid: tuple[int, int]
                      ) -> list[tuple[int, int]]:
        """The image sizes a method clips its boxes to: each image's own, or, for resized
        inputs (which fill the grid exactly), the grid's."""
        if self.image_protocol != "resize":
            return sizes
        patch = self.info.patch_size
        return [(grid[0] * patch, grid[1] * patch)] * len(sizes)

    def _write_masks(self, jobs: list[MaskJob]) -> None:
        """The saliency runs' lines of one batch (``lostreg.runs.mask_lines``: upsampled,
        refined, counted against the GT), on the line writer's thread, image by image: the
        runs of one image share its decoded image and prepared solver (``ImageRefinement``,
        dropped once the image's lines are made). An image whose features were not finite
        gets no prediction: its line is scored as an empty mask, with no box (``nonfinite``)."""
        tick = time.perf_counter()
        per_image: dict[int, list[tuple[int, int]]] = {}  # position -> (job, index in job)
        for j, job in enumerate(jobs):
            for k, p in enumerate(job.positions):
                per_image.setdefault(p, []).append((j, k))
        masks = [job.masks.numpy() for job in jobs]
        seeds = [job.seeds.tolist() for job in jobs]
        finite = [job.finite.tolist() for job in jobs]

        def one(p: int) -> list[tuple[int, int, dict]]:
            shared = ImageRefinement(self.records[p], self.base.max_pixels)
            made = []
            for j, k in per_image[p]:
                run, size, mask, seed = jobs[j].run, jobs[j].sizes[k], masks[j][k], seeds[j][k]
                if not finite[j][k]:
                    _, fields = mask_prediction(self.records[p], np.zeros_like(mask), size,
                                                "none", self.base.max_pixels)
                    line = self._line(run, p, size, None, None, {**fields, **NONFINITE})
                else:
                    box, fields = mask_prediction(self.records[p], mask, size, run.config.refine,
                                                  self.base.max_pixels, shared)
                    line = self._line(run, p, size, box,
                                      divmod(seed, jobs[j].cols) if seed >= 0 else None, fields)
                made.append((j, k, line))
            return made

        pool = self._mask_pool()
        made = pool.map(one, per_image) if pool is not None else map(one, per_image)
        lines: list[list[Any]] = [[None] * len(job.positions) for job in jobs]
        for image_lines in made:
            for j, k, line in image_lines:
                lines[j][k] = line
        for job, run_lines in zip(jobs, lines, strict=True):
            job.run.append(run_lines, self.ctx)
        self.stats["write"] += time.perf_counter() - tick

    def _write(self, run: RunFolder, positions: list[int], sizes: list[tuple[int, int]],
               boxes: torch.Tensor, seeds: torch.Tensor, cols: int, finite: torch.Tensor) -> None:
        """Format and append one method output's lines (on the line writer's thread); an
        image whose features were not finite gets no box (a ``nonfinite`` line: a miss)."""
        tick = time.perf_counter()
        lines = [self._line(run, p, size, box, divmod(seed, cols) if seed >= 0 else None)
                 if ok else self._line(run, p, size, None, None, NONFINITE)
                 for p, size, box, seed, ok in zip(positions, sizes, boxes.tolist(),
                                                   seeds.tolist(), finite.tolist(), strict=True)]
        run.append(lines, self.ctx)
        self.stats["write"] += time.perf_counter() - tick

    def _mask_pool(self) -> ThreadPoolExecutor | None:
        """Threads for a saliency run's per-image work (``mask_lines.mask_threads``), started
        on first use and shut down with the pass; None for one thread."""
        if self._pool is None and mask_threads(self.device.type) > 1:
            self._pool = ThreadPoolExecutor(mask_threads(self.device.type),
                                            thread_name_prefix="lostreg-masks")
        return self._pool

    def _line(self, run: RunFolder, position: int, size: tuple[int, int], box: list[int] | None,
              seed_rc: tuple[int, int] | None, prediction: dict | None = None) -> dict:
        record = self.records[position]
        if tuple(size) != (record.height, record.width):
            record = dataclasses.replace(record, height=size[0], width=size[1])
        return run.fmt.line(record, box, seed_rc, self.index.root, self.smoke, prediction)

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- the end --------------------------------------------------------------------------

    def _finish(self, errors: list[str], started: float) -> list[RunResult]:
        self.ctx.raise_if_any(errors, self._bad_images)
        everyone = self.ctx.gather(self.stats)  # also: every rank's appends are durable
        total = time.perf_counter() - started
        outcomes: Any = None
        if self.ctx.is_main:
            try:
                outcomes = self._finish_runs(total, everyone)
            except LostregError as exc:
                self.ctx.broadcast(str(exc))
                raise
        outcomes = self.ctx.broadcast(outcomes)
        if isinstance(outcomes, str):
            raise CollectiveError(outcomes)
        if self.ctx.is_main:  # the same data, so the same warnings: once per pass
            for line in dict.fromkeys(w for outcome in outcomes for w in outcome.warnings):
                print(line, file=sys.stderr, flush=True)
        return [self._result(run, outcome)
                for run, outcome in zip(self.runs, outcomes, strict=True)]

    def _finish_runs(self, total: float, everyone: list[dict]) -> list[RunScore]:
        """Every run's figures (metrics.json written); runs with too many images whose
        features were not finite are refused together, once the others are written."""
        outcomes, refused = [], []
        for run in self.runs:
            try:
                outcomes.append(finish_run(run, self.records, self.index, self.info, total,
                                           everyone, self.ctx, len(self.runs)))
            except NonFiniteFeatures as exc:
                refused.append(str(exc))
        if refused:
            more = f" (and {len(refused) - 1} more runs)" if len(refused) > 1 else ""
            raise NonFiniteFeatures(refused[0] + more)
        return outcomes

    def _result(self, run: RunFolder, outcome: RunScore) -> RunResult:
        status = run_status(run, len(self.records))
        return RunResult(run.run_id, run.run_dir, outcome.results, self.smoke,
                         summary_line(outcome.results, self.index, self.info.spec.name, run,
                                      self.smoke, status, outcome.nonfinite), status)

    def _bad_images(self, messages: list[str]) -> str:
        where = (self.runs[0].run_dir if len(self.runs) == 1
                 else f"the run folders under {self.base.output}")
        more = f" (and {len(messages) - 1} more bad images)" if len(messages) > 1 else ""
        return (f"{messages[0]}{more}; the other predictions are saved in {where}, "
                "fix the files and rerun the same command to finish")


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="img",
                dynamic_ncols=True, file=sys.stderr)


# --- results off the device ----------------------------------------------------------------


def to_device(sizes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Image sizes ``(B, 2)`` on the device without waiting for its queued work: a copy from
    pageable memory would (it is staged synchronously), one from pinned memory does not."""
    host = torch.tensor(sizes, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a small result tensor that does not make the host wait: on a GPU the
    copy goes into pinned memory asynchronously (``ready_event`` says when it has landed)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def ready_event(device: torch.device) -> Any:
    """An event recorded after the work queued so far on ``device`` (None on the CPU, where
    results are ready when the call returns)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class LineWriter:
    """Formats prediction lines and appends them on one background thread, so the pass queues
    the next batch instead of waiting for each batch's results to reach the host.

    Jobs run in submission order, each after its batch's event (so a line is written only
    when its batch is complete, and each run's file gets its lines in the same order as a
    synchronous loop would). At most ``max_pending`` jobs wait (bounded memory); a job that
    fails (a full disk) stops the writer, and its error is raised in the pass at the next
    ``submit`` or at ``close``.

    ``on_idle`` (making the files durable: one fsync per file, not one per run and batch, which
    a 144-run sweep would pay 144 times a batch) runs whenever the queue is empty, at least
    every ``sync_seconds`` while it is not, and at ``close``. Written lines survive a killed
    process without it; only a machine crash can take the last second.
    """

    def __init__(self, max_pending: int = 64, on_idle: Callable[[], Any] | None = None,
                 sync_seconds: float = 1.0) -> None:
        self._on_idle, self._sync_seconds = on_idle, sync_seconds
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None  # raised once in the pass
        self._failed = False  # stays set: nothing more is written
        self._thread = threading.Thread(target=self._loop, name="lostreg-lines", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        synced = time.monotonic()
        while True:
            item = self._jobs.get()
            if item is None:
                self._idle()
                return
            job, ready = item
            if self._failed:
                continue  # after a failure, drop the rest: those images are recomputed later
            try:
                if ready is not None:
                    ready.synchronize()
                job()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the pass
                self._error, self._failed = exc, True
                continue
            if self._jobs.empty() or time.monotonic() - synced >= self._sync_seconds:
                self._idle()
                synced = time.monotonic()

    def _idle(self) -> None:
        if self._on_idle is None or self._failed:
            return
        try:
            self._on_idle()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the pass
            self._error, self._failed = exc, True

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None], ready: Any = None) -> None:
        self._raise()
        self._jobs.put((job, ready))

    def close(self, raise_errors: bool = True) -> None:
        """Write everything queued, stop the thread, raise a write's failure."""
        self._jobs.put(None)
        self._thread.join()
        if raise_errors:
            self._raise()

    def __enter__(self) -> LineWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self.close(raise_errors=exc_type is None)

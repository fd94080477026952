"""Run bookkeeping: a run's identity and folder, resuming it, and the files it leaves.

``results/runs/<run-id>/`` holds ``config.json`` (every setting plus provenance),
``predictions.jsonl`` (one line per image, appended durably batch by batch) and, once the run
is complete, ``metrics.json``. The run id is a readable name plus a hash of every setting that
changes a result (``run_identity``), so a rerun of the same command finds its folder and
computes only the images not yet written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch

import lostreg
from lostreg import timeline
from lostreg.backbones import Backbone
from lostreg.datasets import DATASETS, DataChecks
from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.errors import LostregError
from lostreg.evaluation.registry import get_metric
from lostreg.evaluation.saliency_protocol import MASK_PROTOCOL
from lostreg.evaluation.targets import TARGET_KINDS
from lostreg.features.extract import FeatureRequest, resolve_layer
from lostreg.features.pipeline import BackboneInfo
from lostreg.io import JsonlAppender, atomic_write_json, refuse_links
from lostreg.methods import MethodSpec
from lostreg.runs import distributed, state
from lostreg.runs.checks import feature_request, is_mask_dataset, method_of, method_params
from lostreg.runs.config import SCRATCH_NOTE, SMOKE_NOTE, RunConfig
from lostreg.runs.distributed import DistContext
from lostreg.runs.legacy import add_if_changed, digest, earlier_run_ids, safe_model
from lostreg.runs.lock import LOCK_NAME
from lostreg.runs.nonfinite import nonfinite_fields, nonfinite_lines, nonfinite_warning
from lostreg.runs.predictions import (
    BOX_LINES,
    QUARANTINE,
    LineFormat,
    evaluate_lines,
    load_predictions,
    prediction_files,
)
from lostreg.version import checkout_commit


@dataclass
class RunResult:
    """What one run of a command gave: its folder, every metric's figures (``metrics``: as in
    ``metrics.json``, e.g. ``corloc``, ``n_hits``, ``n_images``), its summary line and what
    the command did (new, resumed, already finished)."""

    run_id: str
    run_dir: Path
    metrics: dict[str, Any]
    smoke: bool
    summary: str
    status: str = ""

    @property
    def corloc(self) -> float:
        """CorLoc in percent, unrounded (``metrics.json`` holds it to 4 decimals); NaN for a
        run scored on masks (it has no CorLoc)."""
        images = self.metrics["n_images"]
        if "n_hits" not in self.metrics:
            return math.nan
        return 100.0 * self.metrics["n_hits"] / images if images else math.nan

    @property
    def n_images(self) -> int:
        return self.metrics["n_images"]

    @property
    def n_hits(self) -> int:
        return self.metrics["n_hits"]


# --- identity ------------------------------------------------------------------------------


def dataset_is_complete(index: DatasetIndex) -> bool:
    """True unless a registry dataset (VOC07: 5011, VOC12: 11540, COCO20k: 19817 images) has
    another image count; ``--no-hard`` indexes are smaller by design and not checked."""
    spec = DATASETS.get(index.name)
    expected = spec.expected_images if spec is not None else None
    return expected is None or index.no_hard or len(index) == expected


def check_dataset_complete(index: DatasetIndex, allow_partial: bool) -> None:
    """Every image counts in CorLoc, so a run on an incomplete dataset is refused unless asked
    for; such a run gets its own run id (``dataset_images`` in its identity). A split that
    lists no image is refused whatever the flags: CorLoc over no image is undefined (it used to
    "finish" as ``CorLoc nan (0/0)`` with NaN in metrics.json)."""
    if len(index) == 0:
        raise LostregError(f"{index.root}: {index.name} {index.split} lists no images"
                           f"{' once --no-hard dropped the emptied ones' if index.no_hard else ''}"
                           "; there is nothing to score (check the split file)")
    if allow_partial or dataset_is_complete(index):
        return
    expected = DATASETS[index.name].expected_images
    raise LostregError(
        f"{index.root}: {index.name} {index.split} lists {len(index)} images, expected {expected} "
        "(incomplete download or modified split file?); fix the data, or pass "
        "--allow-partial-dataset for a run that is not comparable with published figures"
    )


def run_identity(config: RunConfig, backbone: Backbone | BackboneInfo, index: DatasetIndex,
                 request: FeatureRequest, params: dict[str, Any]) -> dict:
    """The settings that decide the results; their hash names the run directory.

    Settings added after the first release enter only when they differ from their default
    (``layer``, ``normalize``, a method other than LOST), so older runs keep their ids.
    """
    identity = {
        "lostreg_version": lostreg.__version__,
        "model": backbone.spec.name,
        "timm_name": backbone.spec.timm_name,
        "pos_embed": backbone.spec.pos_embed,
        "weights": backbone.weights.identity(),
        "dataset": index.name,
        "split": index.split,
        "no_hard": index.no_hard,
        "limit": config.limit,
        "feature": request.kind,
        "precision": config.precision,
        **method_of(config).identity(params),
        **backbone.spec.identity_extras(),  # --pos-interp timm, +ttr with its neuron list
    }
    add_if_changed(identity, "layer", request.layer)
    add_if_changed(identity, "normalize", config.normalize)
    if is_mask_dataset(index.name):  # saliency runs only: box runs keep their ids
        identity["mask_protocol"] = MASK_PROTOCOL
        identity["refine"] = config.refine
    if not dataset_is_complete(index):
        identity["dataset_images"] = len(index)
    return identity


FEATURE_WORDS = {"q": "queries", "k": "keys", "v": "values", "attn": "clsattn"}


def settings_label(identity: dict, mark_partial: bool = True) -> str:
    """The readable middle of a run id: method, feature (and layer), then every setting that
    differs from its default, e.g. ``lost-keys``, ``lost-values-k50-bias-0.1``,
    ``tokencut-keys@L-2-l2-tau0.3``; a run on a partial dataset ends with ``partial<images>``
    (``lost-keys-partial12``: never mistaken for a full run; ``mark_partial=False`` gives the
    name such a run had before, see ``lostreg.runs.legacy.earlier_run_ids``)."""
    method = identity.get("method", "lost")
    feature = FEATURE_WORDS.get(identity["feature"], identity["feature"])
    if "layer" in identity:
        feature += f"@L{identity['layer']}"
    parts = [method, feature]
    if "pos_interp" in identity:
        parts.append(f"pos{identity['pos_interp']}")
    if "normalize" in identity:
        parts.append(identity["normalize"])
    if method == "lost":
        params = {"k_patches": identity["k_patches"], "gram_bias": identity["gram_bias"]}
    else:
        params = identity.get("method_params", {})
    spec = method_of(RunConfig(method=method))
    short = {"k_patches": "k", "gram_bias": "bias"}
    for param in spec.params:  # in the method's own order
        name, value = param.name, params.get(param.name, param.default)
        if value != param.default:
            text = f"{value:g}" if isinstance(value, float) else str(value).lower()
            parts.append(f"{short.get(name, name)}{text}")
    if identity.get("refine", "none") != "none":
        parts.append(identity["refine"])
    if mark_partial and "dataset_images" in identity:
        parts.append(f"partial{identity['dataset_images']}")
    return "-".join(parts)


def scratch_marks(config: RunConfig) -> dict[str, Any]:
    """What a scratch run (``lostreg.evaluate(..., scratch=True)``: a look during training)
    adds to its identity, config.json and metrics.json; nothing for any other run, so their
    ids and files stay as they were. The leaderboard never reads a scratch run."""
    return {"scratch": True} if config.scratch else {}


def make_run_id(identity: dict, smoke: bool, mark_partial: bool = True) -> str:
    """``[smoke-][scratch-]<dataset>-<model>-<settings>-<hash>``: readable, and unique through
    the hash."""
    prefix = ("smoke-" if smoke else "") + ("scratch-" if identity.get("scratch") else "")
    label = settings_label(identity, mark_partial)
    name = f"{prefix}{identity['dataset']}-{safe_model(identity)}-{label}"
    return f"{name}-{digest(identity)}"


def find_run_id(output: Path, identity: dict, smoke: bool) -> str:
    """This identity's folder name under ``output``: the readable one, or a name an earlier
    release gave it when only that exists (``lostreg.runs.legacy.earlier_run_ids``), so
    earlier runs stay resumable and keep their folder."""
    new = make_run_id(identity, smoke)
    if (output / new).exists():
        return new
    unmarked = make_run_id(identity, smoke, mark_partial=False)
    for old in earlier_run_ids(identity, smoke, unmarked):
        if (output / old).is_dir():
            return old
    return new


# --- what a run writes ---------------------------------------------------------------------


def provenance(backbone: Backbone | BackboneInfo, index: DatasetIndex,
               device: torch.device) -> dict:
    """What every artefact records to be traceable to its inputs: model, weights (sha256),
    dataset, code version, library versions, device; plus the smoke flag and note."""
    import timm

    smoke = backbone.weights.is_random
    return {
        "model": backbone.spec.name,
        "timm_name": backbone.spec.timm_name,
        "family": backbone.spec.family,
        "patch_size": backbone.spec.patch_size,
        "num_registers": backbone.spec.num_registers,
        "num_params": backbone.num_params,
        "pos_embed_interpolation": backbone.spec.pos_embed_mode,
        **backbone.spec.describe(),  # pos_interp, test_time_registers, ttr_neurons
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "weights": dataclasses.asdict(backbone.weights),
        "smoke_run": smoke,
        "dataset": index.name,
        "split": index.split,
        "data_root": os.path.abspath(index.root),
        "no_hard": index.no_hard,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "lostreg_version": lostreg.__version__,
        "git_commit": checkout_commit(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": sys.version.split()[0],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"note": SMOKE_NOTE} if smoke else {}),
    }


@dataclass
class RunFolder:
    """One run of a pass: its settings, identity, folder and what it still needs."""

    config: RunConfig
    method: MethodSpec
    params: dict[str, Any]
    request: FeatureRequest
    identity: dict
    run_id: str
    run_dir: Path
    fmt: LineFormat = BOX_LINES  # what its predictions lines hold (target, metrics)
    pending: set[int] = field(default_factory=set)  # dataset positions still missing (all ranks)
    out: JsonlAppender | None = None
    finished: bool = False  # complete before this command: its files are left as they are
    results: dict[str, Any] | None = None  # a complete run's figures, from its validated lines
    note: str = ""  # what this command repaired (a rewritten config.json or metrics.json)
    result_versions: list[int] = field(default_factory=list)  # of the code behind its lines
    version_mix: bool = False  # lines of several result versions (--allow-version-mix)

    @property
    def feature(self) -> str:
        return self.request.kind

    def settings(self) -> dict[str, Any]:
        """What config.json and metrics.json say about the run's method and features."""
        lost = self.method.name == "lost"  # LOST's parameters are also top-level keys
        masks = {key: self.identity[key] for key in ("refine", "mask_protocol")
                 if key in self.identity}  # a saliency run's post-processing and protocol
        return {"method": self.method.name, "method_params": self.params,
                "feature": self.request.kind, "layer": self.request.layer,
                "normalize": self.config.normalize,
                "k_patches": self.config.k_patches if lost else None,
                "gram_bias": float(self.config.gram_bias) if lost else None,
                "precision": self.config.precision, **masks,
                "max_nonfinite": self.config.max_nonfinite}

    def append(self, lines: list[dict], ctx: DistContext) -> None:
        """Append ``lines`` (this rank's part file under torchrun); ``sync`` makes them
        durable. Written lines survive a killed process at once, so resume stays exact."""
        if self.out is None:
            self.out = JsonlAppender(distributed.predictions_target(self.run_dir, ctx))
        self.out.write_many(lines, sync=False)

    def sync(self) -> None:
        if self.out is not None:
            self.out.sync()

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


def describe_run(config: RunConfig, info: BackboneInfo, index: DatasetIndex,
                 extra_identity: dict | None = None) -> RunFolder:
    """The run ``config`` makes of this backbone and dataset (no file touched)."""
    spec = method_of(config)
    params = method_params(config)
    request = feature_request(config, info.spec.default_feature)
    resolve_layer(request.layer, info.depth)  # a layer the model lacks: one line, before work
    identity = {**run_identity(config, info, index, request, params), **(extra_identity or {}),
                **scratch_marks(config)}
    smoke = info.weights.is_random
    run_id = find_run_id(Path(config.output), identity, smoke)
    return RunFolder(config, spec, params, request, identity, run_id, Path(config.output) / run_id,
                     line_format(index, info.patch_size))


def line_format(index: DatasetIndex, patch_size: int) -> LineFormat:
    """What the lines of a run on ``index`` hold: the ground truth of its dataset's target kind
    and the scores of the dataset's metrics (``lostreg.datasets`` registry; an index of no
    registered dataset is scored as boxes by CorLoc). A box may reach a patch less one pixel
    into the padding (DINO-seg's reference box is not clipped)."""
    spec = DATASETS.get(index.name)
    target = TARGET_KINDS[spec.target if spec is not None else "boxes"]
    metrics = tuple(get_metric(name) for name in (spec.metrics if spec is not None else ("corloc",)))
    return LineFormat(target, metrics, box_slack=patch_size - 1)


def config_payload(run: RunFolder, backbone: Backbone | BackboneInfo, index: DatasetIndex,
                   device: torch.device, numerics: dict, extra: dict | None = None) -> dict:
    """What this command writes as the run's config.json (``open_runs`` adds the code
    versions): every setting, provenance, what its lines hold."""
    return {
        "run_id": run.run_id,
        "identity": run.identity,
        # paths absolute: analyze, verify and the notebook read them from any directory
        "settings": {k: (os.path.abspath(v) if isinstance(v, Path) else v)
                     for k, v in dataclasses.asdict(run.config).items()},
        **provenance(backbone, index, device),
        **run.settings(),
        # what its lines hold: the target kind and the metrics that score it
        "target": run.fmt.target.kind,
        "metrics": [metric.name for metric in run.fmt.metrics],
        "numerics": numerics,
        **(extra or {}),
        **_scratch_fields(run.config),
    }


def _scratch_fields(config: RunConfig) -> dict[str, Any]:
    return {"scratch_run": True, "scratch_note": SCRATCH_NOTE} if config.scratch else {}


def is_finished(run: RunFolder) -> bool:
    """Whether a run was complete before this command: every prediction in its merged file,
    no per-rank part left, its config.json and metrics.json written. Rerunning such a run
    changes nothing on disk, so metrics.json keeps the timings of the work it did."""
    return (not run.pending and (run.run_dir / "metrics.json").is_file()
            and (run.run_dir / "config.json").is_file()
            and not distributed.part_files(run.run_dir))


def run_files(run_dir: Path) -> list[Path]:
    """Every file a run replaces whole in its folder (``run.lock`` aside, which ``RunLock``
    opens without following a link): a link among them is refused, never written through."""
    return [run_dir / "config.json", run_dir / "metrics.json"]


def appended_files(run_dir: Path) -> list[Path]:
    """Every file a run appends to (or cuts back) in its folder: a symbolic link or a file
    with other hard links among them is refused, never written into."""
    return [run_dir / QUARANTINE, *prediction_files(run_dir)]


def check_unique(runs: Sequence[RunFolder]) -> None:
    seen: set[str] = set()
    for run in runs:
        if run.run_id in seen:
            raise LostregError(f"two runs of one command have the same settings ({run.run_id}); "
                               "list each value of a comma list once")
        seen.add(run.run_id)


def open_runs(runs: Sequence[RunFolder], records: Sequence[ImageRecord], root: Path,
              patch_size: int, write: bool, config_of: Callable[[RunFolder], dict]) -> None:
    """Create the folders, read back and validate what each run already holds (bad lines are
    quarantined and their images recomputed, see ``lostreg.runs.predictions``; config.json,
    metrics.json and the code versions, see ``lostreg.runs.state``), and write config.json of
    unfinished runs (``write``: this process is rank 0, the only one that checks and repairs;
    ``config_of``: the config.json this command writes for a run)."""
    for run in runs:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # nothing read or written through a link, nor appended to a file shared by another path
        refuse_links(run_files(run.run_dir), appended_files(run.run_dir))
        expected = config_of(run) if write else {}
        previous = state.read_previous(run.run_dir) if write else state.Previous(None)
        state.check_same_run(run.run_dir, previous, expected)  # before anything is repaired
        loaded = load_predictions(run.run_dir, records, root=root, repair=write, fmt=run.fmt)
        run.pending = {p for p, r in enumerate(records) if r.image_id not in loaded.lines}
        if not write:  # another rank: rank 0 checks, repairs and writes
            run.finished = is_finished(run) and not loaded.problems
            continue
        complete = (not run.pending and not loaded.problems
                    and not distributed.part_files(run.run_dir))
        _open_one(run, records, expected, previous, loaded.lines, complete)


def _open_one(run: RunFolder, records: Sequence[ImageRecord], expected: dict,
              previous: state.Previous, lines: dict[str, dict], complete: bool) -> None:
    """Decide whether one run is already finished (its config.json and metrics.json valid),
    or what this command rewrites; write its config.json when it will write into the folder."""
    disagreement = None
    if complete:
        run.results = evaluate_lines(lines, records, run.fmt)
        nonfinite = len(nonfinite_lines(list(lines.values())))
        disagreement = state.metrics_disagreement(run.run_dir, run.results, nonfinite,
                                                  previous.config or expected)
        if disagreement is None and previous.config is not None:
            run.finished = True
            return
        if disagreement is None:  # only config.json is damaged: rewritten, nothing else
            run.finished = True
            run.note = f"config.json rewritten: {previous.problem or 'it was missing'}"
            _write_config(run, expected, previous, len(lines), versions_known=False)
            return
    run.finished = False
    if disagreement is not None and (run.run_dir / "metrics.json").exists():
        run.note = f"metrics.json rewritten from the predictions: {disagreement}"
        if previous.config is not None:  # only metrics.json is rewritten (by this code:
            run.result_versions, run.version_mix = state.check_versions(  # checked)
                run.run_dir, previous, len(lines), run.config.allow_version_mix)
            if not run.version_mix:
                return
    _write_config(run, expected, previous, len(lines))  # a resume (even of the last step)


def _write_config(run: RunFolder, expected: dict, previous: state.Previous, lines: int,
                  versions_known: bool = True) -> None:
    """config.json with the code versions: those of the predictions already there and this
    code's (refused when they mix, unless ``--allow-version-mix``); with
    ``versions_known=False`` (only an unreadable config.json is replaced) the predictions'
    versions are recorded as unknown."""
    if versions_known:
        run.result_versions, run.version_mix = state.check_versions(
            run.run_dir, previous, lines, run.config.allow_version_mix)
    else:
        run.result_versions, run.version_mix = [], False
    payload = {**expected, "result_versions": run.result_versions,
               "version_mix": run.version_mix,
               "code_history": state.history(previous, lines, run.version_mix)}
    atomic_write_json(run.run_dir / "config.json", payload)


def clear_unused(run_dirs: Sequence[Path]) -> list[Path]:
    """Empty the run folders this command created that still hold nothing but its
    ``config.json`` (and the lock it holds); returns them, for ``remove_empty`` once the locks
    are released. Called only while this process holds every one of their locks, so no other
    lostreg process is inside; a folder that does not exist (a command refused at another
    folder's lock before it made this one) is left alone."""
    emptied = []
    for run_dir in run_dirs:
        try:
            names = set(os.listdir(run_dir))
        except FileNotFoundError:
            continue
        if names <= {"config.json", LOCK_NAME}:
            (run_dir / "config.json").unlink(missing_ok=True)
            emptied.append(run_dir)
    return emptied


def remove_empty(run_dirs: Sequence[Path]) -> None:
    """Remove each folder if it is empty, after its lock is released: ``rmdir`` refuses a
    folder another process has meanwhile put its lock into, and that is fine (it is theirs now);
    a process that made the folder and finds it gone makes it again (``RunLock``)."""
    for run_dir in run_dirs:
        try:
            run_dir.rmdir()
        except OSError:
            pass


# --- finishing -----------------------------------------------------------------------------


class RunScore(NamedTuple):
    """A run's figures (every metric's, as ``metrics.json`` holds them) and, when this command
    finished it, the data checks to warn about."""

    results: dict[str, Any]
    warnings: list[str]
    nonfinite: int = 0  # images without a prediction (non-finite features), in the figures


def finalize(run_dir: Path, index_records: Sequence[ImageRecord], root: Path, fmt: LineFormat,
             run_id: str, smoke: bool, summary_fields: dict, seconds: dict,
             max_nonfinite: int = 0) -> RunScore:
    """Merge the validated predictions (the file and any per-rank parts) in dataset order, so
    a resumed or distributed run's file equals an uninterrupted one's, and write metrics.json
    atomically: its figures always come from the validated lines, every score recomputed, and
    it counts what the data needed (boxes clipped, zero-area boxes, images whose annotated size
    was not their size: ``data_checks``). A run with more images whose features were not
    finite than ``max_nonfinite`` stops here, one line, before metrics.json (``nonfinite``)."""
    ordered = distributed.merge_predictions(run_dir, index_records, root, fmt=fmt)
    nonfinite = nonfinite_fields(ordered, run_dir, summary_fields, max_nonfinite)
    results: dict[str, Any] = {}
    for metric in fmt.metrics:
        results.update(metric.evaluate(ordered))
    checks = DataChecks.of_run(index_records, ordered)
    timeline.mark("first run finished")
    metrics = {
        "run_id": run_id,
        **results,
        "smoke_run": smoke,
        "weights": "random" if smoke else "pretrained",
        "seconds": seconds,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # when this process reached each step, in seconds since it started (lostreg.timeline)
        "startup": timeline.marks(),
        "data_checks": checks.to_json(),
        **nonfinite,
        **summary_fields,
    }
    if smoke:
        metrics["note"] = SMOKE_NOTE
    atomic_write_json(run_dir / "metrics.json", metrics, undefined_as_null=True)
    count = nonfinite["nonfinite_images"]
    warning = nonfinite_warning(run_dir, count, summary_fields.get("precision", "fp32"))
    return RunScore(results, checks.warnings(summary_fields["dataset"])
                    + ([warning] if warning else []), count)


def finish_run(run: RunFolder, records: Sequence[ImageRecord], index: DatasetIndex,
               info: BackboneInfo, total: float, everyone: list[dict], ctx: DistContext,
               n_runs: int) -> RunScore:
    """CorLoc of a run at the end of its pass: read back when it was finished before,
    otherwise merged and written with its timings."""
    if run.finished:
        loaded = load_predictions(run.run_dir, records, root=index.root, repair=False,
                                  fmt=run.fmt)
        results = run.results if run.results is not None else evaluate_lines(
            loaded.lines, records, run.fmt)
        return RunScore(results, [], len(nonfinite_lines(list(loaded.lines.values()))))
    computed = len(run.pending)
    seconds = {
        "total": round(total, 3),
        "model_and_lost": round(max(s["forward"] + s["method"] for s in everyone), 3),
        # where the time went (the slowest rank's): waiting for decoded batches, copying
        # them to the device, the backbone (or cache reads), the methods, the line writer
        # (a background thread, so it overlaps the rest)
        **{key: round(max(s[stat] for s in everyone), 3) for key, stat in (
            ("load_wait", "load"), ("transfer", "transfer"), ("features", "forward"),
            ("method", "method"), ("write", "write"))},
        "images_computed": computed,
        "images_per_second": round(computed / total, 3) if total > 0 else None,
        "backbone_images": sum(s["backbone_images"] for s in everyone),
        "cached_images": sum(s["cached_images"] for s in everyone),
        "world_size": ctx.world_size,
        "runs_in_pass": n_runs,
    }
    summary_fields = {"model": info.spec.name, "timm_name": info.spec.timm_name,
                      "dataset": index.name, "split": index.split, **run.settings(),
                      "no_hard": index.no_hard, "resumed_with": len(records) - computed,
                      "result_versions": run.result_versions, "version_mix": run.version_mix,
                      **_scratch_fields(run.config)}
    return finalize(run.run_dir, records, index.root, run.fmt, run.run_id,
                    info.weights.is_random, summary_fields, seconds, run.config.max_nonfinite)


def run_status(run: RunFolder, n_images: int) -> str:
    """``new``, ``resumed (n of N were done)`` or ``already finished``: what this command did,
    with what it repaired (a rewritten config.json or metrics.json, see ``lostreg.runs.state``)."""
    if run.finished:
        return "already finished" + (f" ({run.note})" if run.note else "")
    if run.note:
        return run.note
    done = n_images - len(run.pending)
    return "new" if done == 0 else f"resumed ({done} of {n_images} were done)"


def summary_line(results: dict[str, Any], index: DatasetIndex, model: str, run: RunFolder,
                 smoke: bool, status: str, nonfinite: int = 0) -> str:
    """The one line a run prints: its figures (each metric's words, e.g. ``CorLoc 61.90
    (3102/5011)``), what it was measured on, every setting that changes the result, what this
    command did and where the run folder is."""
    figures = " ".join(metric.describe(results) for metric in run.fmt.metrics)
    summary = (f"{figures} {index.name} {index.split} "
               f"{model} {run.request.label} {run.method.name}")
    defaults = run.method.defaults()
    short = {"k_patches": "k"}
    for name, value in run.params.items():
        if value != defaults[name]:
            summary += f" {short.get(name, name)}={value:g}" if isinstance(value, float) \
                else f" {short.get(name, name)}={value}"
    if run.identity.get("refine", "none") != "none":
        summary += f" refine={run.identity['refine']}"
    if run.config.normalize != "none":
        summary += f" normalize={run.config.normalize}"
    if run.config.pos_interp != "original":
        summary += f" pos_interp={run.config.pos_interp}"
    if index.no_hard:
        summary += " no_hard"
    if run.config.precision != "fp32":
        summary += f" {run.config.precision}"
    if run.config.limit:
        summary += f" limit={run.config.limit}"
    partial = partial_note(run.identity, index.name)
    if partial:
        summary += f" partial={run.identity['dataset_images']}/{DATASETS[index.name].expected_images}"
    if "feature_cache" in run.identity:  # rounded cached features: not the exact result
        summary += f" cache={run.identity['feature_cache']}"
    summary += f" | {status}: {run.run_dir}"
    if smoke:
        summary += f"  [{SMOKE_NOTE}]"
    if run.config.scratch:
        summary += f"  [{SCRATCH_NOTE}]"
    if partial:
        summary += f"  [{partial}]"
    if nonfinite:
        summary += f"  [{nonfinite} image(s) with non-finite features scored as failures]"
    return summary


def partial_note(identity: dict, dataset: str) -> str:
    """``partial dataset (12 of 5011 images): not comparable with published figures`` for a
    run on a split that lists another number of images than the benchmark's, else ''."""
    spec = DATASETS.get(dataset)
    if "dataset_images" not in identity or spec is None:
        return ""
    return (f"partial dataset ({identity['dataset_images']} of {spec.expected_images} images): "
            "not comparable with published figures")

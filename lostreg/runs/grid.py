"""The grid: which runs a command asks for, and in which order they are done.

A grid is (model, dataset) pairs times the runs of one pass (``expand_sweep``: methods, feature
kinds, layers, normalisations and each method's parameters). Models run one after the other;
each is described (weights hashed) once and built only if some image needs it; each dataset is
indexed once; every (model, dataset) is one pass (``lostreg.runs.sweep``) serving all its runs.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lostreg import timeline
from lostreg.backbones import (
    Backbone,
    BackboneSpec,
    create_backbone,
    get_backbone_spec,
    with_pos_interp,
)
from lostreg.backbones.weights import WeightsInfo
from lostreg.datasets import get_dataset, load_dataset
from lostreg.datasets.base import DatasetIndex
from lostreg.errors import LostregError
from lostreg.features.cache import is_lossless, storage_dtype
from lostreg.features.cache_admin import stale_note
from lostreg.features.pipeline import (
    LazyBackbone,
    decode_workers,
    describe_backbone,
    resolve_device,
    set_numerics,
    use_device,
    warm_start,
)
from lostreg.io import read_json_object
from lostreg.methods import METHODS, get_method
from lostreg.runs import distributed
from lostreg.runs.checks import (
    accepted_features,
    check_config,
    check_feature,
    check_refine,
    feature_request,
    method_params,
    with_defaults,
)
from lostreg.runs.config import SMOKE_NOTE, RunConfig, pass_key
from lostreg.runs.folder import (
    RunResult,
    check_dataset_complete,
    find_run_id,
    make_run_id,
    run_identity,
)
from lostreg.runs.lock import LOCK_NAME, RunLocked, describe_holder, holder_of, read_holder
from lostreg.runs.sweep import run_pass


def run_benchmark(config: RunConfig, backbone: Backbone | None = None,
                  index: DatasetIndex | None = None) -> RunResult:
    """Run (or resume) one benchmark run and return its CorLoc; see the module docstring."""
    return run_sweep([config], backbone=backbone, index=index)[0]


def run_sweep(configs: Sequence[RunConfig], backbone: Backbone | None = None,
              index: DatasetIndex | None = None) -> list[RunResult]:
    """Run (or resume) several runs that differ only in what they do with the backbone's
    output (``lostreg.runs.config.SWEPT``: method and parameters, features, layer, normalisation)
    in one pass over the images. One folder per run."""
    if not configs:
        return []
    base = configs[0]
    for config in configs:
        check_config(config)
        if pass_key(config) != pass_key(base):
            raise ValueError("run_sweep: configs may differ only in method, method parameters, "
                             "features, layer and normalisation; use run_grid for the rest")
    return run_grid(base, pairs=[(base.model, base.dataset)], sweep=configs,
                    backbone=backbone, index=index)


def _method_axes(spec_name: str, base: RunConfig, values: dict[str, list[Any]]
                 ) -> list[tuple[str, list[Any]]]:
    """Each parameter of a method with the values to sweep (given, or the base's)."""
    axes = []
    for param in get_method(spec_name).params:
        if param.name in values:
            axes.append((param.name, values[param.name]))
        elif param.on_config:
            axes.append((param.name, [getattr(base, param.name)]))
        else:
            axes.append((param.name, [base.method_params.get(param.name, param.default)]))
    return axes


def _features_for(method: str, features: Sequence[str | None], methods: Sequence[str]
                  ) -> list[str | None]:
    """The feature kinds ``method`` runs on, by one rule for one method or several: each
    method runs on the kinds of ``features`` it reads (``checks.accepted_features``); not
    given (``None``), each reads its own default. A method that reads none of the kinds given
    is one line naming it (never a silent switch to its default: ``--method lost,dinoseg
    --features k`` used to run DINO-seg on attn)."""
    kinds = [f for f in features if f is not None]
    if not kinds:
        return list(features)
    spec = get_method(method)
    accepted = accepted_features(spec)
    chosen = [f for f in kinds if f in accepted]
    if not chosen and len(methods) == 1:
        check_feature(spec, kinds[0])  # raises: the one-method line
    if not chosen:
        raise LostregError(
            f"--method {method} reads {'/'.join(accepted)}, none of --features "
            f"{','.join(kinds)} (with several methods each runs on the listed kinds it reads): "
            f"add {accepted[0]} to --features or drop {method} from --method")
    return chosen


def _check_every_kind_read(methods: Sequence[str], features: Sequence[str | None]) -> None:
    """A kind that no method of the command reads is one line, not quietly dropped."""
    for kind in features:
        if kind is None:
            continue
        if len(methods) == 1:
            check_feature(get_method(methods[0]), kind)
        elif not any(kind in accepted_features(get_method(m)) for m in methods):
            readers = ", ".join(f"{m} reads {'/'.join(accepted_features(get_method(m)))}"
                                for m in methods)
            raise LostregError(f"--features {kind}: no method of --method {','.join(methods)} "
                               f"reads it ({readers})")


def expand_sweep(base: RunConfig, *, methods: Sequence[str] | None = None,
                 features: Sequence[str | None] | None = None,
                 layers: Sequence[int] | None = None,
                 normalizations: Sequence[str] | None = None,
                 values: dict[str, list[Any]] | None = None,
                 refines: Sequence[str] | None = None,
                 refine_by_method: dict[str, Sequence[str]] | None = None) -> list[RunConfig]:
    """Every run of a pass: methods x feature kinds x layers x normalisations x each method's
    own parameter values (``values`` by parameter name; LOST's ``k_patches``/``gram_bias``
    too) x the saliency post-processings (``refines`` for every method, or
    ``refine_by_method`` for the methods it names: a suite's TokenCut with and without the
    bilateral solver). None keeps ``base``'s value. Duplicates are dropped, order kept."""
    methods = list(methods or [base.method])
    values = dict(values or {})
    owners = {p.name: name for name, spec in METHODS.items() for p in spec.params}
    for name in values:
        if owners.get(name) not in methods:
            raise LostregError(f"{_flag(name)} is a setting of {owners.get(name, '?')}; add it "
                               "to --method to use it")
    features = list(features or [base.features])
    _check_every_kind_read(methods, features)
    sweep: list[RunConfig] = []
    for method in methods:
        axes = _method_axes(method, base, values)
        method_refines = list((refine_by_method or {}).get(method) or refines or [base.refine])
        for feature, layer, normalize, combo, refine in itertools.product(
                _features_for(method, features, methods),
                layers or [base.layer], normalizations or [base.normalize],
                itertools.product(*(v for _, v in axes)), method_refines):
            chosen = dict(zip((name for name, _ in axes), combo, strict=True))
            on_config = {p.name: chosen.pop(p.name) for p in get_method(method).params
                         if p.on_config}
            config = dataclasses.replace(base, method=method, features=feature, layer=layer,
                                         normalize=normalize, method_params=chosen,
                                         refine=refine, **on_config)
            if config not in sweep:
                sweep.append(config)
    return sweep


def _flag(name: str) -> str:
    for spec in METHODS.values():
        for param in spec.params:
            if param.name == name:
                return param.cli_flag
    return "--" + name.replace("_", "-")


def _group_by_model(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    by_model: dict[str, list[str]] = {}
    for model, dataset in pairs:
        if dataset not in by_model.setdefault(model, []):
            by_model[model].append(dataset)
    return by_model


def _check_datasets_present(base: RunConfig, datasets: Sequence[str]) -> None:
    """Every dataset name is known and, with ``--no-download``, every dataset is there before
    any run starts."""
    for dataset in dict.fromkeys(datasets):
        spec = get_dataset(dataset)  # an unknown name fails here, before any work
        if not base.download and not spec.is_present(Path(base.data_root)):
            load_dataset(dataset, base.data_root, download=False)  # says what is missing


def run_grid(base: RunConfig, models: Sequence[str] | None = None,
             datasets: Sequence[str] | None = None, *,
             features: Sequence[str | None] | None = None,
             k_patches: Sequence[int] | None = None,
             gram_biases: Sequence[float] | None = None,
             methods: Sequence[str] | None = None,
             method_values: dict[str, list[Any]] | None = None,
             layers: Sequence[int] | None = None,
             normalizations: Sequence[str] | None = None,
             pos_interps: Sequence[str] | None = None,
             refines: Sequence[str] | None = None,
             refine_by_method: dict[str, Sequence[str]] | None = None,
             pairs: Sequence[tuple[str, str]] | None = None,
             sweep: Sequence[RunConfig] | None = None,
             backbone: Backbone | None = None, index: DatasetIndex | None = None,
             on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Every (model, dataset) pair (``pairs``, or ``models`` x ``datasets``), with each
    position-embedding resampling of ``pos_interps`` (it changes the model: one pass each),
    times every run of ``expand_sweep`` (methods, features, layers, normalisations, method
    parameters with ``k_patches``/``gram_biases`` for LOST, saliency ``refines`` or
    ``refine_by_method``; None keeps ``base``'s value), or ``sweep`` as given.

    Models run one after the other; each is described (weights hashed) once, built at most
    once and only if some image is not in the feature cache; each dataset is indexed once.
    ``on_result`` sees each run as soon as it is finished.
    """
    base = with_defaults(base)
    if pairs is None:
        pairs = [(m, d) for m in (models or [base.model]) for d in (datasets or [base.dataset])]
    by_model = _group_by_model(pairs)
    specs = _backbone_specs(base, by_model, pos_interps or [base.pos_interp], backbone)
    if index is None:
        _check_datasets_present(base, [d for ds in by_model.values() for d in ds])
    if sweep is None:
        values = dict(method_values or {})
        if k_patches is not None:
            values["k_patches"] = list(k_patches)
        if gram_biases is not None:
            values["gram_bias"] = [float(b) for b in gram_biases]
        sweep = expand_sweep(base, methods=methods, features=features, layers=layers,
                             normalizations=normalizations, values=values, refines=refines,
                             refine_by_method=refine_by_method)
    sweep = [with_defaults(config) for config in sweep]
    for config in sweep:
        check_config(config)
    for dataset in dict.fromkeys(d for ds in by_model.values() for d in ds):
        for config in sweep:  # a box dataset with --refine: one line, before any work
            check_refine(config.refine, dataset)
    return _run_models(base, by_model, specs, sweep, backbone, index, on_result)


def _backbone_specs(base: RunConfig, by_model: dict[str, list[str]], pos_interps: Sequence[str],
                    backbone: Backbone | None) -> dict[tuple[str, str], BackboneSpec]:
    """Each model's spec with its modifiers (``+ttr``, ``--pos-interp``), resolved before any
    work so that a typo fails at once, not after hours."""
    specs = {}
    for model in by_model:
        spec = backbone.spec if backbone is not None else get_backbone_spec(
            model, ttr_neurons=base.ttr_neurons)
        for pos_interp in pos_interps:
            specs[(model, pos_interp)] = with_pos_interp(spec, pos_interp)
    return specs


def _run_models(base: RunConfig, by_model: dict[str, list[str]],
                specs: dict[tuple[str, str], BackboneSpec], sweep: list[RunConfig],
                backbone: Backbone | None, index: DatasetIndex | None,
                on_result: Callable[[RunResult], None] | None) -> list[RunResult]:
    """The models of a grid one after the other, each over its datasets (one pass each)."""
    ctx = distributed.setup(resolve_device(base.device).type)
    device = distributed.local_device(resolve_device(base.device), ctx)
    use_device(device)
    if not ctx.enabled and not base.wait:  # before any set-up, and before the warm start,
        refuse_held_runs(base, sweep, specs, by_model, backbone)  # which an exit waits for
    warm_start(device)
    timeline.mark("device chosen")
    if base.num_workers is None:  # config.json records the number used
        workers = decode_workers(device)
        sweep = [dataclasses.replace(config, num_workers=workers) for config in sweep]
    numerics = set_numerics(base.precision)
    if base.cache_features is not None and ctx.is_main:  # where features come from and go
        print(f"note: feature cache in {os.path.abspath(base.cache_features)} (features of "
              "images already there are read from it, the others stored)", file=sys.stderr)
        stale = stale_note(base.cache_features)  # folders an upgrade left: one line, if any
        if stale:
            print(stale, file=sys.stderr)
    indexes: dict[str, DatasetIndex] = {}
    if index is not None:
        indexes = {dataset: index for datasets in by_model.values() for dataset in datasets}

    def indexed(dataset: str) -> DatasetIndex:
        if dataset not in indexes:
            indexes[dataset] = ctx.main_first(lambda: load_dataset(
                dataset, base.data_root, no_hard=base.no_hard, download=base.download))
        check_dataset_complete(indexes[dataset], base.allow_partial_dataset)
        timeline.mark("dataset indexed")
        return indexes[dataset]

    results: list[RunResult] = []
    for (model, pos_interp), spec in specs.items():
        lazy: LazyBackbone | None = None
        for dataset in by_model[model]:
            current = indexed(dataset)
            if lazy is None:
                lazy = _describe(spec, base.weights, device, backbone, ctx)
            configs = _limit_within(current, ctx.is_main, [dataclasses.replace(
                c, model=model, dataset=dataset, pos_interp=pos_interp) for c in sweep])
            for result in run_pass(configs, lazy, current, device, numerics, ctx):
                results.append(result)
                if on_result is not None:
                    on_result(result)
        if lazy is not None:
            lazy.release()
    return results


def _describe(spec: BackboneSpec, weights: str, device, backbone: Backbone | None,
              ctx) -> LazyBackbone:
    """The model's identity (weights hashed), built only when some image needs it; a plug-in
    model (``py:``) is built to be described, since its weights' identity is its state."""
    if backbone is None and spec.plugin is not None:
        backbone = ctx.main_first(lambda: create_backbone(spec, weights, device))
    info = backbone if backbone is not None else ctx.main_first(
        lambda: describe_backbone(spec, weights))
    timeline.mark("backbone described")
    if info.weights.is_random and ctx.is_main:
        print(f"warning: {SMOKE_NOTE}", file=sys.stderr)
    return LazyBackbone(info, weights, device, backbone)


def _limit_within(index: DatasetIndex, say: bool, configs: list[RunConfig]) -> list[RunConfig]:
    """A ``--limit`` of at least the dataset's size is the whole dataset: said once, and the
    full run (its folder, its id) is the one made or reused."""
    limit = configs[0].limit if configs else None
    if limit is None or limit < len(index):
        return configs
    if say:
        print(f"note: --limit {limit} covers all {len(index)} images of {index.name}: running "
              "(or reusing) the full run", file=sys.stderr)
    return [dataclasses.replace(config, limit=None) for config in configs]


# --- a run folder another process writes, found before the set-up ----------------------------


class _EarlyBackbone(NamedTuple):
    """What ``run_identity`` reads of a backbone, known before it is described."""

    spec: BackboneSpec
    weights: WeightsInfo


class _EarlyIndex(NamedTuple):
    """What ``run_identity`` reads of a dataset index, before it is indexed: the name, the
    split and whether hard objects are dropped; complete (a partial dataset's image count
    enters the identity, so such a run is simply not found early)."""

    name: str
    split: str
    no_hard: bool
    size: int

    def __len__(self) -> int:
        return self.size


def _flock_table() -> frozenset[str]:
    """The files some process holds a ``flock`` on (``major:minor:inode``), read from Linux's
    ``/proc/locks`` without touching any lock (a probe that took one, even for a moment, could
    make the real holder's own attempt fail). Empty where that file is missing (other systems;
    a lock held on another NFS client is not listed): the run's own lock still refuses the
    folder, later."""
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return frozenset()
    return frozenset(fields[5] for fields in (line.split() for line in table.splitlines())
                     if len(fields) > 5 and fields[1] == "FLOCK")


def _flocked(path: Path, held: frozenset[str]) -> bool:
    """Whether ``path`` is one of the ``held`` files (``_flock_table``)."""
    try:
        stat = path.stat()
    except OSError:
        return False
    return f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}" in held


def _early_identity(config: RunConfig, spec: BackboneSpec, weights: WeightsInfo) -> dict:
    """The identity ``describe_run`` will give ``config`` (``lostreg.runs.sweep.Pass`` adds the
    rounded-cache mark the same way), from what is known before any set-up."""
    dataset = get_dataset(config.dataset)
    index = _EarlyIndex(dataset.name, dataset.split, config.no_hard,
                        dataset.expected_images or 0)
    identity = run_identity(config, _EarlyBackbone(spec, weights), index,  # type: ignore[arg-type]
                            feature_request(config, spec.default_feature), method_params(config))
    if config.cache_features:
        storage = storage_dtype(config.cache_dtype, config.precision)
        if not is_lossless(storage, config.precision):
            identity["feature_cache"] = storage
    return identity


def _same_run(folder: Path, identity: dict, weights: str) -> bool:
    """Whether the run in ``folder`` (its config.json) is ``identity`` but for the weights'
    sha256, known only once the weights are resolved and hashed: then from the same source
    (the hub file of the same timm name, or the same checkpoint path)."""
    try:
        config = read_json_object(folder / "config.json", "missing")
    except LostregError:
        return False  # a holder still starting: the run's own lock decides, later
    theirs = config.get("identity")
    used = config.get("weights") if isinstance(config.get("weights"), dict) else {}
    if weights == "hub":
        same_weights = used.get("source") == "hub"
    else:
        same_weights = used.get("source") == "file" and used.get("path") == str(
            Path(os.path.expanduser(weights)).resolve())
    return (same_weights and isinstance(theirs, dict)
            and {k: v for k, v in theirs.items() if k != "weights"}
            == {k: v for k, v in identity.items() if k != "weights"})


def _held_folder(config: RunConfig, spec: BackboneSpec, weights: str,
                 held: frozenset[str]) -> Path | None:
    """The folder of ``config``'s run if another process holds its lock, as far as can be
    told before any set-up (see ``refuse_held_runs``)."""
    random = weights == "random"
    known = WeightsInfo("random") if random else WeightsInfo(weights, sha256="unknown")
    try:
        identity = _early_identity(config, spec, known)
    except LostregError:
        return None  # a bad setting: the run's own checks say it, in their words
    output = Path(config.output)
    if random:
        folders = [output / find_run_id(output, identity, smoke=True)]
    else:
        prefix = make_run_id(identity, smoke=False).rsplit("-", 1)[0] + "-"
        folders = sorted(output.glob(glob.escape(prefix) + "?" * 10)) if output.is_dir() else []
    for folder in folders:
        if _flocked(folder / LOCK_NAME, held) and (random or _same_run(folder, identity,
                                                                        weights)):
            return folder
    return None


def refuse_held_runs(base: RunConfig, sweep: Sequence[RunConfig],
                     specs: dict[tuple[str, str], BackboneSpec], by_model: dict[str, list[str]],
                     backbone: Backbone | None) -> None:
    """Refuse at once, before the datasets are indexed, timm is imported and the weights are
    hashed (seconds), a run folder of this command that another lostreg process is writing,
    with the line its lock would give.

    Only a look, which takes no lock: each folder's lock is still taken where it always was
    (``Pass.run``), and a holder this misses (another NFS client, a process still starting, a
    partial dataset, a ``--limit`` beyond the dataset) is refused there, as before. Random
    weights give the run id exactly; for hub and file weights, whose sha256 is not known yet,
    a folder matches on every other setting of its identity and the same weights source.
    """
    held = _flock_table()
    if not held:  # no lock held anywhere: nothing to look for (the usual case, one read)
        return
    for (model, pos_interp), spec in specs.items():
        spec = backbone.spec if backbone is not None else spec
        for dataset in by_model[model]:
            for config in sweep:
                config = dataclasses.replace(config, model=model, dataset=dataset,
                                             pos_interp=pos_interp)
                folder = _held_folder(config, spec, base.weights, held)
                if folder is not None:
                    holder = holder_of(functools.partial(read_holder, folder / LOCK_NAME))
                    raise RunLocked(
                        f"{folder}: another lostreg process is writing this run "
                        f"({describe_holder(holder)}); let it finish, "
                        "or rerun with --wait to queue")

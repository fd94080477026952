"""``python -m lostreg.run``: object-discovery CorLoc of backbones on datasets, resumable, at scale.

This module is the command line and the grid: which runs a command asks for, and in which
order they are done. The work itself reads bottom to top through

* ``lostreg.features.pipeline``: image files -> padded batches on the device -> feature maps (or the
  feature cache);
* ``lostreg.methods``: feature maps -> one box per image (LOST, TokenCut, DINO-seg, ...);
* ``lostreg.runs.sweep``: one pass of a backbone over a dataset serving every run that shares it;
* ``lostreg.runs.folder``: each run's identity, folder, resume and files;
* ``lostreg.evaluation.corloc``: CorLoc.

At scale (see the README section "Scale"):

* one command runs a grid (``--model a,b --dataset voc07,voc12 --features k,v --method
  lost,tokencut``) or a suite (``--suite paper``): each model is built once, each dataset
  indexed once;
* runs that differ only in what they do with the backbone's output (method and parameters,
  feature kind, layer, normalisation) share one pass over the images (the backbone runs once
  per image), one run folder each;
* ``--cache-features`` stores the backbone's features per image, so a later pass over cached
  images never builds the model (the run id only needs the weights' hash);
* under ``torchrun`` each rank computes every N-th missing image and writes its own part;
  rank 0 merges them into the same ``predictions.jsonl`` one process writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lostreg import timeline
from lostreg.backbones import (
    POS_INTERP_CHOICES,
    Backbone,
    BackboneSpec,
    get_backbone_spec,
    list_backbones,
    with_pos_interp,
)
from lostreg.cli import HelpFormatter, ListsParser, add_compute_options, add_ttr_neurons_option
from lostreg.datasets import DATASETS, default_data_root, get_dataset, load_dataset
from lostreg.datasets.base import DatasetIndex
from lostreg.errors import LostregError
from lostreg.features.cache import CACHE_DTYPES, DEFAULT_CACHE_DIR
from lostreg.features.extract import FEATURE_KINDS
from lostreg.features.pipeline import (  # noqa: F401 - re-exported: tests and benchmarks import them here
    DEFAULT_MAX_PIXELS,
    LazyBackbone,
    LoadedBatch,
    collate_by_shape,
    decode_workers,
    describe_backbone,
    resolve_device,
    set_numerics,
    use_device,
    warm_start,
)
from lostreg.methods import DEFAULT_METHOD, METHODS, Param, get_method
from lostreg.runs import distributed
from lostreg.runs.config import (  # noqa: F401 - PRECISIONS and SMOKE_NOTE re-exported
    NORMALIZATIONS,
    PRECISIONS,
    SMOKE_NOTE,
    RunConfig,
    check_config,
    pass_key,
)
from lostreg.runs.folder import RunResult, check_dataset_complete
from lostreg.runs.sweep import run_pass

SUITES = ("paper", "methods")


# --- from settings to runs -----------------------------------------------------------------


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


def _features_for(method: str, features: Sequence[str | None], several: bool) -> list[str | None]:
    """The feature kinds a method runs on: a method that reads fixed kinds (DINO-seg: attn)
    keeps those of ``features`` it can read, or its own default, when it shares the command
    with other methods; alone, it is checked (a wrong kind is one clear line)."""
    kinds = get_method(method).feature_kinds
    if kinds is None or not several:
        return list(features)
    return [f for f in features if f in kinds] or [None]


def expand_sweep(base: RunConfig, *, methods: Sequence[str] | None = None,
                 features: Sequence[str | None] | None = None,
                 layers: Sequence[int] | None = None,
                 normalizations: Sequence[str] | None = None,
                 values: dict[str, list[Any]] | None = None) -> list[RunConfig]:
    """Every run of a pass: methods x feature kinds x layers x normalisations x each method's
    own parameter values (``values`` by parameter name; LOST's ``k_patches``/``gram_bias``
    too). None keeps ``base``'s value. Duplicates are dropped, order kept."""
    methods = list(methods or [base.method])
    values = dict(values or {})
    owners = {p.name: name for name, spec in METHODS.items() for p in spec.params}
    for name in values:
        if owners.get(name) not in methods:
            raise LostregError(f"{_flag(name)} is a setting of {owners.get(name, '?')}; add it "
                               "to --method to use it")
    sweep: list[RunConfig] = []
    for method in methods:
        axes = _method_axes(method, base, values)
        for feature, layer, normalize, combo in itertools.product(
                _features_for(method, features or [base.features], len(methods) > 1),
                layers or [base.layer], normalizations or [base.normalize],
                itertools.product(*(v for _, v in axes))):
            chosen = dict(zip((name for name, _ in axes), combo, strict=True))
            on_config = {p.name: chosen.pop(p.name) for p in get_method(method).params
                         if p.on_config}
            config = dataclasses.replace(base, method=method, features=feature, layer=layer,
                                         normalize=normalize, method_params=chosen, **on_config)
            if config not in sweep:
                sweep.append(config)
    return sweep


def _flag(name: str) -> str:
    for spec in METHODS.values():
        for param in spec.params:
            if param.name == name:
                return param.cli_flag
    return "--" + name.replace("_", "-")


def paper_suite() -> list[tuple[str, str]]:
    """``lostreg.reports.leaderboard.PAPER_SUITE`` (the runs behind the comparison table)."""
    from lostreg.reports.leaderboard import PAPER_SUITE

    return [(str(m), str(d)) for m, d in PAPER_SUITE]


METHODS_SUITE_MODELS = ("dino_vits16", "dinov2_vitl14", "dinov2_vitl14_reg4")
METHODS_SUITE_DATASETS = ("voc07", "voc12", "coco20k")


def methods_suite() -> tuple[list[tuple[str, str]], list[str], dict[str, list[Any]]]:
    """``--suite methods``: DINO ViT-S/16 and DINOv2 ViT-L/14 with and without registers x
    LOST, TokenCut and DINO-seg x VOC07, VOC12, COCO 20k. DINO-seg runs both variants (the
    reference's quirks and the corrected one): what the quirks cost is a finding of its own.
    Returns the (model, dataset) pairs, the methods and the method values it sets."""
    pairs = [(m, d) for m in METHODS_SUITE_MODELS for d in METHODS_SUITE_DATASETS]
    methods = [name for name in ("lost", "tokencut", "dinoseg") if name in METHODS]
    return pairs, methods, {"dinoseg_variant": ["reference", "corrected"]}


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
             pairs: Sequence[tuple[str, str]] | None = None,
             sweep: Sequence[RunConfig] | None = None,
             backbone: Backbone | None = None, index: DatasetIndex | None = None,
             on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Every (model, dataset) pair (``pairs``, or ``models`` x ``datasets``), with each
    position-embedding resampling of ``pos_interps`` (it changes the model: one pass each),
    times every run of ``expand_sweep`` (methods, features, layers, normalisations, method
    parameters with ``k_patches``/``gram_biases`` for LOST; None keeps ``base``'s value), or
    ``sweep`` as given.

    Models run one after the other; each is described (weights hashed) once, built at most
    once and only if some image is not in the feature cache; each dataset is indexed once.
    ``on_result`` sees each run as soon as it is finished.
    """
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
                             normalizations=normalizations, values=values)
    for config in sweep:
        check_config(config)
    return _run_models(base, by_model, specs, list(sweep), backbone, index, on_result)


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
    warm_start(device)
    timeline.mark("device chosen")
    if base.num_workers is None:  # config.json records the number used
        workers = decode_workers(device)
        sweep = [dataclasses.replace(config, num_workers=workers) for config in sweep]
    numerics = set_numerics(base.precision)
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
    """The model's identity (weights hashed), built only when some image needs it."""
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


# --- CLI -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ListsParser(
        prog="lostreg-run",
        description=(
            "Score object discovery (CorLoc) on a ViT's attention features. Features are q, k "
            "or v of a block's attention (the LAST block unless --layer; fused qkv, heads "
            "concatenated in head order) for the patch tokens only: the class token and every "
            "register token are removed. Images are not resized; they are zero-padded to a "
            "multiple of the patch size. Comma lists (--model a,b --dataset voc07,voc12 "
            "--method lost,tokencut --gram-bias=0,-0.1) run every combination, one run folder "
            "each. Several GPUs: torchrun --nproc_per_node=N -m lostreg.run ..."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="backbone short name(s), comma separated, or timm:<name> "
                             f"(default dinov2_reg4); known: {', '.join(list_backbones())}")
    parser.add_argument("--dataset", default=None,
                        help="dataset(s), comma separated (default voc07); one of "
                             f"{', '.join(DATASETS)}")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="run a named suite instead of --model/--dataset (paper: the runs of "
                             "the comparison table; methods: DINO ViT-S/16 and DINOv2 ViT-L/14 "
                             "with and without registers x every method, DINO-seg in both variants, x "
                             "VOC07/VOC12/COCO20k), "
                             "then rebuild the leaderboard")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset root (default: $LOSTREG_DATA or datasets/)")
    parser.add_argument("--weights", default="hub",
                        help="hub (timm from the Hugging Face hub), a checkpoint PATH, or random "
                             "(untrained: smoke run, never a result)")
    _add_method_options(parser)
    parser.add_argument("--pos-interp", default=None,
                        help="how position embeddings are resampled to each image's grid: "
                             "original (each family's own code, the default) or timm; a comma "
                             "list runs both (one pass each: it changes the model)")
    add_ttr_neurons_option(parser)
    parser.add_argument("--no-hard", action="store_true",
                        help="drop VOC objects marked truncated or difficult (and emptied images)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="fp32 is exact (TF32 off); bf16/fp16 autocast the backbone")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--output", type=Path, default=Path("results/runs"),
                        help="where run folders go")
    parser.add_argument("--cache-features", type=Path, nargs="?", const=DEFAULT_CACHE_DIR,
                        default=None, metavar="DIR",
                        help=f"keep per-image features in DIR (default {DEFAULT_CACHE_DIR} when "
                             "given without DIR); reruns with other method settings skip the model")
    parser.add_argument("--cache-dtype", default="auto", choices=CACHE_DTYPES,
                        help="how cached features are stored; auto is exact (the dtype the "
                             "backbone produced: fp32 for fp32 runs); fp16 halves an fp32 "
                             "cache but rounds, so such runs get their own run id")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading a missing dataset")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels, before any forward (images are "
                             "never resized; VOC and COCO images are below 0.4 megapixels)")
    parser.add_argument("--wait", action="store_true",
                        help="when another process is writing a run folder of this command, "
                             "wait for it instead of exiting")
    parser.add_argument("--allow-partial-dataset", action="store_true",
                        help="run even if a VOC07/VOC12/COCO20k split lists another number of "
                             "images than the benchmark's (not comparable; the run id records "
                             "the count); every listed image must still be there")
    add_compute_options(parser, "auto, cpu or cuda[:N] (under torchrun: cuda:LOCAL_RANK per rank)")
    return parser


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """``--method``, the feature options and every method's parameters, from the registries:
    a method's flags appear here when it is registered."""
    parser.add_argument("--method", default=None,
                        help=f"discovery method(s), comma separated (default {DEFAULT_METHOD}); "
                             f"one of {', '.join(METHODS)}")
    parser.add_argument("--features", default=None,
                        help=f"feature kind(s), comma separated: {', '.join(FEATURE_KINDS)} "
                             "(default: the method's, else the backbone's; q/k/v apply to "
                             "methods that read vectors, DINO-seg reads attn)")
    parser.add_argument("--layer", default=None,
                        help="block(s) whose attention gives the features, comma separated, "
                             "negative from the end (default -1: the last); several layers "
                             "share one forward pass")
    parser.add_argument("--normalize", default=None,
                        help="none or l2 (comma list for both): L2-normalise patch features "
                             "before the method (with l2, --gram-bias is in cosine units)")
    for spec in METHODS.values():
        for param in spec.params:
            _add_param(parser, spec.name, param)


def _add_param(parser: argparse.ArgumentParser, method: str, param: Param) -> None:
    if param.switch is not None:
        parser.add_argument(param.cli_flag, dest=f"param_{param.name}", action="store_const",
                            const=param.switch, default=None, help=f"{method}: {param.help}")
        return
    parser.add_argument(param.cli_flag, dest=f"param_{param.name}", default=None,
                        metavar=param.name.upper(),
                        help=f"{method}: {param.help} (default {param.default})")


def _split(text: str | None, flag: str, convert: Callable[[str], Any]) -> list[Any] | None:
    """A comma list, converted, duplicates dropped (order kept); None stays None."""
    if text is None:
        return None
    values: list[Any] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise LostregError(f"{flag} {text!r}: empty item in the comma list")
        try:
            value = convert(part)
        except ValueError as exc:
            detail = str(exc) if isinstance(exc, _Choice) else ""
            raise LostregError(f"{flag} {text!r}: {part!r} is not a valid value{detail}") from None
        if value not in values:
            values.append(value)
    return values


class _Choice(ValueError):
    """A value outside a fixed set; its message lists the choices."""


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise _Choice(f" (expected one of {', '.join(choices)})")
        return text
    return convert


def _param_values(args: argparse.Namespace) -> dict[str, list[Any]]:
    """Every method parameter given on the command line, as a list of values."""
    values: dict[str, list[Any]] = {}
    for spec in METHODS.values():
        for param in spec.params:
            given = getattr(args, f"param_{param.name}")
            if given is None:
                continue
            if param.switch is not None:
                values[param.name] = [given]
            else:
                convert = _one_of([str(c) for c in param.choices]) if param.choices else param.parse
                values[param.name] = _split(given, param.cli_flag, convert) or []
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The base config of a command (the first value of each comma list)."""
    def first(text: str | None, default: str) -> str:
        return (text or default).split(",")[0].strip()

    return RunConfig(
        model=first(args.model, "dinov2_reg4"), dataset=first(args.dataset, "voc07"),
        data_root=args.data_root if args.data_root is not None else default_data_root(),
        weights=args.weights, features=args.features.split(",")[0] if args.features else None,
        # through _split, as the grid reads them: a bad first value is one line, not a traceback
        k_patches=(_split(args.param_k_patches, "--k-patches", int) or [100])[0],
        gram_bias=(_split(args.param_gram_bias, "--gram-bias", float) or [0.0])[0],
        no_hard=args.no_hard,
        device=args.device, batch_size=args.batch_size, limit=args.limit, output=args.output,
        precision=args.precision, download=not args.no_download,
        num_workers=args.num_workers, progress=not args.no_progress,
        cache_features=args.cache_features, cache_dtype=args.cache_dtype,
        allow_partial_dataset=args.allow_partial_dataset,
        method=first(args.method, DEFAULT_METHOD), wait=args.wait, max_pixels=args.max_pixels,
        pos_interp=first(args.pos_interp, "original"), ttr_neurons=args.ttr_neurons,
    )


def _rebuild_leaderboard(output: Path) -> str:
    """Rebuild ``results/`` (leaderboard, comparison tables, figures) from the run folders."""
    from lostreg.reports import leaderboard

    out_dir = Path(output).parent
    leaderboard.build_leaderboard(runs_dir=Path(output), out_dir=out_dir)
    return f"leaderboard rebuilt in {out_dir}"


def _grid_of(args: argparse.Namespace) -> dict[str, Any]:
    """``run_grid``'s keyword arguments for a command line."""
    models = _split(args.model, "--model", str)
    datasets = _split(args.dataset, "--dataset", str)
    grid: dict[str, Any] = dict(
        features=_split(args.features, "--features", _one_of(list(FEATURE_KINDS))),
        k_patches=_split(args.param_k_patches, "--k-patches", int),
        gram_biases=_split(args.param_gram_bias, "--gram-bias", float),
        methods=_split(args.method, "--method", _one_of(list(METHODS))),
        method_values={k: v for k, v in _param_values(args).items()
                       if k not in ("k_patches", "gram_bias")},
        layers=_split(args.layer, "--layer", int),
        normalizations=_split(args.normalize, "--normalize", _one_of(NORMALIZATIONS)),
        pos_interps=_split(args.pos_interp, "--pos-interp", _one_of(POS_INTERP_CHOICES)),
        pairs=None)
    if args.suite is not None:
        if models or datasets:
            raise LostregError(f"--suite {args.suite} chooses the models and datasets; "
                               "drop --model/--dataset")
        if args.suite == "paper":
            grid["pairs"] = paper_suite()
        else:
            if grid["methods"]:
                raise LostregError("--suite methods chooses the methods; drop --method")
            grid["pairs"], grid["methods"], values = methods_suite()
            grid["method_values"] = {**values, **grid["method_values"]}  # flags win
    else:
        grid["models"], grid["datasets"] = models, datasets
    return grid


def _which_flag(exc: BaseException, args: argparse.Namespace) -> str:
    """`` (--output DIR)`` when a filesystem error comes from a folder a flag names that could
    not be made (a file in its place, no permission), so the line says which flag to change;
    an error inside an existing folder names its file, which says enough."""
    if not isinstance(exc, OSError) or exc.filename is None:
        return ""
    path = Path(str(exc.filename)).absolute()
    for flag, folder in (("--output", args.output), ("--cache-features", args.cache_features),
                         ("--data-root", args.data_root)):
        if folder is None or Path(folder).is_dir():
            continue
        folder_path = Path(folder).absolute()
        if path.is_relative_to(folder_path) or folder_path.is_relative_to(path):
            return f" ({flag} {folder})"
    return ""


def _main(argv: Sequence[str] | None = None) -> int:
    timeline.mark("imports done")
    args = build_parser().parse_args(argv)

    def report(result: RunResult) -> None:
        if distributed.current().is_main:
            print(result.summary, flush=True)

    def body() -> None:
        run_grid(config_from_args(args), **_grid_of(args), on_result=report)
        if args.suite is not None and distributed.current().is_main:
            print(_rebuild_leaderboard(Path(args.output)))

    return distributed.command_status(body, hint=lambda exc: _which_flag(exc, args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lostreg.run``: see ``build_parser``; exit status 0, 2 (bad input) or 130."""
    return distributed.leave(_main(argv))


if __name__ == "__main__":
    sys.exit(main())

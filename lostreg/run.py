"""``python -m lostreg.run``: object-discovery CorLoc of backbones on datasets, resumable, at scale.

This module is the command line: flags -> ``RunConfig`` and the grid's axes -> ``lostreg.runs
.grid.run_grid``. Follow one image through the stages, bottom to top:

* ``lostreg.datasets``: the image's record (path, size, ground truth);
* ``lostreg.features``: image file -> padded batch on the device -> feature map (or the cache);
* ``lostreg.methods``: feature maps -> one box (and its patch mask) per image;
* ``lostreg.evaluation``: the box against the ground truth (CorLoc);
* ``lostreg.runs``: the pass serving every run that shares it, each run's folder and files.

At scale (see the README section "Scale"): one command runs a grid (``--model a,b --dataset
voc07,voc12 --features k,v --method lost,tokencut``) or a suite (``--suite paper``); runs that
differ only in what they do with the backbone's output share one pass over the images;
``--cache-features`` keeps features per image; under ``torchrun`` each rank computes every N-th
missing image and rank 0 merges the parts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lostreg import timeline
from lostreg.backbones import POS_INTERP_CHOICES, list_backbones
from lostreg.cli import (
    HelpFormatter,
    ListsParser,
    add_compute_options,
    add_runs_option,
    add_ttr_neurons_option,
)
from lostreg.datasets import DATASETS, default_data_root
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
from lostreg.methods import DEFAULT_METHOD, METHODS, Param
from lostreg.runs import distributed
from lostreg.runs.config import (  # noqa: F401 - PRECISIONS and SMOKE_NOTE re-exported
    NORMALIZATIONS,
    PRECISIONS,
    REFINES,
    SMOKE_NOTE,
    RunConfig,
)
from lostreg.runs.folder import RunResult
from lostreg.runs.grid import (  # noqa: F401 - the Python API of runs, re-exported
    expand_sweep,
    run_benchmark,
    run_grid,
    run_sweep,
)
from lostreg.runs.suites import SUITES, get_suite


def paper_suite() -> list[tuple[str, str]]:
    """The (model, dataset) pairs of ``--suite paper`` (``lostreg.runs.suites.PAPER_SUITE``)."""
    return [(str(m), str(d)) for m, d in get_suite("paper").pairs]

# --- CLI -----------------------------------------------------------------------------------


def _add_safety_options(parser: argparse.ArgumentParser) -> None:
    """What a run refuses by default (huge images, a busy folder, a partial split, non-finite
    features, a version mix) and the flags that allow it."""
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels, before any forward (VOC and COCO "
                             "images are below 0.4 megapixels)")
    parser.add_argument("--wait", action="store_true",
                        help="when another process is writing a run folder of this command, "
                             "wait for it instead of exiting")
    parser.add_argument("--allow-partial-dataset", action="store_true",
                        help="run even if a split lists another number of images than the "
                             "benchmark's (not comparable; the run id records the count); "
                             "every listed image must still be there")
    parser.add_argument("--max-nonfinite", type=int, default=0, metavar="N",
                        help="how many images whose features are not finite (NaN or inf: a "
                             "broken checkpoint, fp16/bf16 overflow) a run may score as "
                             "failures; they get no prediction, and a run with more stops with "
                             "one line naming them")
    parser.add_argument("--allow-version-mix", action="store_true",
                        help="resume a run whose predictions were written by code of another "
                             "result version (lostreg.version.RESULT_VERSION), and record it "
                             "(otherwise refused: the predictions would match neither version)")


def build_parser() -> argparse.ArgumentParser:
    parser = ListsParser(
        prog="python -m lostreg.run",
        description=(
            "Score object discovery (CorLoc; saliency masks on ecssd, duts_te, dut_omron) on "
            "a ViT's attention features. Features are q, k "
            "or v of a block's attention (the LAST block unless --layer; fused qkv, heads "
            "concatenated in head order) for the patch tokens only: the class token and every "
            "register token are removed. Images are not resized; they are zero-padded to a "
            "multiple of the patch size (the saliency sets: resized as TokenCut's saliency "
            "code does). Comma lists (--model a,b --dataset voc07,voc12 "
            "--method lost,tokencut --gram-bias=0,-0.1) run every combination, one run folder "
            "each. Several GPUs: torchrun --nproc_per_node=N -m lostreg.run ..."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="backbone short name(s), comma separated, timm:<name>, or your "
                             "own model: py:package.module:factory or py:path/to/file.py:factory "
                             "(factory() returns an nn.Module or a function (images, patch_size) "
                             "-> (B, N, D) features; see README 'Your own model') "
                             f"(default dinov2_reg4); known: {', '.join(list_backbones())}")
    parser.add_argument("--dataset", default=None,
                        help="dataset(s), comma separated (default voc07); one of "
                             f"{', '.join(DATASETS)}")
    parser.add_argument("--suite", choices=tuple(SUITES), default=None,
                        help="run a named suite instead of --model/--dataset, then rebuild the "
                             "leaderboard: " + "; ".join(f"{name}: {suite.description}"
                                                         for name, suite in SUITES.items()))
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
    parser.add_argument("--refine", default=None,
                        help="saliency datasets (ecssd, duts_te, dut_omron) only: none (the "
                             "default), bilateral (TokenCut's bilateral solver, its soft output "
                             "scored as TokenCut's figures were) or bilateral-binary (the "
                             "corrected variant: the solver's binary mask); a comma list runs "
                             "each, in one pass")
    parser.add_argument("--no-hard", action="store_true",
                        help="drop VOC objects marked truncated or difficult (and emptied images)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                        help="fp32 is exact (TF32 off); bf16/fp16 autocast the backbone")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    add_runs_option(parser, "where run folders go", "--output", dest="output")
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
    _add_safety_options(parser)
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
    parser.add_argument("--layer", "--layers", dest="layer", default=None,
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
        refine=first(args.refine, "none"), max_nonfinite=args.max_nonfinite,
        allow_version_mix=args.allow_version_mix,
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
        refines=_split(args.refine, "--refine", _one_of(REFINES)),
        pairs=None)
    if args.suite is not None:
        if models or datasets:
            raise LostregError(f"--suite {args.suite} chooses the models and datasets; "
                               "drop --model/--dataset")
        suite = get_suite(args.suite)
        grid["pairs"] = [(str(m), str(d)) for m, d in suite.pairs]
        if suite.methods is not None:
            if grid["methods"]:
                raise LostregError(f"--suite {suite.name} chooses the methods; drop --method")
            grid["methods"] = [m for m in suite.methods if m in METHODS]
            grid["method_values"] = {**suite.method_values, **grid["method_values"]}  # flags win
        if suite.refine and not grid["refines"]:  # --refine wins over the suite's
            grid["refine_by_method"] = {m: list(v) for m, v in suite.refine.items()}
    else:
        grid["models"], grid["datasets"] = models, datasets
    return grid


def _spelling(argv: Sequence[str], *names: str) -> str:
    """Which of a flag's spellings the command line used (``--runs`` or its older ``--output``),
    so that a message names the flag the user typed; the first when none was typed."""
    for word in argv:
        for name in names:
            if word == name or word.startswith(name + "="):
                return name
    return names[0]


def _which_flag(exc: BaseException, args: argparse.Namespace) -> str:
    """`` (--runs DIR)`` when a filesystem error comes from a folder a flag names that could
    not be made (a file in its place, no permission), so the line says which flag to change;
    an error inside an existing folder names its file, which says enough."""
    if not isinstance(exc, OSError) or exc.filename is None:
        return ""
    path = Path(str(exc.filename)).absolute()
    for flag, folder in ((args.runs_spelling, args.output),
                         ("--cache-features", args.cache_features),
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
    args.runs_spelling = _spelling(sys.argv[1:] if argv is None else argv, "--runs", "--output")

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

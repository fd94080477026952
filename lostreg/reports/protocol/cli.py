"""``python -m lostreg.protocol``: the command line of a protocol study (see the package doc)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lostreg.backbones import get_backbone_spec, list_backbones
from lostreg.cli import (
    HelpFormatter,
    ListsParser,
    add_compute_options,
    add_model_data_options,
    add_runs_option,
    add_ttr_neurons_option,
)
from lostreg.datasets import DATASETS, default_data_root
from lostreg.errors import LostregError
from lostreg.reports.leaderboard.tables import subset_words
from lostreg.reports.protocol.files import write_study
from lostreg.reports.protocol.grid import (
    DEFAULT_FEATURES,
    DEFAULT_LAYERS,
    L2_BIASES,
    POS_INTERPS,
    ProtocolGrid,
    parse_biases,
    run_passes,
)
from lostreg.reports.protocol.selection import DEFAULT_SPLIT_SEED, DEFAULT_SPLITS
from lostreg.reports.protocol.study import StudyKey, build_study, selection_sources
from lostreg.runs import distributed
from lostreg.runs.config import DEFAULT_MAX_PIXELS, PRECISIONS, RunConfig
from lostreg.runs.folder import RunResult

DEFAULT_OUTPUT = Path("results/protocol")


def _biases_text(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def build_parser() -> argparse.ArgumentParser:
    parser = ListsParser(
        prog="python -m lostreg.protocol",
        description=(
            "Run LOST over a grid of protocols (features x blocks x normalisation and Gram "
            "bias) for one backbone on one dataset, in one pass over the images, and report "
            "which settings give which published figure and what choosing the best setting "
            "on the test images is worth (split-half and cross-dataset selection). Each "
            "setting is an ordinary run folder under --runs."),
        formatter_class=HelpFormatter)
    add_model_data_options(parser, list_backbones(), list(DATASETS))
    parser.add_argument("--features", default=",".join(DEFAULT_FEATURES),
                        help="feature kinds of the grid, comma separated")
    parser.add_argument("--layers", "--layer", dest="layers",
                        default=",".join(str(v) for v in DEFAULT_LAYERS),
                        help="blocks of the grid, comma separated (negative from the end, "
                             "e.g. -1,-2)")
    parser.add_argument("--normalize", default="none,l2", help="normalisations of the grid")
    parser.add_argument("--bias-none", default="0",
                        help="Gram biases without normalisation (the features' own units)")
    parser.add_argument("--bias-l2", default=_biases_text(L2_BIASES),
                        help="Gram biases with l2 (cosine units)")
    parser.add_argument("--k-patches", type=int, default=100, help="LOST's k")
    parser.add_argument("--pos-interp", default="original",
                        help=f"position-embedding interpolation(s): {', '.join(POS_INTERPS)} "
                             "(original: each family's own code); a comma list puts both in the "
                             "grid, one pass each (it changes the model)")
    add_ttr_neurons_option(parser)
    parser.add_argument("--splits", type=int, default=DEFAULT_SPLITS,
                        help="seeded random halves for split-half selection")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED,
                        help="seed of the split-half permutations")
    parser.add_argument("--select-on", default="auto",
                        help="datasets whose protocol of this model to select on (comma list), "
                             "none, or auto: every other dataset with a protocol.csv under "
                             "--output made with the same options")
    parser.add_argument("--published", type=Path, default=None,
                        help="published figures CSV (default: the one shipped in "
                             "lostreg/reports/leaderboard/published_corloc.csv)")
    add_runs_option(parser, "where the grid's run folders go (the leaderboard reads them there)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where the study folder <model>-<dataset>[-...][-smoke] goes")
    parser.add_argument("--no-hard", action="store_true",
                        help="drop VOC objects marked truncated or difficult")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS))
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading a missing dataset")
    parser.add_argument("--allow-partial-dataset", action="store_true",
                        help="run on a split with another number of images than the benchmark's")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels, before any forward (as lostreg.run)")
    parser.add_argument("--wait", action="store_true",
                        help="when another process is writing one of the grid's run folders, "
                             "wait for it instead of exiting")
    add_compute_options(parser)
    return parser


def _items(text: str, flag: str) -> list[str]:
    items = [part.strip() for part in text.split(",")]
    if not all(items):
        raise LostregError(f"{flag} {text!r}: empty item in the comma list")
    return items


def grid_from_args(args: argparse.Namespace) -> ProtocolGrid:
    biases = {"none": parse_biases(args.bias_none, "--bias-none"),
              "l2": parse_biases(args.bias_l2, "--bias-l2")}
    normalizations = _items(args.normalize, "--normalize")
    for name in normalizations:
        if name not in biases:
            raise LostregError(f"--normalize {args.normalize!r}: {name!r} is not none or l2")
    try:
        layers = tuple(int(v) for v in _items(args.layers, "--layers"))
    except ValueError:
        raise LostregError(f"--layers {args.layers!r}: expected whole numbers") from None
    return ProtocolGrid(features=tuple(_items(args.features, "--features")), layers=layers,
                        biases=tuple((n, biases[n]) for n in normalizations),
                        k_patches=args.k_patches,
                        pos_interps=tuple(_items(args.pos_interp, "--pos-interp")))


def base_config(args: argparse.Namespace) -> RunConfig:
    for flag, value in (("--model", args.model), ("--dataset", args.dataset)):
        if "," in value:
            raise LostregError(f"{flag} {value!r}: a protocol study takes one {flag[2:]}; run "
                               "one command per model and dataset")
    if args.dataset not in DATASETS:
        raise LostregError(f"--dataset {args.dataset!r}: expected one of {', '.join(DATASETS)}")
    _check_box_dataset("--dataset", args.dataset)
    get_backbone_spec(args.model, ttr_neurons=args.ttr_neurons)  # fails here, before any work
    return RunConfig(
        model=args.model, dataset=args.dataset,
        data_root=args.data_root if args.data_root is not None else default_data_root(),
        weights=args.weights, no_hard=args.no_hard, device=args.device,
        batch_size=args.batch_size, limit=args.limit, output=args.runs,
        precision=args.precision, download=not args.no_download, num_workers=args.num_workers,
        progress=not args.no_progress, allow_partial_dataset=args.allow_partial_dataset,
        method="lost", k_patches=args.k_patches, max_pixels=args.max_pixels, wait=args.wait,
        ttr_neurons=args.ttr_neurons)


def _check_box_dataset(flag: str, name: str) -> None:
    """A protocol study measures CorLoc, so only datasets scored on boxes take part; a
    saliency set (scored on masks) is refused before any work, rather than mixed into
    CorLoc tables."""
    if DATASETS[name].target != "boxes":
        boxes = ", ".join(n for n, spec in DATASETS.items() if spec.target == "boxes")
        raise LostregError(f"{flag} {name}: a protocol study measures LOST's CorLoc on a box "
                           f"dataset ({boxes}); {name} is scored on {DATASETS[name].target}s "
                           "(saliency): run it with lostreg.run and read it in the "
                           "leaderboard")


def _select_on(text: str) -> list[str] | None:
    if text == "auto":
        return None
    if text == "none":
        return []
    names = _items(text, "--select-on")
    for name in names:
        if name not in DATASETS:
            raise LostregError(f"--select-on {text!r}: {name!r} is not a dataset "
                               f"({', '.join(DATASETS)}, auto or none)")
        _check_box_dataset("--select-on", name)
    return names


def run_study(args: argparse.Namespace) -> str:
    """Run (or resume) the grid, write the study; returns the summary line."""
    grid = grid_from_args(args)
    base = base_config(args)
    spec = get_backbone_spec(args.model, ttr_neurons=args.ttr_neurons)
    key = StudyKey(spec.name, args.dataset, args.limit, args.no_hard, args.precision,
                   smoke=args.weights == "random", grid_tag=grid.tag())
    sources = selection_sources(args.output, key, _select_on(args.select_on))
    if args.splits < 1:
        raise LostregError(f"--splits {args.splits}: must be at least 1")
    statuses: list[str] = []

    def seen(result: RunResult) -> None:
        statuses.append(result.status.split(" ")[0])

    results = run_passes(base, grid, on_result=seen)
    if not distributed.current().is_main:
        return ""
    study = build_study([r.run_dir for r in results], grid, runs_dir=args.runs,
                        select_on=sources, published=args.published,
                        default_feature=spec.default_feature, n_splits=args.splits,
                        split_seed=args.split_seed)
    folder = key.folder(args.output)
    write_study(study, folder)
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    held = study.split.summary()["held_out"]
    best = study.runs.points[study.best.index]
    line = (f"{grid.size()} settings ({counts}); best of grid {study.best.corloc:.2f} "
            f"({best.label()}) chosen on these images, {held.mean:.2f} ± {held.sd:.2f} chosen "
            f"on half and scored on the other half | {folder / 'protocol.md'}")
    partial = subset_words({"dataset": args.dataset,
                            "dataset_images": study.info.identity.get("dataset_images")})
    line += "  [SMOKE RUN: not a result]" if study.smoke else ""
    return line + (f"  [{partial}: not comparable with published figures]" if partial else "")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        line = run_study(args)
        if line:
            print(line, flush=True)

    return distributed.command_status(body)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lostreg.protocol``: exit status 0, 2 (bad input) or 130 (interrupted)."""
    return distributed.leave(_main(argv))

"""``python -m lostreg.analyze <norms|attribution|show>``: why LOST fails where it fails.

* ``norms``: token-norm histogram, automatic outlier threshold, outlier shares per image and
  overall, and the neighbour similarity of outlier vs normal tokens, for one model on a dataset;
* ``attribution``: per image of a run, whether the seed is (next to) an outlier token and
  whether the box covers outliers; CorLoc split by "image has outliers / has none"; with several
  runs on the same images, also which runs (methods) found the object, per image. A mask run
  (saliency) gets the outlier tokens inside its predicted mask and its mean IoU split the same
  way; several mask runs, each run's per-image IoU side by side;
* ``show``: per-image PNG panels (image, boxes, seed, mask, degree map, norm map, CLS and
  register attention) with an ``index.html``; with several runs, their boxes and masks side by
  side. A mask run's panels draw its stored mask, the GT mask and the per-image IoU;
* ``register-neurons``: the MLP neurons that write the high-norm outliers (Jiang et al. 2025),
  written as a neuron list for ``--model M+ttr --ttr-neurons FILE``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lostreg.backbones import list_backbones
from lostreg.cli import (
    HelpFormatter,
    ListOption,
    ListsParser,
    add_compute_options,
    add_model_data_options,
    add_ttr_neurons_option,
)
from lostreg.datasets import DATASETS, default_data_root
from lostreg.errors import LostregError, close_progress_bars, error_line


def _add_norms(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "norms", formatter_class=HelpFormatter,
        help="token-norm distribution, outlier threshold and outlier statistics",
        description=(
            "L2 norms of every patch token at the output of a block (default: the last block, "
            "BEFORE the final norm; class and register tokens excluded). The outlier threshold "
            "is automatic: a 2-component Gaussian mixture on log10 norms, with no threshold "
            "(no outliers) unless the distribution is clearly bimodal. Writes norms.json, "
            "tokens.npz (float16 per-token maps) and histogram PNGs."),
    )
    add_model_data_options(parser, list_backbones(), list(DATASETS))
    add_ttr_neurons_option(parser)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--layers", "--layer", dest="layers", action=ListOption, convert=int,
                        default=None, metavar="LIST",
                        help="block indices whose outputs to measure, comma separated (-1,-2; "
                             "negative counts from the end; default: the last block); top-level "
                             "stats use the deepest")
    parser.add_argument("--threshold", action=ListOption, convert=float, default=None,
                        metavar="LIST",
                        help="manual outlier threshold on the norm (one for all layers, or a "
                             "comma list with one per --layers entry) instead of the automatic "
                             "split")
    parser.add_argument("--output", type=Path, default=None,
                        help="output folder (default: results/analysis/<model>-<dataset>/, "
                             "prefixed smoke- for random weights)")
    parser.add_argument("--no-hard", action="store_true",
                        help="drop VOC objects marked truncated or difficult")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading a missing dataset")
    add_compute_options(parser)


def _add_attribution(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "attribution", formatter_class=HelpFormatter,
        help="join a LOST run with outlier maps: is the seed on an artifact?",
        description=(
            "Per image of a run: is the seed an outlier token or next to one (4-neighbourhood), "
            "does the box cover outliers; CorLoc split by 'image has outliers / has none'. For a "
            "mask run (ecssd, duts_te, dut_omron): how many outlier tokens lie inside its stored "
            "mask, and its mean IoU (TokenCut's per-image IoU, sal_iou; 0/0 images left out "
            "and counted) split the same way. Writes attribution.csv, attribution_summary.csv, "
            "attribution.md and attribution.json under <run>/analysis/. Without --norms the "
            "token maps of the run's images are computed with the run's model (on the images "
            "as the run fed them) into <run>/analysis/norms/."),
    )
    parser.add_argument("--run", type=Path, nargs="+", required=True,
                        help="run folder(s) of lostreg.run")
    parser.add_argument("--norms", type=Path, nargs="+", default=None,
                        help="norms.json of the same model and data (one per --run)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="override the outlier threshold of the norms analysis")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset root if it moved since the run")
    parser.add_argument("--weights", default=None,
                        help="checkpoint PATH if the run's weights moved (must match the "
                             "sha256 in the run's config.json)")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute <run>/analysis/norms even if it exists")
    parser.add_argument("--output", type=Path, default=None,
                        help="with several runs: folder of the per-image table of which runs "
                             "found the object (default: results/analysis/compare-<dataset>-"
                             "<hash>/)")
    parser.add_argument("--hits-only", action="store_true",
                        help="with several runs: only that table (hits.csv; for mask runs, "
                             "ious.csv: each run's IoU per image); reads predictions only, no "
                             "model, no norms")
    add_compute_options(parser)


def _add_show(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "show", formatter_class=HelpFormatter,
        help="per-image panels (boxes, seed, degree, norm and attention maps) + index.html",
        description=(
            "Rebuilds the run's model from its config.json and, per image, recomputes the "
            "run's method (box, seed, patch mask; LOST's degree map), the last block's token "
            "norms and the attention of the class token and each register to the patches "
            "(softmax over patch keys, mean over heads). With several --run (e.g. LOST, "
            "TokenCut and DINO-seg on one backbone), draws each run's box and patch mask side "
            "by side per image instead. A mask run (saliency) draws its stored mask "
            "(pred_mask_rle) over the image with the GT mask's outline and its per-image IoU "
            "(sal_iou), then the same maps on the resized image's grid; several mask runs are "
            "drawn side by side from their stored masks, with no model."),
    )
    parser.add_argument("--run", type=Path, nargs="+", action="extend", required=True,
                        help="run folder of lostreg.run; several (--run A B C or --run A "
                             "--run B) compare their boxes and masks on the same images")
    parser.add_argument("--images", action=ListOption, default=None, metavar="ID",
                        help="image ids to show, comma separated (default: the first "
                             "--max-images)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="how many images (default: 12, or all --images given)")
    parser.add_argument("--misses", action="store_true",
                        help="without --images: show only images the run missed (several "
                             "runs: that at least one run missed); box runs only")
    parser.add_argument("--norms", type=Path, default=None,
                        help="norms.json for marking outliers (default: <run>/analysis/norms)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="outlier threshold for the norm maps")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset root if it moved since the run")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--weights", default=None,
                        help="checkpoint PATH if the run's weights moved (must match the "
                             "sha256 in the run's config.json)")
    parser.add_argument("--output", type=Path, default=None,
                        help="output folder (default: <run>/analysis/show/; several runs: "
                             "results/analysis/compare-<dataset>-<hash>/show/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_register_neurons(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "register-neurons", formatter_class=HelpFormatter,
        help="find the MLP neurons that write the outlier tokens (for test-time registers)",
        description=(
            "Jiang et al. (2025): outlier tokens are those whose norm at the output of "
            "--outlier-layer is above the threshold (default: the norm analysis' automatic "
            "split); each MLP neuron is scored by its mean absolute activation on them, "
            "averaged over images with outliers; the --top-k best in layers <= "
            "--highest-layer are written to --output, for --model M+ttr --ttr-neurons FILE. "
            "Their DINOv2 ViT-L/14 settings: --outlier-layer -2 --threshold 150 "
            "--highest-layer 17 (45 neurons published)."),
    )
    add_model_data_options(parser, list_backbones(), list(DATASETS),
                           model_help="backbone short name or timm:<name> (without +ttr)")
    parser.add_argument("--output", type=Path, required=True, help="neuron list to write (.json)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--outlier-layer", type=int, default=-2,
                        help="block whose output norms mark the outliers (negative counts from "
                             "the end)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="outlier norm threshold (default: automatic split of the patch "
                             "norms at --outlier-layer)")
    parser.add_argument("--top-k", type=int, default=45, help="neurons to keep")
    parser.add_argument("--highest-layer", type=int, default=None,
                        help="keep neurons of blocks <= this index (default: every block)")
    parser.add_argument("--outlier-tokens", choices=("all", "patches"), default="all",
                        help="which tokens can be outliers: all (as the reference code, class "
                             "and registers included) or patches only")
    parser.add_argument("--no-hard", action="store_true",
                        help="drop VOC objects marked truncated or difficult")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading a missing dataset")
    add_compute_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = ListsParser(
        prog="python -m lostreg.analyze",
        description="Artifact diagnostics: token norms, outliers, and where LOST fails.",
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{norms,attribution,show,register-neurons}")
    _add_norms(sub)
    _add_attribution(sub)
    _add_show(sub)
    _add_register_neurons(sub)
    return parser


def _norms(args: argparse.Namespace) -> int:
    from lostreg.reports.analysis.collect import NormsConfig, analyze_norms

    config = NormsConfig(
        model=args.model, dataset=args.dataset,
        data_root=args.data_root if args.data_root is not None else default_data_root(),
        weights=args.weights, device=args.device, limit=args.limit, layers=args.layers,
        threshold=args.threshold, output=args.output, batch_size=args.batch_size,
        num_workers=args.num_workers, no_hard=args.no_hard, download=not args.no_download,
        progress=not args.no_progress, ttr_neurons=args.ttr_neurons,
    )
    print(analyze_norms(config).summary)
    return 0


def _attribution(args: argparse.Namespace) -> int:
    from lostreg.reports.analysis.attribution import attribute_runs
    from lostreg.reports.analysis.mask_attribution import attribute_mask_runs

    masks = _mask_runs(args.run)
    attribute = attribute_mask_runs if masks else attribute_runs
    results, table = attribute(
        args.run, args.norms, args.threshold, args.device, args.data_root, args.batch_size,
        args.num_workers, not args.no_progress, args.recompute, args.weights, args.output,
        args.hits_only)
    for result in results:
        print(result.markdown)
        print(f"tables written to {result.output_dir}")
    if table is not None:
        print(table.markdown)
        name = "ious.csv" if masks else "hits.csv"
        print(f"per-image table written to {table.output_dir / name}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from lostreg.reports.analysis.compare import show_compare
    from lostreg.reports.analysis.report import show_run

    runs = list(dict.fromkeys(path.resolve() for path in args.run))
    if len(runs) > 1:
        for flag, value in (("--norms", args.norms), ("--threshold", args.threshold)):
            if value is not None:
                raise LostregError(f"{flag} is for the panels of one run; several --run "
                                   "compare boxes and masks only")
    if _mask_runs(runs, args.misses):
        return _show_masks(args, runs)
    if len(runs) > 1:
        index = show_compare(runs, args.images, args.max_images, args.misses, args.device,
                             args.data_root, args.output, args.weights, not args.no_progress)
    else:
        index = show_run(runs[0], args.images, args.max_images, args.misses, args.device,
                         args.data_root, args.norms, args.threshold, args.output, args.weights,
                         not args.no_progress)
    print(f"panels written; open {index}")
    return 0


def _mask_runs(runs: Sequence[Path], misses: bool = False) -> bool:
    """Whether the first run is a mask run (saliency; the others must be too, which the
    loaders check); ``--misses`` (CorLoc's misses) has no meaning for one."""
    from lostreg.reports.analysis.runs import run_kind

    if not runs or run_kind(runs[0]) != "mask":
        return False
    if misses:
        raise LostregError(f"--misses: {runs[0]} is a mask run (saliency), scored by IoU, with "
                           "no hit or miss; choose images with --images")
    return True


def _show_masks(args: argparse.Namespace, runs: list[Path]) -> int:
    from lostreg.reports.analysis.mask_report import show_mask_compare, show_mask_run

    if len(runs) > 1:
        if args.weights is not None:
            raise LostregError("--weights: several mask runs are drawn from their stored masks, "
                               "with no model")
        index = show_mask_compare(runs, args.images, args.max_images, args.data_root,
                                  args.output, not args.no_progress)
    else:
        index = show_mask_run(runs[0], args.images, args.max_images, args.device,
                              args.data_root, args.norms, args.threshold, args.output,
                              args.weights, not args.no_progress)
    print(f"panels written; open {index}")
    return 0


def _register_neurons(args: argparse.Namespace) -> int:
    from lostreg.reports.analysis.neurons import NeuronSearchConfig, find_register_neurons

    if args.limit is not None and args.limit < 1:
        raise LostregError("--limit must be at least 1")
    if args.batch_size < 1:
        raise LostregError("--batch-size must be at least 1")
    config = NeuronSearchConfig(
        model=args.model, output=args.output, dataset=args.dataset,
        data_root=args.data_root if args.data_root is not None else default_data_root(),
        weights=args.weights, device=args.device, limit=args.limit,
        outlier_layer=args.outlier_layer, threshold=args.threshold, top_k=args.top_k,
        highest_layer=args.highest_layer, outlier_tokens=args.outlier_tokens,
        batch_size=args.batch_size, num_workers=args.num_workers, no_hard=args.no_hard,
        download=not args.no_download, progress=not args.no_progress,
    )
    print(find_register_neurons(config)[1])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"norms": _norms, "attribution": _attribution, "show": _show,
               "register-neurons": _register_neurons}[args.command]
    try:
        return handler(args)
    except (LostregError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

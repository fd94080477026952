"""``python -m lostreg.verify lost-voc07``: is our LOST the official LOST, box for box?

The LOST authors published their predicted boxes for VOC07 trainval (DINO ViT-S/16, keys,
k=100). This command runs the same configuration through our pipeline and compares image by
image: the share of identical boxes, the mean IoU between our box and theirs, the images that
differ (``differences.csv``) and both CorLocs against the same ground truth. Agreement at the
box level is a much stronger check than matching a single CorLoc number.

The official file is a pickle. Unpickling runs code named inside the file, so it is read only
after its sha256 matches, and even then through an unpickler that admits just the numpy
globals an integer array needs: anything else is refused before it is called.
"""

from __future__ import annotations

import argparse
import csv
import io
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from lostreg.cli import HelpFormatter, add_compute_options, add_runs_option
from lostreg.errors import LostregError, close_progress_bars, error_line
from lostreg.evaluation.corloc import corloc, is_hit
from lostreg.evaluation.iou import best_iou, box_iou
from lostreg.io import atomic_write_json, atomic_write_text, sha256_file
from lostreg.runs.store import read_lines


@dataclass(frozen=True)
class Benchmark:
    """One set of official predictions and the run that should reproduce it."""

    name: str
    dataset: str
    model: str
    feature: str
    k_patches: int
    url: str
    file_name: str
    sha256: str
    n_entries: int
    published_corloc: float


BENCHMARKS: dict[str, Benchmark] = {
    "lost-voc07": Benchmark(
        name="lost-voc07",
        dataset="voc07",
        model="dino_vits16",
        feature="k",
        k_patches=100,
        url=("https://raw.githubusercontent.com/valeoai/LOST/master/"
             "data/LOST_predictions/LOST_VOC07.pkl"),
        file_name="LOST_VOC07.pkl",
        sha256="7091e27b0c47b54c0437dbf948cb23cda71095861d63be09267019fa68719d70",
        n_entries=5011,
        published_corloc=61.9,
    ),
}

#: Goal on real data: this share of identical boxes, and the published CorLoc to 0.1.
IDENTICAL_GOAL = 0.99
SMOKE_NOTE = "SMOKE (weights: random): checks the plumbing only, the numbers mean nothing"


# --- reading the official pickle -----------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals an official predictions pickle may name, under both numpy spellings.

    A numpy array pickles as ``_reconstruct(ndarray, ...)`` plus a ``dtype``; a numpy scalar as
    ``scalar(dtype, bytes)``. numpy 2 renamed ``numpy.core`` to ``numpy._core``; files written
    by either major version name the same two functions, so both spellings map to them.
    """
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                           ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # protocol-2 pickles carry numpy's raw bytes as latin-1 text: allow that one codec only
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding.replace("-", "").lower() != "latin1":
        raise LostregError(f"refusing to unpickle _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolve only allow-listed globals; everything else raises before it can be called."""

    def __init__(self, handle: io.BufferedIOBase, path: Path) -> None:
        super().__init__(handle)
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise LostregError(
                f"{self._path}: refusing to unpickle forbidden global {module}.{name} (only "
                "numpy arrays of box coordinates are allowed; is this the official file?)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise LostregError(f"{self._path}: refusing to unpickle a persistent id ({pid!r})")


def check_sha256(path: Path, expected: str, downloaded: bool = False) -> str:
    """Return the file's sha256; raise unless it equals ``expected`` (checked before reading)."""
    if not path.is_file():
        raise LostregError(f"{path}: predictions file not found")
    actual = sha256_file(path)
    if actual != expected.lower():
        hint = ("delete it to download again" if downloaded else
                "not the official file; --expected-sha256 accepts another one on purpose")
        raise LostregError(f"{path}: sha256 {actual} does not match the expected "
                           f"{expected.lower()}; not reading it ({hint})")
    return actual


def _box_of(key: str, value: Any, path: Path) -> list[int]:
    """One ``[x1, y1, x2, y2]`` of whole numbers, from an int array (or integral floats)."""
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - any failure means the entry is not a box
        array = np.asarray(None)
    if array.shape != (4,) or array.dtype.kind not in "iuf":
        raise LostregError(
            f"{path}: entry {key!r} is not a box of 4 numbers (got {type(value).__name__} "
            f"{getattr(array, 'dtype', '?')} {getattr(array, 'shape', '?')})"
        )
    if array.dtype.kind == "f" and not (np.isfinite(array).all()
                                        and np.array_equal(array, np.round(array))):
        raise LostregError(f"{path}: entry {key!r} has non-integer coordinates {array.tolist()}")
    return [int(v) for v in array.tolist()]


def image_id_of(key: str) -> str:
    """``000005.jpg`` (or ``JPEGImages/000005.jpg``) -> ``000005``, our image id."""
    return PurePosixPath(key.replace("\\", "/")).stem


def load_official_predictions(path: Path) -> dict[str, list[int]]:
    """Read an official LOST predictions pickle into ``{image_id: [x1, y1, x2, y2]}``.

    Never ``pickle.load``: see ``_RestrictedUnpickler``. Check the sha256 first.
    """
    try:
        with open(path, "rb") as handle:
            data = _RestrictedUnpickler(handle, path).load()
    except LostregError:
        raise
    except OSError as exc:
        raise LostregError(f"{path}: cannot read predictions file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle raises many kinds of errors
        raise LostregError(f"{path}: not a readable predictions pickle "
                           f"({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise LostregError(f"{path}: expected a dict from image file name to box, "
                           f"got {type(data).__name__}")
    boxes: dict[str, list[int]] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise LostregError(f"{path}: key {key!r} is not an image file name")
        image_id = image_id_of(key)
        if image_id in boxes:
            raise LostregError(f"{path}: two entries for image {image_id!r}")
        boxes[image_id] = _box_of(key, value, path)
    return boxes


def fetch_predictions(benchmark: Benchmark, folder: Path, progress: bool = True) -> Path:
    """Download the official predictions into ``folder`` (kept there for the next call)."""
    dest = folder / benchmark.file_name
    if dest.is_file():
        return dest
    try:
        from lostreg.datasets.download import download_file
    except ImportError:  # pragma: no cover - the datasets package always ships it
        return _urllib_download(benchmark.url, dest)
    try:
        return Path(download_file(benchmark.url, dest, sha256=benchmark.sha256,
                                  progress=progress))
    except LostregError as exc:
        raise LostregError(f"{exc}; offline? fetch it elsewhere and pass --predictions PATH"
                           ) from None


def _urllib_download(url: str, dest: Path) -> Path:  # pragma: no cover - fallback only
    import urllib.error
    import urllib.request

    from lostreg.io import atomic_write_bytes

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise LostregError(f"{url}: download failed ({getattr(exc, 'reason', exc)}); "
                           "offline? pass a local copy with --predictions PATH") from None
    atomic_write_bytes(dest, data)
    return dest


# --- comparing -----------------------------------------------------------------------------


@dataclass
class Comparison:
    """Image-by-image agreement between our predictions and the official ones."""

    n_compared: int
    n_identical: int
    mean_iou: float
    corloc_ours: tuple[float, int, int]
    corloc_official: tuple[float, int, int]
    rows: list[dict]  # one per image that differs or is missing from the official file
    missing_in_official: list[str]
    missing_in_ours: list[str]

    @property
    def identical_share(self) -> float:
        return self.n_identical / self.n_compared if self.n_compared else float("nan")


def compare(ours: Sequence[dict], official: dict[str, list[int]], full_set: bool) -> Comparison:
    """Compare our ``predictions.jsonl`` lines with the official boxes on our images.

    Identical boxes count as IoU 1 (even a degenerate one); CorLoc of both is computed with our
    ground truth on the same images, so only the boxes differ. ``full_set``: whether our run
    covered the whole split, so official images we lack are worth reporting. An image whose
    features were not finite has no box in our line (a run finished with ``--max-nonfinite``
    above 0): it is a miss, IoU 0 against the official box, and a row of its own.
    """
    ious: list[float] = []
    ours_hits: list[bool] = []
    their_hits: list[bool] = []
    rows: list[dict] = []
    missing: list[str] = []
    n_identical = 0
    for line in ours:
        image_id = str(line["image_id"])
        box = None if line["box"] is None else [int(v) for v in line["box"]]
        theirs = official.get(image_id)
        if theirs is None:
            missing.append(image_id)
            rows.append(_row(line, box, None, None, None))
            continue
        gts = np.asarray(line["gt_boxes"], dtype=np.float64).reshape(-1, 4)
        their_best = best_iou(theirs, gts)
        identical = box == theirs
        n_identical += identical
        iou = 1.0 if identical else 0.0 if box is None else float(box_iou(box, [theirs])[0])
        ious.append(iou)
        ours_hits.append(bool(line["hit"]))
        their_hits.append(is_hit(their_best))
        if not identical:
            rows.append(_row(line, box, theirs, iou, their_best))
    ours_ids = {str(line["image_id"]) for line in ours}
    extra = sorted(k for k in official if k not in ours_ids) if full_set else []
    return Comparison(
        n_compared=len(ious),
        n_identical=n_identical,
        mean_iou=float(np.mean(ious)) if ious else float("nan"),
        corloc_ours=corloc(ours_hits),
        corloc_official=corloc(their_hits),
        rows=rows,
        missing_in_official=missing,
        missing_in_ours=extra,
    )


def _row(line: dict, box: list[int] | None, theirs: list[int] | None, iou: float | None,
         their_best: float | None) -> dict:
    status = ("missing_in_official" if theirs is None
              else "no_box_nonfinite_features" if box is None else "different")
    return {
        "image_id": line["image_id"],
        "status": status,
        "our_box": box,
        "official_box": theirs,
        "iou": iou,
        "our_best_iou_gt": float(line["best_iou"]),
        "official_best_iou_gt": their_best,
        "our_hit": bool(line["hit"]),
        "official_hit": None if their_best is None else is_hit(their_best),
    }


CSV_COLUMNS = ("image_id", "status", "our_x1", "our_y1", "our_x2", "our_y2", "official_x1",
               "official_y1", "official_x2", "official_y2", "iou", "our_best_iou_gt",
               "official_best_iou_gt", "our_hit", "official_hit")


def differences_csv(rows: Sequence[dict]) -> str:
    """The differing images as CSV text (empty cells where a side has no box)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        ours = row["our_box"] or ["", "", "", ""]
        theirs = row["official_box"] or ["", "", "", ""]
        writer.writerow([
            row["image_id"], row["status"], *ours, *theirs,
            _fmt(row["iou"]), _fmt(row["our_best_iou_gt"]), _fmt(row["official_best_iou_gt"]),
            row["our_hit"], "" if row["official_hit"] is None else row["official_hit"],
        ])
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


# --- the command ---------------------------------------------------------------------------


def verify(args: argparse.Namespace) -> tuple[dict, str]:
    """Fetch and check the official file, run (or resume) ours, compare; return report, text."""
    from lostreg.datasets import default_data_root
    from lostreg.runs.config import RunConfig
    from lostreg.runs.grid import run_benchmark

    benchmark = BENCHMARKS[args.benchmark]
    output = Path(args.output) if args.output else Path("results/verify") / benchmark.name
    if args.limit is not None and args.limit < 1:
        raise LostregError("--limit must be at least 1")
    expected_sha = args.expected_sha256 or benchmark.sha256
    if args.predictions is not None:
        predictions_path = Path(args.predictions).expanduser()
    else:
        predictions_path = fetch_predictions(benchmark, output, progress=not args.no_progress)
    # before a single byte is unpickled
    sha = check_sha256(predictions_path, expected_sha, downloaded=args.predictions is None)
    official = load_official_predictions(predictions_path)

    config = RunConfig(
        model=args.model, dataset=benchmark.dataset,
        data_root=args.data_root if args.data_root is not None else default_data_root(),
        weights=args.weights, features=benchmark.feature, k_patches=benchmark.k_patches,
        device=args.device, batch_size=args.batch_size, limit=args.limit,
        output=args.runs_dir, precision="fp32", download=not args.no_download,
        num_workers=args.num_workers, progress=not args.no_progress,
        allow_partial_dataset=args.allow_partial_dataset,
    )
    result = run_benchmark(config)  # resumes (or just re-reads) a run with the same identity
    ours = read_lines(result.run_dir)
    comparison = compare(ours, official, full_set=args.limit is None)

    official_setup = (args.model == benchmark.model and expected_sha == benchmark.sha256
                      and args.limit is None and not result.smoke)
    ours_score, ours_hits, n = comparison.corloc_ours
    their_score, their_hits, _ = comparison.corloc_official
    goal_met = (comparison.identical_share >= IDENTICAL_GOAL
                and round(ours_score, 1) == benchmark.published_corloc
                and not comparison.missing_in_official and not comparison.missing_in_ours
                ) if official_setup else None
    report = {
        "benchmark": benchmark.name,
        "official_predictions": {
            "path": str(predictions_path), "url": benchmark.url, "sha256": sha,
            "expected_sha256": expected_sha.lower(), "is_official_file": sha == benchmark.sha256,
            "n_entries": len(official), "expected_entries": benchmark.n_entries,
        },
        "run_id": result.run_id,
        "run_dir": str(result.run_dir),
        "model": args.model,
        "feature": benchmark.feature,
        "k_patches": benchmark.k_patches,
        "weights": args.weights,
        "smoke_run": result.smoke,
        "limit": args.limit,
        "n_ours": len(ours),
        "n_compared": comparison.n_compared,
        "n_identical": comparison.n_identical,
        "identical_share": comparison.identical_share,
        "mean_iou": comparison.mean_iou,
        "n_different": comparison.n_compared - comparison.n_identical,
        "missing_in_official": comparison.missing_in_official,
        "missing_in_ours": comparison.missing_in_ours,
        "corloc": {
            "ours": ours_score, "ours_hits": ours_hits,
            "official_predictions": their_score, "official_hits": their_hits,
            "n_images": n, "published": benchmark.published_corloc,
        },
        "goal": {"identical_share_min": IDENTICAL_GOAL, "corloc": benchmark.published_corloc,
                 "met": goal_met},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if result.smoke:
        report["note"] = SMOKE_NOTE
    atomic_write_text(output / "differences.csv", differences_csv(comparison.rows))
    atomic_write_json(output / "report.json", report, undefined_as_null=True)
    return report, summary_text(report, output)


def summary_text(report: dict, output: Path) -> str:
    cl = report["corloc"]
    lines = [
        f"{report['benchmark']}: {report['n_identical']}/{report['n_compared']} identical boxes "
        f"({100 * report['identical_share']:.2f}%), mean IoU {report['mean_iou']:.4f} "
        f"with the official LOST predictions",
        f"CorLoc ours {cl['ours']:.2f} ({cl['ours_hits']}/{cl['n_images']}), official "
        f"predictions {cl['official_predictions']:.2f} ({cl['official_hits']}/{cl['n_images']}), "
        f"published {cl['published']}",
    ]
    if report["missing_in_official"] or report["missing_in_ours"]:
        lines.append(f"images missing from the official file: {len(report['missing_in_official'])}"
                     f", official images not in our run: {len(report['missing_in_ours'])}")
    met = report["goal"]["met"]
    if met is not None:
        lines.append(f"goal (>= {100 * IDENTICAL_GOAL:.0f}% identical, CorLoc "
                     f"{report['goal']['corloc']}): {'MET' if met else 'NOT MET'}")
    lines.append(f"report: {output / 'report.json'}; differences: {output / 'differences.csv'}")
    if report["smoke_run"]:
        lines.append(SMOKE_NOTE)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lostreg.verify",
        description=(
            "Compare our LOST with the official LOST predictions, image by image: share of "
            "identical boxes, mean IoU, the differing images (differences.csv) and both CorLocs. "
            "Exit status 0 when done (1 when a full run with the official file and pretrained "
            "weights misses the goal), 2 on bad input."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("benchmark", choices=tuple(BENCHMARKS), help="which official predictions")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset root (default: $LOSTREG_DATA or datasets/)")
    parser.add_argument("--weights", default="hub", help="hub, a checkpoint PATH, or random "
                        "(smoke check of the plumbing)")
    parser.add_argument("--model", default=None,
                        help="backbone (default: the benchmark's, dino_vits16 for lost-voc07)")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="local copy of the official pickle instead of downloading it")
    parser.add_argument("--expected-sha256", default=None,
                        help="accept a predictions file with this sha256 instead of the official "
                             "one (for generated test files)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where report.json and differences.csv go "
                             "(default: results/verify/<benchmark>/)")
    add_runs_option(parser, "where run folders go (a finished run with the same identity is "
                            "reused)", "--runs-dir", dest="runs_dir")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading a missing dataset")
    parser.add_argument("--allow-partial-dataset", action="store_true",
                        help="run even if the VOC07 split lists another number of images than "
                             "5011 (then the goal cannot be met)")
    add_compute_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None:
        args.model = BENCHMARKS[args.benchmark].model
    try:
        report, text = verify(args)
    except (LostregError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted: the run's predictions are kept; rerun to resume", file=sys.stderr)
        return 130
    print(text)
    return 1 if report["goal"]["met"] is False else 0


if __name__ == "__main__":
    sys.exit(main())

"""``predictions.jsonl``: each image's line written, and read back validated and rescored.

``predictions.jsonl`` (and the per-rank parts ``predictions.rank{r}.jsonl`` a torchrun run
leaves until it merges) is the run's only result; ``metrics.json`` is derived from it. So what
is read back is trusted no further than it can be checked:

* every line must parse and follow its run's ``LineFormat`` (keys and types: the image, the
  prediction, the ground truth, each metric's scores) with a box inside its image;
  a line that does not is *bad*: it is moved to ``quarantine.jsonl`` beside the file (appended
  durably, with the reason) and only that image is recomputed;
* every line must be an image of this run, with the run's file name and ground truth; one that
  is not is a line from another run, an error naming ``file:line`` (nothing is changed);
* every metric's scores (CorLoc's ``hit`` and ``best_iou``) are recomputed from the prediction
  and the dataset's GT, never taken from the file (a line whose values disagree is corrected,
  and reported);
* an identical duplicate (the same line twice, e.g. in the merged file and a part left by a
  kill during the merge) is dropped; two different lines for one image are an error naming
  both.

A torn last line (a kill mid-append) was never durable: it is left out, as before.

Only one process per run may repair (``repair=True``): the one holding the run's lock
(``lostreg.runs.lock``), i.e. rank 0 under torchrun. Other ranks read with ``repair=False`` and
get the same answer whether or not rank 0 has repaired yet, because a quarantined line and a
bad line both mean "not done".
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from lostreg.datasets.base import ImageRecord
from lostreg.errors import LostregError
from lostreg.evaluation.corloc import CORLOC
from lostreg.evaluation.registry import MetricSpec
from lostreg.evaluation.rle import foreground, rle_problem
from lostreg.evaluation.targets import BoxesTarget, LineField
from lostreg.fields import is_int
from lostreg.io import JsonlAppender, atomic_write_text, loads_bounded, read_jsonl

PREDICTIONS = "predictions.jsonl"
PART_PATTERN = "predictions.rank*.jsonl"
QUARANTINE = "quarantine.jsonl"


# --- the line format -----------------------------------------------------------------------


def _ints(n: int, minimum: int | None = None) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return (isinstance(value, list) and len(value) == n and all(map(is_int, value))
                and (minimum is None or all(v >= minimum for v in value)))
    return check


# the keys every line has, whatever its target and metrics: the image and the prediction
BASE_SCHEMA: dict[str, LineField] = {
    "image_id": LineField(lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "file": LineField(lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "width": LineField(lambda v: is_int(v) and v > 0, "a positive integer"),
    "height": LineField(lambda v: is_int(v) and v > 0, "a positive integer"),
    "box": LineField(lambda v: v is None or _ints(4)(v),
                     "4 integers [x1, y1, x2, y2] (null only in a nonfinite line)"),
    "seed": LineField(lambda v: v is None or _ints(2, minimum=0)(v),
                      "null or [row, col], two integers >= 0"),
}
SMOKE_FIELD = {"weights": LineField(lambda v: v == "random", '"random" (smoke runs only)',
                                    required=False)}
# an image whose features were not all finite (NaN or inf: a broken checkpoint, or fp16/bf16
# overflow) gets no prediction: its line holds ``"nonfinite": true`` and ``"box": null``, and
# every metric scores it as a failure (CorLoc: a miss; a mask metric: an empty mask). A run with
# more such images than ``--max-nonfinite`` does not finish (``lostreg.runs.folder.finalize``)
NONFINITE = {"nonfinite": True}
NONFINITE_FIELD = {"nonfinite": LineField(lambda v: v is True,
                                          "true (an image with non-finite features)",
                                          required=False)}
# what a line holds of each prediction a metric reads (``MetricSpec.reads``) beyond the box
# every line has: a mask metric's binary mask at the image's size, as compressed RLE
# (``lostreg.evaluation.rle``; for a soft prediction, its ``> 0.5`` binarisation)
READ_FIELDS: dict[str, dict[str, LineField]] = {
    "box": {},
    "mask": {"pred_mask_rle": LineField(lambda v: rle_problem(v) is None,
                                        'a compressed RLE {"size": [height, width], "counts": '
                                        '"..."}')},
}


def record_file(record: ImageRecord, root: Path) -> str:
    """The ``file`` a line of ``record`` holds: its path under the dataset root (or as given)."""
    try:
        file = str(record.path.relative_to(root))
    except ValueError:
        file = str(record.path)
    return record.extra.get("file", file)


@dataclass(frozen=True)
class LineFormat:
    """What every line of one run holds: the image and the prediction (``BASE_SCHEMA``), the
    image's ground truth as its target kind writes it, then each metric's per-image scores.
    The writer (``line``), the validator (``problem``) and the rescoring (``rescore``) live
    side by side so they cannot drift apart.

    ``box_slack``: how far a box may reach into the zero padding right and below (a patch less
    one pixel, for methods whose published box is not clipped to the image: DINO-seg's
    reference variant).
    """

    target: type = BoxesTarget
    metrics: tuple[MetricSpec, ...] = (CORLOC,)
    box_slack: int = 0

    @property
    def schema(self) -> dict[str, LineField]:
        """One entry per key of a line; a key not listed here makes a line bad."""
        fields = {**BASE_SCHEMA, **self.target.LINE_SCHEMA}
        for metric in self.metrics:
            for kind in metric.reads:
                fields.update(READ_FIELDS[kind])
            fields.update(metric.fields)
        return {**fields, **SMOKE_FIELD, **NONFINITE_FIELD}

    def scores(self, line: Mapping[str, Any], target: Any) -> dict[str, Any]:
        """Every metric's per-image scores of ``line``'s prediction against ``target``."""
        scores: dict[str, Any] = {}
        for metric in self.metrics:
            scores.update(metric.score(line, target))
        return scores

    def line(self, record: ImageRecord, box: Sequence[int] | None, seed_rc: Sequence[int] | None,
             root: Path, smoke: bool, prediction: Mapping[str, Any] | None = None) -> dict:
        """The predictions line of one image (``record`` holds the size the image really
        has). ``prediction``: what the line holds of a prediction beyond its box, which the
        metrics read (a mask run's ``pred_mask_rle`` and ``sal_counts``)."""
        target = record.target
        line = {
            "image_id": record.image_id,
            "file": record_file(record, root),
            "width": record.width,
            "height": record.height,
            "box": None if box is None else [int(v) for v in box],
            "seed": None if seed_rc is None else [int(v) for v in seed_rc],
            **target.line_fields(),
            **(prediction or {}),
        }
        line.update(self.scores(line, target))
        if smoke:
            line["weights"] = "random"
        return line

    def problem(self, line: Any) -> str | None:
        """Why ``line`` (parsed JSON) is not a line of this format, or None: keys, types, and
        a box inside its image (``0 <= x1 <= x2 <= width``, the same for y)."""
        if not isinstance(line, dict):
            return f"expected a JSON object, got {type(line).__name__}"
        schema = self.schema
        missing = [k for k, f in schema.items() if f.required and k not in line]
        if missing:
            return f"missing {', '.join(missing)}"
        unknown = sorted(k for k in line if k not in schema)
        if unknown:
            return f"unknown key {', '.join(unknown)}"
        for key, value in line.items():
            if not schema[key].check(value):
                return f"{key}: expected {schema[key].expected}, got {json.dumps(value)[:60]}"
        if (line["box"] is None) != (line.get("nonfinite") is True):
            return ("a nonfinite line has no box" if line["box"] is not None
                    else "box: null is only for an image with non-finite features (nonfinite)")
        if line["box"] is None:
            problem = _nonfinite_problem(line)
            if problem:
                return problem
        else:
            x1, y1, x2, y2 = line["box"]
            slack = self.box_slack
            if not (0 <= x1 <= x2 <= line["width"] + slack
                    and 0 <= y1 <= y2 <= line["height"] + slack):
                return f"box {line['box']} is not inside its {line['width']}x{line['height']} image"
        for metric in self.metrics:
            problem = metric.check_line(line) if metric.check_line is not None else None
            if problem:
                return problem
        return None

    def rescore(self, line: dict, target: Any) -> tuple[dict, str | None]:
        """The line with every metric's scores recomputed against ``target``, and what was
        corrected (or None): a stored score is never trusted."""
        scores = self.scores(line, target)
        changed = [key for key, value in scores.items() if line.get(key) != value]
        if not changed:
            return line, None
        old = "/".join(str(line.get(key)) for key in scores)
        new = "/".join(str(value) for value in scores.values())
        return {**line, **scores}, f"{'/'.join(scores)} {old} recomputed as {new}"


def _nonfinite_problem(line: Mapping[str, Any]) -> str | None:
    """What a ``nonfinite`` line (no prediction) holds that it should not: a seed, or a mask
    with a pixel set (a mask metric scores it as the empty mask)."""
    if line["seed"] is not None:
        return "a nonfinite line has no seed"
    if "pred_mask_rle" in line and foreground(line["pred_mask_rle"]) != 0:
        return "a nonfinite line's pred_mask_rle must be empty"
    return None


# the lines of every box-target run (VOC, COCO, the demo): CorLoc's
BOX_LINES = LineFormat()


def prediction_line(record: ImageRecord, box: Sequence[int], seed_rc: Sequence[int] | None,
                    root: Path, smoke: bool, fmt: LineFormat = BOX_LINES) -> dict:
    """``fmt.line``: the predictions line of one image."""
    return fmt.line(record, box, seed_rc, root, smoke)


def schema_problem(line: Any, box_slack: int = 0, fmt: LineFormat = BOX_LINES) -> str | None:
    """``fmt.problem`` (with ``box_slack``): why ``line`` is not a predictions line, or None."""
    return dataclasses.replace(fmt, box_slack=box_slack).problem(line)


# --- what a run expects --------------------------------------------------------------------


class ForeignLine(LostregError):
    """A line that belongs to another run (an error: the folder is not this run's alone)."""


@dataclass(frozen=True)
class Expected:
    """What the lines of one run must match: its format, its image ids, and (with records)
    each image's file and ground truth, from which every metric's scores are recomputed."""

    ids: frozenset[str] | None
    records: Mapping[str, ImageRecord] | None
    root: Path | None
    fmt: LineFormat = BOX_LINES

    @classmethod
    def of(cls, records: Sequence[ImageRecord] | None, root: Path | None = None,
           image_ids: Collection[str] | None = None, fmt: LineFormat = BOX_LINES) -> Expected:
        if records is not None:
            by_id = {r.image_id: r for r in records}
            return cls(frozenset(by_id), by_id, None if root is None else Path(root), fmt)
        return cls(None if image_ids is None else frozenset(image_ids), None, None, fmt)

    def check(self, line: dict) -> tuple[dict, str | None]:
        """The line with its scores recomputed, and what was corrected (or None). Raises
        ``ForeignLine`` for a line of another run."""
        image_id = line["image_id"]
        if self.ids is not None and image_id not in self.ids:
            raise ForeignLine(f"image {image_id!r} is not an image of this run")
        record = self.records.get(image_id) if self.records is not None else None
        if record is None:
            return line, None
        if self.root is not None and line["file"] != record_file(record, self.root):
            raise ForeignLine(f"image {image_id!r} has file {line['file']!r}, this run's is "
                              f"{record_file(record, self.root)!r}")
        target = record.target
        if not target.same_as_line(line):
            raise ForeignLine(f"image {image_id!r} has other {'/'.join(target.LINE_SCHEMA)} "
                              "than the dataset's (written with other annotations)")
        return self.fmt.rescore(line, target)


# --- reading a run folder ------------------------------------------------------------------


@dataclass(frozen=True)
class LineProblem:
    """One line that was not taken as it is. ``kind``: ``bad`` (quarantined, the image is
    recomputed), ``duplicate`` (an identical copy, dropped) or ``corrected`` (hit/best_iou
    recomputed)."""

    path: Path
    line: int
    kind: str
    reason: str
    text: str
    image_id: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


class LoadedPredictions(NamedTuple):
    """The validated lines of a run by image id (``hit``/``best_iou`` recomputed when the
    records were given), and every line not taken as it was."""

    lines: dict[str, dict]
    problems: list[LineProblem]

    def of_kind(self, kind: str) -> list[LineProblem]:
        return [p for p in self.problems if p.kind == kind]


def prediction_files(run_dir: Path) -> list[Path]:
    """The merged file, then the per-rank parts (any world size), in that order."""
    run_dir = Path(run_dir)
    return [run_dir / PREDICTIONS, *sorted(run_dir.glob(PART_PATTERN))]


def _complete_lines(path: Path) -> list[bytes]:
    """The complete lines of a file, without their newline; a torn last line is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LostregError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


class _Reading:
    """The state of one ``load_predictions``: lines kept per file, problems, fatal errors."""

    def __init__(self, expected: Expected) -> None:
        self.expected = expected
        self.by_id: dict[str, tuple[dict, Path, int]] = {}
        self.kept: dict[Path, list[dict]] = {}
        self.problems: list[LineProblem] = []
        self.fatal: list[str] = []
        # per file, the problems a repair removes or fixes (the file is rewritten)
        self.repairs: dict[Path, list[LineProblem]] = {}

    def problem(self, path: Path, number: int, kind: str, reason: str, raw: bytes,
                image_id: Any = None, rewrite: bool = True) -> None:
        problem = LineProblem(path, number, kind, reason, _text(raw),
                              image_id if isinstance(image_id, str) else None)
        self.problems.append(problem)
        if rewrite:
            self.repairs.setdefault(path, []).append(problem)

    def add(self, path: Path, number: int, raw: bytes) -> None:
        try:  # bounded: a line nested 200,000 deep is a bad line, not a RecursionError
            line = loads_bounded(raw, f"{path}:{number}", max_bytes=None)
        except ValueError as exc:  # JsonInputError: not JSON, not UTF-8, or too deep
            self.problem(path, number, "bad", f"not JSON ({exc.reason})", raw)
            return
        reason = self.expected.fmt.problem(line)
        if reason is not None:
            self.problem(path, number, "bad", reason, raw,
                         line.get("image_id") if isinstance(line, dict) else None)
            return
        try:
            line, corrected = self.expected.check(line)
        except ForeignLine as exc:
            self.fatal.append(f"{path}:{number}: {exc}")
            return
        image_id = line["image_id"]
        if corrected is not None:
            self.problem(path, number, "corrected", corrected, raw, image_id)
        if image_id not in self.by_id:
            self.by_id[image_id] = (line, path, number)
            self.kept.setdefault(path, []).append(line)
            return
        first, first_path, first_number = self.by_id[image_id]
        if first != line:
            self.fatal.append(f"{path}:{number}: image {image_id!r} has another prediction "
                              f"than {first_path}:{first_number} (two runs wrote into one "
                              "folder?)")
            return
        # the same line again: dropped from the file it repeats in; a copy in another file
        # (a kill between the merge and the removal of the parts) goes with the next merge
        within = first_path == path
        self.problem(path, number, "duplicate", f"same line as {first_path}:{first_number}",
                     raw, image_id, rewrite=within)
        if not within:
            self.kept.setdefault(path, []).append(line)


def load_predictions(run_dir: str | Path, records: Sequence[ImageRecord] | None, *,
                     root: str | Path | None = None, image_ids: Collection[str] | None = None,
                     repair: bool = True, box_slack: int = 0,
                     fmt: LineFormat | None = None) -> LoadedPredictions:
    """Every valid prediction of a run folder (merged file plus parts), by image id.

    ``records`` are the run's images (its ``--limit`` applied): lines must be of these images,
    with their GT (and with ``root``, the dataset root, their file); every metric's scores are
    recomputed from the GT. Without records (tools that have no dataset) only ``image_ids``,
    if given, is checked and the scores are only type-checked. ``fmt``: the run's line format
    (default: boxes scored by CorLoc, with ``box_slack``).

    Raises ``LostregError`` naming ``file:line`` for a line of another run or two different
    lines of one image, before changing anything. With ``repair``, bad lines are moved to
    ``quarantine.jsonl`` and each file holding a bad line, a duplicate within itself or a
    corrected value is rewritten atomically without it (one warning per file); without,
    nothing is written.
    """
    run_dir = Path(run_dir)
    fmt = fmt if fmt is not None else dataclasses.replace(BOX_LINES, box_slack=box_slack)
    reading = _Reading(Expected.of(records, None if root is None else Path(root), image_ids,
                                   fmt))
    for path in prediction_files(run_dir):
        for number, raw in enumerate(_complete_lines(path), start=1):
            reading.add(path, number, raw)
    if reading.fatal:
        more = f" (and {len(reading.fatal) - 1} more)" if len(reading.fatal) > 1 else ""
        raise LostregError(f"{reading.fatal[0]}{more}; this run folder holds lines of another "
                           "run: move it away or use another --output")
    if repair:
        _repair(run_dir, reading)
    return LoadedPredictions({i: line for i, (line, _, _) in reading.by_id.items()},
                             reading.problems)


def _repair(run_dir: Path, reading: _Reading) -> None:
    """Quarantine bad lines (durably, first), then rewrite each file that changed."""
    bad = [p for p in reading.problems if p.kind == "bad"]
    if bad:
        quarantine(run_dir / QUARANTINE, bad)
    for path, mine in sorted(reading.repairs.items()):
        atomic_write_text(path, "".join(json.dumps(line, sort_keys=True, allow_nan=False) + "\n"
                                        for line in reading.kept.get(path, [])))
        counts = ", ".join(f"{n} {kind}" for kind in ("bad", "duplicate", "corrected")
                           if (n := sum(p.kind == kind for p in mine)))
        moved = (f"; bad lines moved to {run_dir / QUARANTINE}, their images are recomputed"
                 if any(p.kind == "bad" for p in mine) else "")
        print(f"warning: {path}: repaired {counts} line(s) (first: line {mine[0].line}, "
              f"{mine[0].reason}){moved}", file=sys.stderr, flush=True)


def quarantine(path: Path, problems: Iterable[LineProblem]) -> None:
    """Append bad lines to ``path`` durably, each with its source, line number and reason; a
    line already there (a kill between this append and the rewrite) is not added twice."""
    seen = {(q.get("source"), q.get("text")) for q in _quarantined(path)}
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries = [{"source": p.path.name, "line": p.line, "reason": p.reason, "text": p.text,
                "quarantined": stamp}
               for p in problems if (p.path.name, p.text) not in seen]
    with JsonlAppender(path) as out:
        out.write_many(entries)


def _quarantined(path: Path) -> list[dict]:
    try:
        return [q for q in read_jsonl(path) if isinstance(q, dict)]
    except ValueError:  # a damaged quarantine file only costs a repeated entry
        return []


# --- merging and scoring -------------------------------------------------------------------


def merge_predictions(run_dir: str | Path, records: Sequence[ImageRecord], *,
                      root: str | Path | None = None, box_slack: int = 0,
                      fmt: LineFormat | None = None) -> list[dict]:
    """Write ``predictions.jsonl`` in ``records`` order from the validated file and parts,
    then delete the parts; a kill at any point leaves files a rerun merges the same way.
    The file is not rewritten when it already holds exactly these lines and no part is left,
    so finalising a finished run changes nothing on disk."""
    run_dir = Path(run_dir)
    loaded = load_predictions(run_dir, records, root=root, box_slack=box_slack, fmt=fmt)
    return write_merged(run_dir, [r.image_id for r in records], loaded.lines)


def write_merged(run_dir: Path, image_ids: Sequence[str], lines: Mapping[str, dict]
                 ) -> list[dict]:
    """``predictions.jsonl`` = ``lines`` in ``image_ids`` order; then the parts are deleted."""
    missing = [i for i in image_ids if i not in lines]
    if missing:
        raise LostregError(f"{run_dir}: {len(missing)} predictions missing after the run "
                           f"(first: {missing[0]}); rerun the same command")
    ordered = [lines[i] for i in image_ids]
    text = "".join(json.dumps(line, sort_keys=True, allow_nan=False) + "\n" for line in ordered)
    target = run_dir / PREDICTIONS
    try:
        same = target.read_bytes() == text.encode("utf-8")
    except OSError:
        same = False
    if not same:
        atomic_write_text(target, text)
    for path in prediction_files(run_dir)[1:]:
        path.unlink(missing_ok=True)
    return ordered


def evaluate_lines(lines: Mapping[str, dict], records: Sequence[ImageRecord],
                   fmt: LineFormat = BOX_LINES) -> dict[str, Any]:
    """Every metric's figures over validated lines (``load_predictions`` with records), in
    dataset order: every image of the run counts, so one without a line is an error, not left
    out."""
    missing = [r.image_id for r in records if r.image_id not in lines]
    if missing:
        raise LostregError(f"{len(missing)} images have no prediction (first: {missing[0]})")
    results: dict[str, Any] = {}
    for metric in fmt.metrics:
        results.update(metric.evaluate(lines[r.image_id] for r in records))
    return results

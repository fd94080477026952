"""What a run folder already holds, checked against the command before it writes or trusts it.

A run folder outlives the command and the code that started it. Before a command adds to one,
or calls it "already finished", it checks (``check_folder``, called by
``lostreg.runs.folder.open_runs`` in the process holding the folder's lock):

* **config.json is this run's.** Its ``identity`` and the settings the reports read (model,
  dataset, method, feature, weights, ...) must equal what this command would write; an edited
  model or another run's file is refused with one line, before anything is read or repaired.
  A config.json that cannot be read at all (truncated, ``[]``, too deep) is rewritten.
* **The code versions do not mix** (``lostreg.version.RESULT_VERSION``). config.json records
  the result versions of the code that wrote the folder's predictions (``result_versions``)
  and each session that opened it to write (``code_history``: version, commit, how many
  predictions were already there). Adding predictions (or figures) under another result
  version than the ones already there is refused with one line, since the finished file
  would match neither version; ``--allow-version-mix`` does it anyway and says so
  (``version_mix: true``). A folder written before versions were declared counts as version 1
  (declared in ``RESULT_VERSIONS``); one whose config.json could not be read, as unknown.
* **A finished run's metrics.json is its predictions'.** Its figures must equal those
  recomputed from the validated lines (and its settings config.json's); otherwise it is
  rewritten from the lines, and the run's line says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lostreg
from lostreg.errors import LostregError
from lostreg.fields import is_int, shown
from lostreg.io import null_if_undefined, read_json_object
from lostreg.version import RESULT_VERSION, RESULT_VERSIONS, checkout_commit

CONFIG, METRICS = "config.json", "metrics.json"
# config.json settings that must equal the command's (absent keys are fine: older folders)
# (not the run id: an earlier release named the same run otherwise, see ``runs.legacy``)
SAME_RUN_KEYS = ("identity", "model", "timm_name", "family", "patch_size",
                 "num_registers", "test_time_registers", "dataset", "split", "no_hard",
                 "method", "method_params", "feature", "layer", "normalize", "pos_interp",
                 "precision", "k_patches", "gram_bias", "refine", "mask_protocol", "target",
                 "metrics", "smoke_run", "scratch_run")
# metrics.json settings that must equal config.json's
METRICS_SAME_KEYS = ("run_id", "model", "timm_name", "dataset", "split", "no_hard", "feature",
                     "method", "method_params", "layer", "normalize", "precision", "refine",
                     "smoke_run", "scratch_run")
HISTORY_KEPT = 100  # code_history entries kept: the first and the latest


@dataclass(frozen=True)
class Previous:
    """config.json as the folder holds it: the object, or why it could not be read."""

    config: dict | None
    problem: str | None = None

    @property
    def missing(self) -> bool:
        return self.config is None and self.problem is None


def read_previous(run_dir: Path) -> Previous:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        return Previous(None)
    try:
        return Previous(read_json_object(path))
    except LostregError as exc:
        return Previous(None, str(exc))


def normalized(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, undefined figures as null), so
    what was written and what would be written compare equal."""
    return json.loads(json.dumps(null_if_undefined(value), default=str))


def _weights_differ(stored: Any, expected: Mapping[str, Any]) -> bool:
    if not isinstance(stored, dict) or not isinstance(expected.get("weights"), dict):
        return False  # older folders wrote a string; the identity holds the weights too
    return any(stored.get(key) != expected["weights"].get(key) for key in ("source", "sha256"))


def check_same_run(run_dir: Path, previous: Previous, expected: Mapping[str, Any]) -> None:
    """Refuse (one line) a config.json that describes another run than this command's."""
    if previous.config is None:
        return
    want = normalized(dict(expected))
    for key in SAME_RUN_KEYS:
        if key in previous.config and key in want and previous.config[key] != want[key]:
            raise LostregError(
                f"{Path(run_dir) / CONFIG}: '{key}' is {shown(previous.config[key])} but this "
                f"command's run has {shown(want[key])}: the folder holds another run (an edited "
                "config.json, or another run's?); restore it, or move the folder away")
    if _weights_differ(previous.config.get("weights"), want):
        raise LostregError(f"{Path(run_dir) / CONFIG}: 'weights' names other weights than this "
                           "command's; restore it, or move the folder away")


def written_versions(previous: Previous) -> list[int] | None:
    """The result versions of the code that wrote the folder's predictions; None when unknown
    (config.json unreadable or missing, or recorded as unknown)."""
    if previous.config is None:
        return None
    if "result_versions" not in previous.config:
        return [1]  # declared: every release before result versions existed
    versions = previous.config["result_versions"]
    if isinstance(versions, list) and versions and all(is_int(v) for v in versions):
        return sorted(set(versions))
    return None


def _describe(versions: list[int] | None) -> str:
    if versions is None:
        return "code of an unknown result version (config.json could not be read)"
    return " and ".join(f"result version {v} ({RESULT_VERSIONS.get(v, 'not declared here')})"
                        for v in versions)


def check_versions(run_dir: Path, previous: Previous, lines: int, allow_mix: bool
                   ) -> tuple[list[int], bool]:
    """The result versions the folder's predictions will come from once this command writes
    into it, and whether they mix; refuses (one line) a mix unless ``allow_mix``."""
    if lines == 0:
        return [RESULT_VERSION], False
    before = written_versions(previous)
    if before == [RESULT_VERSION]:
        return before, False
    if not allow_mix:
        raise LostregError(
            f"{run_dir}: its {lines} predictions were written by {_describe(before)}; this code "
            f"is result version {RESULT_VERSION}, so resuming would mix results that match "
            "neither: finish it with that code, delete the folder to start over, or pass "
            "--allow-version-mix (recorded in config.json)")
    return sorted({*(before or []), RESULT_VERSION}), True


def history(previous: Previous, lines: int, mixed: bool, note: str | None = None) -> list[dict]:
    """``code_history`` with this session appended (the first entry and the latest kept)."""
    earlier: list[dict] = []
    if previous.config is not None and lines:
        recorded = previous.config.get("code_history")
        if isinstance(recorded, list):
            earlier = [entry for entry in recorded if isinstance(entry, dict)]
        elif "result_versions" not in previous.config:  # a folder from before versions
            earlier = [{"result_version": 1, "lostreg_version": previous.config.get(
                "lostreg_version"), "git_commit": previous.config.get("git_commit"),
                "note": "written before result versions were declared (version 1)"}]
    elif lines:
        earlier = [{"result_version": None, "note": note or "config.json could not be read: "
                    f"the code that wrote the {lines} earlier predictions is unknown"}]
    entry = {"result_version": RESULT_VERSION, "lostreg_version": lostreg.__version__,
             "git_commit": checkout_commit(), "predictions_before": lines,
             "opened": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if mixed:
        entry["version_mix_allowed"] = True
    entries = [*earlier, entry]
    return entries if len(entries) <= HISTORY_KEPT else entries[:1] + entries[-HISTORY_KEPT + 1:]


def metrics_disagreement(run_dir: Path, results: Mapping[str, Any], nonfinite: int,
                         expected: Mapping[str, Any]) -> str | None:
    """Why a complete run's metrics.json is not the one its validated predictions give, or
    None: unreadable, a figure that differs from the recomputed one, or a setting (the run id
    among them) that differs from config.json's (``expected``: the folder's config.json when
    it is readable, else the one this command writes)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return "metrics.json was missing"
    try:
        data = read_json_object(path)
    except LostregError as exc:
        return f"metrics.json could not be read: {exc}"
    want = normalized({**results, **{k: expected[k] for k in METRICS_SAME_KEYS
                                      if k in expected}})
    for key, value in want.items():
        if (key in results or key in data) and data.get(key) != value:
            return (f"its {key} {shown(data.get(key), 40)} disagreed with the "
                    f"{'predictions' if key in results else 'config'}' {shown(value, 40)}")
    if data.get("nonfinite_images", 0) != nonfinite:
        return (f"its nonfinite_images {shown(data.get('nonfinite_images'))} disagreed with "
                f"the predictions' {nonfinite}")
    return None

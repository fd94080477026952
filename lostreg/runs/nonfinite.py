"""Images whose features were not finite: counted, named, and a run that has too many stops.

NaN or inf features (a broken checkpoint, or a backbone that overflows in fp16/bf16) still give
every method a box: one NaN key moves LOST's seed to its patch, and TokenCut's CorLoc fell from
16.7 to 0 in fp16 without a word. So the pass checks every feature map on the device, once per
batch (``lostreg.features.pipeline.finite_images``: one reduction, read back with the boxes),
and an image with a non-finite value gets no prediction: its line says ``"nonfinite": true``
with ``"box": null`` and is scored as a failure (``lostreg.runs.predictions.NONFINITE``). A
cached map is checked the same way, and under torchrun each rank's lines carry the flag, so
the count below comes from the merged lines whatever computed them.

At the end of a run, ``nonfinite_fields`` counts those lines. More than ``--max-nonfinite``
(default 0) is one error line naming the images and what to do (``--precision fp32`` when the
run was in reduced precision); the predictions stay, so a rerun with a higher
``--max-nonfinite`` finishes at once. A run that finishes with some names them in
``metrics.json`` (a bounded list).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lostreg.errors import LostregError

#: How many images ``metrics.json`` names (the count covers them all).
NAMED_IN_METRICS = 20
#: How many files the error line names.
NAMED_IN_LINE = 3


class NonFiniteFeatures(LostregError):
    """More images with non-finite features than ``--max-nonfinite`` allows."""


def nonfinite_lines(lines: Sequence[dict]) -> list[dict]:
    """The lines of images whose features were not finite (no prediction made)."""
    return [line for line in lines if line.get("nonfinite") is True]


def _files(bad: Sequence[dict]) -> str:
    named = ", ".join(str(line["file"]) for line in bad[:NAMED_IN_LINE])
    more = len(bad) - NAMED_IN_LINE
    return named + (f" and {more} more" if more > 0 else "")


def overflow_note(count: int, precision: str) -> str | None:
    """What a reduced-precision run says about its non-finite images, or None."""
    if count == 0 or precision == "fp32":
        return None
    return (f"the backbone overflowed under --precision {precision} on {count} image(s) "
            "(non-finite features, scored as failures); --precision fp32 avoids it")


def nonfinite_fields(lines: Sequence[dict], run_dir: Path, settings: dict[str, Any],
                     max_nonfinite: int) -> dict[str, Any]:
    """``metrics.json``'s account of the run's non-finite images (how many, the first
    ``NAMED_IN_METRICS`` ids, the allowance); raises ``NonFiniteFeatures`` (one line) when they
    are more than ``max_nonfinite``."""
    bad = nonfinite_lines(lines)
    precision, feature = settings.get("precision", "fp32"), settings.get("feature", "?")
    if len(bad) > max_nonfinite:
        if precision != "fp32":
            why = (f"the backbone overflowed under --precision {precision} on {len(bad)} of "
                   f"{len(lines)} images ({feature} features not finite: {_files(bad)}); rerun "
                   "with --precision fp32, or")
        else:
            why = (f"{len(bad)} of {len(lines)} images have non-finite {feature} features (NaN "
                   f"or inf: a broken checkpoint?): {_files(bad)}; fix the model, or rerun")
        raise NonFiniteFeatures(
            f"{run_dir}: {why} with --max-nonfinite {len(bad)} to score them as failures (no "
            f"prediction was made for them; --max-nonfinite is {max_nonfinite}, the other "
            "predictions are saved)")
    fields: dict[str, Any] = {
        "nonfinite_images": len(bad),
        "nonfinite_examples": [line["image_id"] for line in bad[:NAMED_IN_METRICS]],
        "max_nonfinite": max_nonfinite,
    }
    note = overflow_note(len(bad), precision)
    if note:
        fields["nonfinite_note"] = note
    return fields


def nonfinite_warning(run_dir: Path, count: int, precision: str) -> str | None:
    """The warning of a run that finished with non-finite images (allowed by
    ``--max-nonfinite``), or None."""
    if count == 0:
        return None
    if precision != "fp32":
        return (f"warning: {run_dir}: the backbone overflowed under --precision {precision} on "
                f"{count} image(s): no prediction for them, scored as failures (metrics.json "
                "names them); --precision fp32 avoids it")
    return (f"warning: {run_dir}: {count} image(s) had non-finite features: no prediction for "
            "them, scored as failures (metrics.json names them)")

"""The warnings every analysis output carries about the run it was computed from: one owner
for their wording, so a table, a JSON file, an ``index.html`` and a figure say the same thing.

Why: a figure or a table read later, or pasted into a paper, must still say what it is. A run
from random weights is a smoke run (``SMOKE_MARK``); a run analysed before it finished (no
``metrics.json`` yet: killed, or still running) covers only the images it had predicted then,
so its outputs say so and how many, of how many in the run's split when ``config.json`` tells
(``unfinished_mark``). A finished run gets no unfinished mark, so its outputs are what they
were before this mark existed.

This module reads nothing and imports nothing heavy: ``runs`` decides whether a run is
finished and how many images its split has; the writers place the marks (a markdown line in
bold, a red line of ``index.html``, a red figure footer, an ``unfinished_run`` record in JSON).
"""

from __future__ import annotations

from typing import Any

SMOKE_MARK = "SMOKE RUN (random weights): not a result"
UNFINISHED_PREFIX = "UNFINISHED RUN"
# the notes of an index.html that are warnings (drawn in red), by how they begin
WARNING_PREFIXES = ("SMOKE", UNFINISHED_PREFIX)


def unfinished_mark(predicted: int, split_images: int | None, label: str = "") -> str:
    """``UNFINISHED RUN: 12 of 5011 images predicted when analysed (no metrics.json yet);
    not the run's result``; ``label`` names the run among several (``UNFINISHED RUN lost
    #2: ...``); without a known split size, ``12 images predicted ...``."""
    of = f" of {split_images}" if split_images is not None else ""
    who = f" {label}" if label else ""
    return (f"{UNFINISHED_PREFIX}{who}: {predicted}{of} images predicted when analysed "
            "(no metrics.json yet); not the run's result")


def unfinished_record(predicted: int, split_images: int | None) -> dict[str, Any]:
    """What a JSON output records about an unfinished run (``unfinished_run``): the counts and
    the words of :func:`unfinished_mark`."""
    return {"images_predicted": predicted, "split_images": split_images,
            "note": unfinished_mark(predicted, split_images)}


def markdown_mark(mark: str) -> str:
    """A mark as a markdown line (bold, ending with a full stop), as the smoke mark has always
    been written in the analysis tables."""
    return f"**{mark}.**"


def is_warning(note: str) -> bool:
    """Whether an ``index.html`` note is one of these marks (shown as a warning)."""
    return note.startswith(WARNING_PREFIXES)

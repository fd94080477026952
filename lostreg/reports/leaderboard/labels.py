"""Text every leaderboard figure shares, matplotlib PNG or written SVG: the SMOKE line, and
labels wrapped to the width their slot has, so long model names and settings never run into
each other."""

from __future__ import annotations

import textwrap

SMOKE_MARK = "SMOKE (random weights): not a result"
TICK_FONT = 7  # points
# a character's width in ems, generous (wide letters, underscores) so wrapped labels fit
CHAR_EMS = 0.7


def wrap(text: str, inches: float, fontsize: float = TICK_FONT) -> str:
    """``text`` wrapped to lines that fit ``inches`` at ``fontsize`` (long names broken)."""
    width = max(8, int(inches * 72 / (fontsize * CHAR_EMS)))
    return "\n".join(textwrap.fill(part, width, break_long_words=True, break_on_hyphens=False)
                     for part in text.split("\n"))

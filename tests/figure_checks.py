"""Reusable checks that a matplotlib figure's text reads well: on the canvas, no overlaps.

``drawn_texts(figure)`` renders the figure on an Agg canvas and returns every text artist that
was actually drawn (visible, non-empty, inside its axis' view: tick labels of ticks outside
the limits are created but never drawn, so inspecting ``figure.findobj(Text)`` would report
ghosts) with its bounding box in pixels. ``text_layout_problems`` lists each text that leaves
the canvas and each pair whose boxes overlap; ``assert_text_layout_ok`` fails with that list.

Use from any test: ``from figure_checks import assert_text_layout_ok``.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any
from unittest import mock

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from matplotlib.transforms import Bbox


def drawn_texts(figure: Any) -> list[tuple[str, Bbox]]:
    """(text, pixel bounding box) of every text artist drawn when the figure is rendered."""
    canvas = FigureCanvasAgg(figure)
    drawn: dict[int, Text] = {}
    original = Text.draw

    def recording_draw(self: Text, renderer: Any) -> None:
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn[id(self)] = self

    with mock.patch.object(Text, "draw", recording_draw):
        canvas.draw()
    renderer = canvas.get_renderer()
    return [(text.get_text(), text.get_window_extent(renderer)) for text in drawn.values()]


def _overlap(a: Bbox, b: Bbox, tolerance: float) -> bool:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width > tolerance and height > tolerance


def text_layout_problems(figure: Any, tolerance: float = 0.5) -> list[str]:
    """Every drawn text outside the canvas, and every pair of drawn texts that overlap
    (by more than ``tolerance`` pixels both ways)."""
    texts = drawn_texts(figure)
    width, height = figure.bbox.width, figure.bbox.height
    problems = []
    for text, box in texts:
        if (box.x0 < -tolerance or box.y0 < -tolerance or box.x1 > width + tolerance
                or box.y1 > height + tolerance):
            problems.append(f"{text!r} at {box.bounds} leaves the {width:.0f}x{height:.0f} canvas")
    for (text_a, box_a), (text_b, box_b) in combinations(texts, 2):
        if _overlap(box_a, box_b, tolerance):
            problems.append(f"{text_a!r} overlaps {text_b!r}")
    return problems


def assert_text_layout_ok(figure: Any) -> None:
    problems = text_layout_problems(figure)
    assert not problems, "\n".join(problems)


def figure_says(figure: Any, word: str) -> bool:
    """Whether some drawn text of the figure contains ``word``."""
    return any(word in text for text, _ in drawn_texts(figure))

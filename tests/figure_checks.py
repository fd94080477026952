"""Checks that a matplotlib figure reads well: every text it draws is inside the canvas and no
two drawn texts overlap. Use from any test: ``from figure_checks import assert_texts_fit``.

Only texts that are actually drawn count (an empty title, the labels of a hidden axis or a
tick outside the view are not): the figure is drawn once while ``Text.draw`` records each
visible, non-blank text it is called on, and the bounding boxes come from that renderer.
"""

from __future__ import annotations

import itertools

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

# Antialiasing smears a glyph's edge by about a pixel: ignore contacts below that.
TOLERANCE_PX = 1.0


def drawn_texts(fig: Figure) -> list[tuple[Text, object]]:
    """``(text artist, window bbox)`` of every non-blank text the figure draws (one draw)."""
    if not hasattr(fig.canvas, "get_renderer"):  # a bare Figure(): give it an Agg canvas
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    seen: dict[int, Text] = {}
    original = Text.draw

    def recording(text: Text, renderer_) -> None:
        if text.get_visible() and text.get_text().strip():
            seen.setdefault(id(text), text)
        return original(text, renderer_)

    Text.draw = recording  # every text, multi-line ones included, passes through here
    try:
        fig.draw(renderer)
    finally:
        Text.draw = original
    return [(text, text.get_window_extent(renderer)) for text in seen.values()]


def _describe(text: Text) -> str:
    return repr(text.get_text()[:60])


def text_problems(fig: Figure, tolerance: float = TOLERANCE_PX,
                  texts: list[tuple[Text, object]] | None = None) -> list[str]:
    """Every drawn text that leaves the canvas or overlaps another drawn text, one line each
    (empty when the figure is clean); ``texts``: :func:`drawn_texts` if already taken."""
    width, height = fig.bbox.width, fig.bbox.height
    texts = drawn_texts(fig) if texts is None else texts
    problems = []
    for text, box in texts:
        if (box.x0 < -tolerance or box.y0 < -tolerance or box.x1 > width + tolerance
                or box.y1 > height + tolerance):
            problems.append(f"{_describe(text)} leaves the {width:.0f}x{height:.0f} canvas: "
                            f"x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f}")
    for (first, a), (second, b) in itertools.combinations(texts, 2):
        overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
        if overlap_x > tolerance and overlap_y > tolerance:
            problems.append(f"{_describe(first)} overlaps {_describe(second)} "
                            f"({overlap_x:.0f}x{overlap_y:.0f} px)")
    return problems


def assert_texts_fit(fig: Figure, name: str = "figure") -> None:
    """Fail with every problem of :func:`text_problems` listed."""
    problems = text_problems(fig)
    assert not problems, f"{name}: " + "; ".join(problems)


def offset_texts(fig: Figure, texts: list[tuple[Text, object]] | None = None) -> list[str]:
    """Drawn axis offset texts (``1e-6+1.428e-2``, ``×10^3``): plain ticks have none."""
    offsets = []
    drawn = {id(text) for text, _ in (drawn_texts(fig) if texts is None else texts)}
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            offset = axis.get_offset_text()
            if id(offset) in drawn:
                offsets.append(offset.get_text())
    return offsets


# the names the leaderboard's figure tests use
text_layout_problems = text_problems


def assert_text_layout_ok(fig: Figure) -> None:
    assert_texts_fit(fig)


def figure_says(fig: Figure, word: str) -> bool:
    """Whether some drawn text of the figure contains ``word``."""
    return any(word in text.get_text() for text, _ in drawn_texts(fig))

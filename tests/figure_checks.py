"""Checks that a figure reads well: every text it draws is inside the canvas and no two drawn
texts overlap. Use from any test: ``from figure_checks import assert_texts_fit`` (a
matplotlib figure) or ``assert_svg_texts_fit`` (an SVG lostreg writes).

Only texts that are actually drawn count (an empty title, the labels of a hidden axis or a
tick outside the view are not): the figure is drawn once while ``Text.draw`` records each
visible, non-blank text it is called on, and the bounding boxes come from that renderer.
"""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET

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


def box_problems(boxes: list[tuple[str, tuple[float, float, float, float]]], width: float,
                 height: float, tolerance: float = TOLERANCE_PX) -> list[str]:
    """Every ``(name, (x0, y0, x1, y1))`` box that leaves a ``width x height`` canvas or
    overlaps another box, one line each: the check of matplotlib figures and SVGs alike."""
    problems = [f"{name} leaves the {width:.0f}x{height:.0f} canvas: "
                f"x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}"
                for name, (x0, y0, x1, y1) in boxes
                if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance
                or y1 > height + tolerance]
    for (first, a), (second, b) in itertools.combinations(boxes, 2):
        overlap_x = min(a[2], b[2]) - max(a[0], b[0])
        overlap_y = min(a[3], b[3]) - max(a[1], b[1])
        if overlap_x > tolerance and overlap_y > tolerance:
            problems.append(f"{first} overlaps {second} ({overlap_x:.0f}x{overlap_y:.0f} px)")
    return problems


def text_problems(fig: Figure, tolerance: float = TOLERANCE_PX,
                  texts: list[tuple[Text, object]] | None = None) -> list[str]:
    """Every drawn text that leaves the canvas or overlaps another drawn text, one line each
    (empty when the figure is clean); ``texts``: :func:`drawn_texts` if already taken."""
    texts = drawn_texts(fig) if texts is None else texts
    return box_problems([(_describe(text), (box.x0, box.y0, box.x1, box.y1))
                         for text, box in texts], fig.bbox.width, fig.bbox.height, tolerance)


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


# --- SVG written by lostreg (``lostreg.reports.leaderboard.histogram_svg``) -----------------

SVG = "{http://www.w3.org/2000/svg}"
_ROTATE = re.compile(r"^rotate\((-?90) ([0-9.]+) ([0-9.]+)\)$")


def svg_root(svg: str) -> ET.Element:
    """The parsed document; fails unless it is well-formed SVG with a numeric size."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg", root.tag
    assert float(root.get("width")) > 0 and float(root.get("height")) > 0
    return root


def svg_text_boxes(svg: str) -> list[tuple[str, tuple[float, float, float, float], str]]:
    """``(text, (x0, y0, x1, y1), fill)`` of every ``<text>``, measured with matplotlib's
    DejaVu Sans metrics at the text's font size (the first font the SVG asks for), in the
    SVG's coordinates (y down). Rotated texts (``rotate(-90 cx cy)``, the y label) are turned
    about their centre."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    measure = TextToPath()
    boxes = []
    for element in svg_root(svg).iter(f"{SVG}text"):
        words = element.text or ""
        size = float(element.get("font-size"))
        weight = element.get("font-weight", "normal")
        width, height, descent = measure.get_text_width_height_descent(
            words, FontProperties(family="DejaVu Sans", size=size, weight=weight), ismath=False)
        x, y = float(element.get("x")), float(element.get("y"))
        anchor = element.get("text-anchor", "start")
        x0 = x - {"start": 0.0, "middle": width / 2, "end": width}[anchor]
        box = (x0, y - (height - descent), x0 + width, y + descent)
        rotated = _ROTATE.match(element.get("transform", ""))
        if rotated:
            cx, cy = float(rotated.group(2)), float(rotated.group(3))
            # rotate(-90) in y-down coordinates: (dx, dy) -> (dy, -dx)
            box = (cx + box[1] - cy, cy - (box[2] - cx), cx + box[3] - cy, cy - (box[0] - cx))
        boxes.append((words, box, element.get("fill", "black")))
    return boxes


def svg_text_problems(svg: str, tolerance: float = TOLERANCE_PX) -> list[str]:
    """Every text that leaves the SVG's canvas or overlaps another text, one line each."""
    root = svg_root(svg)
    return box_problems([(repr(words[:60]), box) for words, box, _ in svg_text_boxes(svg)],
                        float(root.get("width")), float(root.get("height")), tolerance)


def assert_svg_texts_fit(svg: str, name: str = "figure") -> None:
    problems = svg_text_problems(svg)
    assert not problems, f"{name}: " + "; ".join(problems)


def svg_says(svg: str, words: str, fill: str | None = None) -> bool:
    """Whether some text of the SVG (of colour ``fill``, if given) contains ``words``."""
    return any(words in text and (fill is None or colour == fill)
               for text, _, colour in svg_text_boxes(svg))

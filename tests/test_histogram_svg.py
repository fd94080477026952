"""The per-run IoU histogram written as SVG (``histogram_svg``): its bars and ticks computed
by hand, its texts inside the canvas whatever the run id, SMOKE said exactly when it is a
smoke run, text escaped, and the same bytes for the same histogram."""

from __future__ import annotations

import pytest
from figure_checks import SVG, svg_root, svg_says, svg_text_problems

from lostreg.reports.leaderboard import histogram_svg as hs
from lostreg.reports.leaderboard.histogram_svg import Histogram, histogram_svg, y_step

LONG_ID = "voc07-dinov2_vitl14_reg4-lost-00007-22841ea360" * 3


def _histogram(counts: tuple[int, ...] = (0,) * 20, title: str = "run\nCorLoc 41.2",
               smoke: bool = False, threshold: float | None = 0.5) -> Histogram:
    return Histogram(counts, title, "best IoU with a ground-truth box", smoke, threshold,
                     "hit threshold 0.5" if threshold is not None else "")


def _bars(svg: str) -> list[dict[str, float]]:
    return [{key: float(rect.get(key)) for key in ("x", "y", "width", "height")}
            for rect in svg_root(svg).iter(f"{SVG}rect") if rect.get("fill") == hs.BAR_COLOR]


@pytest.mark.parametrize(("top", "step"), [(1, 1), (5, 1), (6, 2), (10, 2), (11, 5), (25, 5),
                                            (26, 10), (5011, 2000), (3_000_000, 1_000_000)])
def test_y_step_gives_whole_images_and_at_most_five_intervals(top: int, step: int) -> None:
    assert y_step(top) == step


def test_bars_stand_on_their_bins_with_heights_in_proportion() -> None:
    counts = (0,) * 10 + (4,) + (0,) * 8 + (1,)  # bins [0.50, 0.55) and [0.95, 1.00]
    svg = histogram_svg(_histogram(counts))
    first, last = _bars(svg)  # empty bins get no bar
    assert first["width"] == pytest.approx(last["width"], abs=0.01)
    frame = next(rect for rect in svg_root(svg).iter(f"{SVG}rect") if rect.get("fill") == "none")
    left, plot_width = float(frame.get("x")), float(frame.get("width"))
    assert first["x"] == pytest.approx(left + plot_width * 0.50, abs=0.01)
    assert last["x"] == pytest.approx(left + plot_width * 0.95, abs=0.01)
    assert first["width"] == pytest.approx(plot_width / 20, abs=0.01)
    assert first["height"] == pytest.approx(hs.PLOT_HEIGHT, abs=0.01)  # top tick: 4 images
    assert last["height"] == pytest.approx(hs.PLOT_HEIGHT / 4, abs=0.01)
    assert first["y"] + first["height"] == pytest.approx(last["y"] + last["height"], abs=0.01)
    line = next(line for line in svg_root(svg).iter(f"{SVG}line") if line.get("stroke") == "red")
    assert float(line.get("x1")) == pytest.approx(first["x"], abs=0.01)  # the 0.5 threshold
    ticks = [text.text for text in svg_root(svg).iter(f"{SVG}text")
             if text.get("text-anchor") == "end"]
    assert ticks == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("histogram", [
    _histogram(),
    _histogram((3_000_000,) + (0,) * 19, smoke=True),
    _histogram((1,) * 20, title=f"{LONG_ID}\nCorLoc 41.2 on 20 images (first 50 images: not "
                                "comparable with published figures)", smoke=True),
    _histogram((7,) * 20, title="x" * 400, threshold=None),
])
def test_every_text_is_inside_the_canvas_and_apart(histogram: Histogram) -> None:
    svg = histogram_svg(histogram)
    assert svg_text_problems(svg) == []
    assert svg_says(svg, "SMOKE (random weights): not a result", fill="red") == histogram.smoke
    assert svg_says(svg, "hit threshold 0.5") == (histogram.threshold is not None)


def test_the_text_check_fails_on_an_unwrapped_title(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hs, "wrap", lambda text, *args, **kwargs: text)
    problems = svg_text_problems(histogram_svg(_histogram(title=LONG_ID)))
    assert problems and "leaves the" in problems[0]


def test_text_is_escaped_and_the_bytes_depend_on_the_histogram_only() -> None:
    title = 'run <img src=x onerror="alert(1)"> & co'
    svg = histogram_svg(_histogram(title=title))
    assert svg_says(svg, title) and "<img" not in svg
    assert histogram_svg(_histogram(title=title)) == svg
    assert histogram_svg(_histogram(title=title, smoke=True)) != svg


def test_counts_must_match_the_bins() -> None:
    with pytest.raises(ValueError, match="19 counts for 20 bins"):
        histogram_svg(_histogram((1,) * 19))

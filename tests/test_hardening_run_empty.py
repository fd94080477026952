"""Issue 20, row 11: an empty split with ``--allow-partial-dataset`` "finished", printed
``CorLoc nan (0/0)``, wrote a bare ``NaN`` (invalid JSON) into metrics.json, and the leaderboard
listed a 0-image row. Now the run is refused with one line, the JSON writers refuse NaN and
Infinity (an undefined figure is written as ``null``), and the leaderboard's reader refuses a
0-image run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_folders import edit_json, write_run
from tiny_runs import tiny_command

from lostreg.datasets.base import ImageRecord
from lostreg.errors import LostregError
from lostreg.evaluation.corloc import CORLOC
from lostreg.evaluation.registry import MetricSpec
from lostreg.evaluation.targets import LineField
from lostreg.io import JsonlAppender, atomic_write_json
from lostreg.run import main
from lostreg.runs.folder import finalize
from lostreg.runs.predictions import LineFormat
from lostreg.runs.store import load_run

pytestmark = pytest.mark.usefixtures("one_thread")



def voc07(root: Path, ids: list[str], difficult: bool = False) -> None:
    folder = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(
            folder / "JPEGImages" / f"{image_id}.jpg")
        (folder / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><size><width>50</width><height>40</height></size><object><name>x"
            f"</name><difficult>{int(difficult)}</difficult><bndbox><xmin>5</xmin><ymin>5</ymin>"
            "<xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>")
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))


@pytest.mark.parametrize("case", ["empty split", "blank lines", "no-hard empties it"])
def test_a_split_without_images_is_refused_with_one_line(tmp_path, tiny_model, capsys,
                                                         case) -> None:
    data = tmp_path / "data"
    extra = ["--allow-partial-dataset", "--no-download"]
    if case == "empty split":
        voc07(data, [])
    elif case == "blank lines":
        voc07(data, [])
        (data / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("\n\n  \n")
    else:  # every object is difficult: --no-hard drops every image
        voc07(data, ["000001", "000002"], difficult=True)
        extra.append("--no-hard")
    argv = tiny_command(data, tmp_path / "runs", *extra)
    argv[argv.index("demo")] = "voc07"
    argv[argv.index("--limit"):argv.index("--limit") + 2] = []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "voc07 trainval lists no images" in errors[0], err
    assert "nothing to score" in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_json_writers_refuse_nan_and_infinity(tmp_path) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError) as refused:
            atomic_write_json(tmp_path / "m.json", {"corloc": 1.0, "curve": [0.5, bad]})
        assert str(refused.value).startswith(f"{tmp_path / 'm.json'}: curve[1] is not finite")
        assert not (tmp_path / "m.json").exists()  # nothing half-written either
        with pytest.raises(ValueError, match="line.jsonl: x is not finite"), \
                JsonlAppender(tmp_path / "line.jsonl") as out:
            out.write_many([{"x": bad}])
    atomic_write_json(tmp_path / "m.json", {"a": math.nan, "b": [1.5, -math.inf], "c": (2,)},
                      undefined_as_null=True)
    assert json.loads((tmp_path / "m.json").read_text(),
                      parse_constant=lambda name: pytest.fail(name)) == {
        "a": None, "b": [1.5, None], "c": [2]}


class _Undefined:
    """An aggregate whose figure is undefined (a mean over nothing)."""

    def update(self, scores) -> None:
        pass

    def result(self) -> dict:
        return {"undefined_figure": math.nan, "n_images": 1}


def test_a_runs_undefined_figure_is_written_as_null(tmp_path) -> None:
    """metrics.json is written through the strict writer; a metric's undefined figure becomes
    null, never a bare NaN."""
    run_dir = write_run(tmp_path, "run", [True], finish=False)
    metric = MetricSpec(name="undefined", title="U", target="boxes", reads=("box",),
                        fields={"u": LineField(lambda v: True, "anything", required=False)},
                        score=lambda line, target: {}, aggregate=_Undefined, per_image="u",
                        paired_test="bootstrap", headline="undefined_figure",
                        describe=lambda result: "U", definition="a test metric")
    record = ImageRecord("000000", tmp_path / "data" / "JPEGImages" / "000000.jpg", 100, 80,
                         ((10.0, 10.0, 60.0, 50.0),))
    finalize(run_dir, [record], tmp_path / "data", LineFormat(metrics=(CORLOC, metric)), "run",
             False, {"dataset": "voc07", "precision": "fp32", "feature": "k"}, {"total": 1.0})
    text = (run_dir / "metrics.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["undefined_figure"] is None


def test_the_leaderboard_refuses_a_run_of_no_image(tmp_path) -> None:
    run_dir = write_run(tmp_path, "run", [True])
    (run_dir / "predictions.jsonl").write_text("")
    edit_json(run_dir / "metrics.json", n_images=0, n_hits=0, corloc=None)
    with pytest.raises(LostregError, match="n_images is 0: a run of no image has no figures"):
        load_run(run_dir)

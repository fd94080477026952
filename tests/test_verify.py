"""``lostreg.verify``: compare with an official predictions pickle, exactly and safely.

A tiny VOC2007-format tree and a tiny DINO-family model (random weights) stand in for VOC07
and ViT-S/16; the "official" pickle is generated from our own run with a few boxes altered,
so every number in the report is known in advance.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from voc_trees import write_voc2007 as write_tree

from lostreg import verify
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.errors import LostregError
from lostreg.io import read_jsonl
from lostreg.run import RunConfig, run_benchmark

MODEL = "tiny_dino_verify"
SPEC = BackboneSpec(MODEL, "vit_small_patch16_224.dino", "dino", 16, 0, pos_embed="dino",
                    model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))
# (image id, width, height, object box in VOC's 1-based inclusive pixels)
IMAGES = [("000005", 64, 48, (10, 8, 40, 30)), ("000007", 70, 50, (5, 5, 30, 45)),
          ("000009", 90, 33, (50, 3, 85, 30)), ("000012", 64, 64, (20, 20, 60, 60)),
          ("000016", 40, 20, (1, 1, 20, 20)), ("000017", 60, 80, (12, 30, 50, 70))]


def write_voc2007(root: Path) -> None:
    write_tree(root, IMAGES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tree, the tiny model registered, and one finished run of ours on it."""
    base = tmp_path_factory.mktemp("verify")
    write_voc2007(base / "data")
    BACKBONES[MODEL] = SPEC
    try:
        result = run_benchmark(RunConfig(
            model=MODEL, dataset="voc07", data_root=base / "data", weights="random",
            features="k", output=base / "runs", num_workers=0, progress=False, download=False,
            allow_partial_dataset=True))
        ours = list(read_jsonl(result.run_dir / "predictions.jsonl"))
        yield {"base": base, "result": result, "ours": ours}
    finally:
        BACKBONES.pop(MODEL, None)


def cli(setup: dict, predictions: Path, out: Path, *extra: str) -> list[str]:
    base = setup["base"]
    return ["lost-voc07", "--model", MODEL, "--weights", "random",
            "--data-root", str(base / "data"), "--runs-dir", str(base / "runs"),
            "--predictions", str(predictions), "--output", str(out), "--device", "cpu",
            "--num-workers", "0", "--no-progress", "--no-download", "--allow-partial-dataset",
            *extra]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dump(obj: object, path: Path, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def altered(box: list[int], how: int, width: int, height: int) -> list[int]:
    x1, y1, x2, y2 = box
    if how == 0:
        return [x1, y1, x2 + 7, y2]
    if how == 1:
        return [x1 + 3, y1 + 2, x2 + 3, y2 + 2]
    return [0, 0, width, height] if [x1, y1, x2, y2] != [0, 0, width, height] else [0, 0, 8, 8]


def test_report_is_exact(setup, tmp_path, capsys) -> None:
    ours = setup["ours"]
    assert [line["image_id"] for line in ours] == [i for i, *_ in IMAGES]
    changed = {ours[0]["image_id"]: 0, ours[2]["image_id"]: 1, ours[5]["image_id"]: 2}
    official: dict[str, object] = {}
    expected_ious, their_hits, their_boxes = [], [], {}
    for line in ours:
        box = line["box"]
        if line["image_id"] in changed:
            box = altered(box, changed[line["image_id"]], line["width"], line["height"])
        their_boxes[line["image_id"]] = box
        expected_ious.append(iou(line["box"], box))
        their_hits.append(max(iou(box, gt) for gt in line["gt_boxes"]) >= 0.5)
        official[f"{line['image_id']}.jpg"] = np.array(box, dtype=np.int64)
    # the same content in other shapes a pickle may hold: int32, a list of numpy scalars
    official[f"{ours[1]['image_id']}.jpg"] = np.array(ours[1]["box"], dtype=np.int32)
    official[f"{ours[3]['image_id']}.jpg"] = [np.int64(v) for v in ours[3]["box"]]
    official["999999.jpg"] = np.array([0, 0, 5, 5])  # an image our run does not have
    path = dump(official, tmp_path / "official.pkl")
    out = tmp_path / "out"

    assert verify.main(cli(setup, path, out, "--expected-sha256", sha(path))) == 0
    printed = capsys.readouterr().out
    assert "3/6 identical boxes" in printed and "SMOKE" in printed

    report = json.loads((out / "report.json").read_text())
    n = len(ours)
    assert report["n_compared"] == n and report["n_identical"] == n - 3
    assert report["n_different"] == 3
    assert report["identical_share"] == (n - 3) / n
    assert report["mean_iou"] == pytest.approx(sum(expected_ious) / n, abs=1e-12)
    assert report["mean_iou"] < 1.0
    assert report["missing_in_ours"] == ["999999"] and report["missing_in_official"] == []
    hits = [line["hit"] for line in ours]
    assert report["corloc"]["ours"] == pytest.approx(100 * sum(hits) / n)
    assert report["corloc"]["ours"] == pytest.approx(setup["result"].corloc)
    assert report["corloc"]["official_predictions"] == pytest.approx(100 * sum(their_hits) / n)
    assert report["corloc"]["published"] == 61.9
    assert report["smoke_run"] is True and report["goal"]["met"] is None
    assert report["official_predictions"]["is_official_file"] is False
    assert report["official_predictions"]["n_entries"] == n + 1
    # the finished run was reused, not recomputed into a second folder
    assert report["run_id"] == setup["result"].run_id
    assert [p.name for p in (setup["base"] / "runs").iterdir()] == [setup["result"].run_id]

    with open(out / "differences.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["image_id"] for row in rows} == set(changed)
    for row in rows:
        mine = next(line["box"] for line in ours if line["image_id"] == row["image_id"])
        assert row["status"] == "different"
        assert [int(row[f"our_{c}"]) for c in ("x1", "y1", "x2", "y2")] == mine
        assert [int(row[f"official_{c}"]) for c in ("x1", "y1", "x2", "y2")] == \
            their_boxes[row["image_id"]]
        assert float(row["iou"]) == pytest.approx(iou(mine, their_boxes[row["image_id"]]),
                                                  abs=1e-6)


def test_limit_and_missing_images(setup, tmp_path) -> None:
    ours = setup["ours"]
    official = {f"{line['image_id']}.jpg": np.array(line["box"]) for line in ours}
    del official[f"{ours[1]['image_id']}.jpg"]
    path = dump(official, tmp_path / "official.pkl")
    out = tmp_path / "out"
    assert verify.main(cli(setup, path, out, "--expected-sha256", sha(path),
                           "--limit", "3")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_ours"] == 3 and report["n_compared"] == 2 and report["n_identical"] == 2
    assert report["missing_in_official"] == [ours[1]["image_id"]]
    assert report["missing_in_ours"] == []  # a partial run does not list the rest
    assert report["mean_iou"] == 1.0 and report["corloc"]["n_images"] == 2
    rows = list(csv.DictReader(open(out / "differences.csv", newline="")))
    assert [(r["image_id"], r["status"], r["official_x1"]) for r in rows] == \
        [(ours[1]["image_id"], "missing_in_official", "")]


def test_wrong_hash_is_refused_before_reading_or_running(setup, tmp_path, capsys) -> None:
    marker = tmp_path / "executed"
    path = dump(Evil(f"touch {marker}"), tmp_path / "official.pkl")
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = cli(setup, path, out)
    argv[argv.index("--runs-dir") + 1] = str(runs)
    assert verify.main(argv) == 2  # no --expected-sha256: the official hash is required
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "sha256" in err
    assert verify.BENCHMARKS["lost-voc07"].sha256 in err and sha(path) in err
    assert not marker.exists() and not runs.exists() and not out.exists()


class Evil:
    """Unpickling this runs ``os.system(command)``, unless the unpickler refuses."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalGadget:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("gadget,name", [(Evil, "system"), (EvalGadget, "builtins.eval")])
def test_forbidden_global_is_refused_and_not_executed(setup, tmp_path, capsys, gadget,
                                                      name) -> None:
    marker = tmp_path / "executed"
    payload = (f"touch {marker}" if gadget is Evil
               else f"open({str(marker)!r}, 'w').close()")
    path = dump({"000005.jpg": np.array([1, 2, 3, 4]), "000007.jpg": gadget(payload)},
                tmp_path / "evil.pkl")
    with pytest.raises(LostregError, match="forbidden global") as info:
        verify.load_official_predictions(path)
    assert str(path) in str(info.value) and name in str(info.value)
    out = tmp_path / "out"
    assert verify.main(cli(setup, path, out, "--expected-sha256", sha(path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "forbidden global" in err and str(path) in err
    assert not marker.exists() and not out.exists()


def test_numpy1_spelling_and_scalars_are_read(tmp_path) -> None:
    """Files written under numpy 1.x name ``numpy.core.multiarray``; protocol 3 spells module
    names as text, so the numpy 2 spelling can be swapped for it."""
    data = {"000005.jpg": np.array([1, 2, 30, 40]), "dir/000007.jpg": [np.int64(5)] * 4,
            "000009.jpg": np.array([0.0, 1.0, 2.0, 3.0])}
    raw = pickle.dumps(data, protocol=3)
    raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    path = tmp_path / "old.pkl"
    path.write_bytes(raw)
    assert verify.load_official_predictions(path) == {
        "000005": [1, 2, 30, 40], "000007": [5, 5, 5, 5], "000009": [0, 1, 2, 3]}


@pytest.mark.parametrize("content,message", [
    ([1, 2, 3], "expected a dict"),
    ({"000005.jpg": np.array([1, 2, 3])}, "'000005.jpg' is not a box"),
    ({"000005.jpg": np.array([1.5, 2, 3, 4])}, "non-integer"),
    ({"000005.jpg": "box"}, "not a box"),
    ({"000005.jpg": np.array([1, 2, 3, 4]), "000005.png": np.array([1, 2, 3, 4])},
     "two entries for image '000005'"),
    ({5: np.array([1, 2, 3, 4])}, "not an image file name"),
])
def test_bad_content_is_a_clear_error(tmp_path, content, message) -> None:
    path = dump(content, tmp_path / "bad.pkl")
    with pytest.raises(LostregError, match=message) as info:
        verify.load_official_predictions(path)
    assert str(path) in str(info.value)


def test_truncated_pickle_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "torn.pkl"
    path.write_bytes(pickle.dumps({"000005.jpg": np.array([1, 2, 3, 4])}, protocol=4)[:-10])
    with pytest.raises(LostregError, match="not a readable predictions pickle"):
        verify.load_official_predictions(path)


def test_download_goes_through_download_file_and_is_sha_checked(setup, tmp_path, monkeypatch,
                                                                 capsys) -> None:
    """Without --predictions the official URL is fetched into the output folder with the
    official sha256, and the hash is checked again before reading (an old file at the
    destination is returned by the downloader as is)."""
    import lostreg.datasets.download as download

    calls = []

    def fake_download(url, dest, sha256=None, progress=True, **_):
        calls.append((url, Path(dest), sha256))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(pickle.dumps({"000005.jpg": np.array([1, 2, 3, 4])}))
        return Path(dest)

    monkeypatch.setattr(download, "download_file", fake_download)
    out = tmp_path / "out"
    argv = cli(setup, Path("unused"), out)
    del argv[argv.index("--predictions"):argv.index("--predictions") + 2]
    assert verify.main(argv) == 2
    benchmark = verify.BENCHMARKS["lost-voc07"]
    assert calls == [(benchmark.url, out / "LOST_VOC07.pkl", benchmark.sha256)]
    assert benchmark.url == ("https://raw.githubusercontent.com/valeoai/LOST/master/"
                             "data/LOST_predictions/LOST_VOC07.pkl")
    err = capsys.readouterr().err
    assert "does not match" in err and str(out / "LOST_VOC07.pkl") in err


def test_missing_predictions_file(setup, tmp_path, capsys) -> None:
    assert verify.main(cli(setup, tmp_path / "nope.pkl", tmp_path / "out")) == 2
    assert "predictions file not found" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_restricted_unpickler_reads_numpy_boxes_in_every_common_protocol(protocol) -> None:
    import io as _io

    from lostreg.verify import _RestrictedUnpickler

    payload = {"000005.jpg": np.array([1, 2, 30, 40]), "000007.jpg": np.array([0, 0, 5, 6])}
    data = pickle.dumps(payload, protocol=protocol)
    loaded = _RestrictedUnpickler(_io.BytesIO(data), Path("p.pkl")).load()
    assert {k: v.tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in payload.items()}


def test_a_line_without_a_box_is_a_miss_and_a_row_of_its_own() -> None:
    """A run finished with ``--max-nonfinite`` above 0 has lines with ``"box": null``: verify
    scores them as misses with IoU 0 against the official box, never a TypeError."""
    gts = [[10, 10, 40, 40]]
    ours = [
        {"image_id": "a", "box": [10, 10, 40, 40], "gt_boxes": gts, "hit": True, "best_iou": 1.0},
        {"image_id": "b", "box": None, "nonfinite": True, "gt_boxes": gts, "hit": False,
         "best_iou": 0.0},
    ]
    official = {"a": [10, 10, 40, 40], "b": [10, 10, 40, 40]}
    result = verify.compare(ours, official, full_set=True)
    assert (result.n_compared, result.n_identical, result.mean_iou) == (2, 1, 0.5)
    assert result.corloc_ours[1:] == (1, 2) and result.corloc_official[1:] == (2, 2)
    assert [(row["image_id"], row["status"], row["iou"]) for row in result.rows] == \
        [("b", "no_box_nonfinite_features", 0.0)]
    rows = list(csv.DictReader(verify.differences_csv(result.rows).splitlines()))
    assert (rows[0]["our_x1"], rows[0]["official_x1"], rows[0]["our_hit"]) == ("", "10", "False")

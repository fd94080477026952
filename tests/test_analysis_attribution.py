"""Failure attribution on a hand-made run folder with known seeds, boxes and outlier maps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from fake_methods import fake_method_registered

from lostreg.analyze import main
from lostreg.errors import LostregError
from lostreg.reports.analysis.attribution import attribute_run
from lostreg.reports.analysis.store import TokenMaps

P = 16
# image_id: (height, width, seed [row, col], box, hit, outlier cells)
IMAGES = {
    "A": (48, 64, [1, 1], [0, 0, 32, 32], False, [(1, 1)]),     # seed is an outlier, box covers it
    "B": (48, 64, [0, 0], [32, 32, 64, 48], False, [(1, 0)]),   # seed next to one, box elsewhere
    "C": (32, 32, [0, 0], [0, 0, 32, 32], True, [(1, 1)]),      # diagonal: not touching; box covers
    "D": (40, 50, [2, 3], [0, 0, 50, 40], True, []),            # 3x4 grid (padded), no outliers
    "E": (48, 64, [0, 0], [0, 0, 16, 16], False, []),
}


def grid_of(height: int, width: int) -> tuple[int, int]:
    return -(-height // P), -(-width // P)


def make_run(root: Path, model: str = "tiny_handmade", name: str = "run",
             method: dict | None = None, hits: dict[str, bool] | None = None,
             seedless: bool = False, drop: str | None = None, k_patches: int = 100) -> Path:
    """A run folder; ``method``: config.json's method keys (none: a pre-registry LOST run),
    ``hits``: override the hit of some images, ``seedless``: every seed null, ``drop``: an
    image the run did not predict."""
    run = root / name
    run.mkdir(parents=True)
    weights = {"source": "random", "path": None, "sha256": None, "hub_id": None}
    (run / "config.json").write_text(json.dumps({
        "run_id": f"smoke-demo-handmade-{name}", "model": model, "patch_size": P,
        "dataset": "demo", "weights": weights, "feature": "k", "k_patches": k_patches,
        "gram_bias": 0.0, "smoke_run": True, "settings": {"data_root": str(root / "data")},
        **(method or {})}))
    lines = []
    for image_id, (h, w, seed, box, hit, _) in IMAGES.items():
        if image_id == drop:
            continue
        hit = (hits or {}).get(image_id, hit)
        lines.append(json.dumps({"image_id": image_id, "file": f"{image_id}.jpg", "width": w,
                                 "height": h, "box": box, "seed": None if seedless else seed,
                                 "gt_boxes": [], "best_iou": 0.7 if hit else 0.1, "hit": hit,
                                 "weights": "random"}))
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    (run / "metrics.json").write_text("{}")
    return run


def make_norms(root: Path, model: str = "tiny_handmade", skip: str | None = None,
               grid_override: dict | None = None) -> Path:
    """norms.json + tokens.npz: norm 10 everywhere, 100 on the outlier cells, threshold 50."""
    ids, grids, norms, sims = [], [], [], []
    for image_id, (h, w, _, _, _, cells) in IMAGES.items():
        if image_id == skip:
            continue
        rows, cols = (grid_override or {}).get(image_id, grid_of(h, w))
        values = np.full((rows, cols), 10.0)
        for r, c in cells:
            values[r, c] = 100.0
        ids.append(image_id)
        grids.append((rows, cols))
        norms.append(values.ravel())
        sims.append(np.zeros(rows * cols))
    folder = root / "norms"
    folder.mkdir(parents=True, exist_ok=True)
    TokenMaps.from_images(ids, grids, {5: norms}, sims).save(folder / "tokens.npz")
    (folder / "norms.json").write_text(json.dumps({
        "kind": "lostreg-norms", "model": model, "dataset": "demo", "primary_layer": 5,
        "threshold": 50.0, "threshold_source": "auto", "tokens_file": "tokens.npz",
        "weights": {"source": "random", "path": None, "sha256": None, "hub_id": None}}))
    return folder / "norms.json"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_attribution_table_on_a_handmade_run(tmp_path) -> None:
    run = make_run(tmp_path)
    result = attribute_run(run, make_norms(tmp_path))
    rows = {row["image_id"]: row for row in result.rows}
    flags = {k: (r["has_outliers"], r["seed_is_outlier"], r["seed_touches_outlier"],
                 r["box_has_outlier"]) for k, r in rows.items()}
    assert flags == {"A": (True, True, True, True), "B": (True, False, True, False),
                     "C": (True, False, False, True), "D": (False, False, False, False),
                     "E": (False, False, False, False)}
    assert rows["A"]["seed_norm"] == 100.0 and rows["B"]["seed_norm"] == 10.0
    assert rows["D"]["n_tokens"] == 12 and rows["C"]["outlier_share"] == 0.25
    summary = {row["group"]: row for row in result.summary}
    everything = summary["all images"]
    assert (everything["n_images"], everything["n_hits"]) == (5, 2)
    assert everything["corloc"] == pytest.approx(40.0)
    assert everything["seed_is_outlier_pct"] == pytest.approx(20.0)
    assert everything["seed_touches_outlier_pct"] == pytest.approx(40.0)
    assert everything["box_has_outlier_pct"] == pytest.approx(40.0)
    with_outliers = summary["image has outliers"]
    assert (with_outliers["n_images"], with_outliers["n_hits"]) == (3, 1)
    assert with_outliers["corloc"] == pytest.approx(100 / 3)
    assert with_outliers["mean_outlier_share_pct"] == pytest.approx(100 * 5 / 36)
    assert summary["image has none"]["corloc"] == pytest.approx(50.0)
    assert summary["seed on/next to an outlier"]["corloc"] == pytest.approx(0.0)
    assert summary["seed away from outliers"]["corloc"] == pytest.approx(200 / 3)

    analysis = run / "analysis"
    per_image = read_csv(analysis / "attribution.csv")
    assert [r["image_id"] for r in per_image] == list(IMAGES)
    assert [r["seed_touches_outlier"] for r in per_image] == ["true", "true", "false", "false",
                                                             "false"]
    table = read_csv(analysis / "attribution_summary.csv")
    assert table[1]["group"] == "image has outliers" and float(table[1]["corloc"]) == \
        pytest.approx(100 / 3)
    assert table[2]["seed_is_outlier_pct"] == "0"
    markdown = (analysis / "attribution.md").read_text()
    assert "| image has outliers | 3 | 1 | 33.3 | 33.3 | 66.7 | 66.7 | 13.9 |" in markdown
    assert "SMOKE RUN" in markdown
    saved = json.loads((analysis / "attribution.json").read_text())
    assert saved["threshold"] == 50.0 and saved["summary"] == json.loads(
        json.dumps(result.summary))


def test_threshold_override_and_empty_groups(tmp_path) -> None:
    result = attribute_run(make_run(tmp_path), make_norms(tmp_path), threshold=500.0)
    summary = {row["group"]: row for row in result.summary}
    assert summary["image has none"]["n_images"] == 5
    assert summary["image has outliers"]["n_images"] == 0
    assert summary["image has outliers"]["corloc"] is None
    markdown = (tmp_path / "run" / "analysis" / "attribution.md").read_text()
    assert "| image has outliers | 0 | 0 | – |" in markdown


def test_unimodal_norms_mean_no_outliers(tmp_path) -> None:
    norms = make_norms(tmp_path)
    payload = json.loads(norms.read_text())
    payload["threshold"] = None
    norms.write_text(json.dumps(payload))
    result = attribute_run(make_run(tmp_path), norms)
    assert not any(row["has_outliers"] for row in result.rows)
    assert "none (unimodal" in result.markdown


def test_bad_inputs_name_the_problem(tmp_path, capsys) -> None:
    run = make_run(tmp_path)
    other = make_norms(tmp_path / "other", model="some_other_model")
    assert main(["attribution", "--run", str(run), "--norms", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "norms.json" in err and "some_other_model" in err
    with pytest.raises(LostregError, match="'C'.*no token map"):
        attribute_run(run, make_norms(tmp_path / "skip", skip="C"))
    with pytest.raises(LostregError, match="grid"):
        attribute_run(run, make_norms(tmp_path / "grid", grid_override={"A": (4, 4)}))
    assert main(["attribution", "--run", str(tmp_path / "nowhere")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (run / "predictions.jsonl").write_text('{"image_id": "A", "seed": [0]}\n')
    with pytest.raises(LostregError, match="predictions.jsonl: line 1"):
        attribute_run(run, make_norms(tmp_path / "again"))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("seed", [True, 0], "seed must be [row, col] integers or null, got [True, 0]"),
    ("box", [False, 0, 32, 32], "box must be [x1, y1, x2, y2], got [False, 0, 32, 32]")])
def test_a_boolean_in_a_seed_or_box_is_one_line(key, value, expected, tmp_path,
                                                capsys) -> None:
    """JSON's true/false are Python ints: a seed or box holding one is refused, not read as
    patch 1/0."""
    run = make_run(tmp_path)
    lines = (run / "predictions.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), key: value})
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["attribution", "--run", str(run), "--norms", str(make_norms(tmp_path))]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {run / 'predictions.jsonl'}: line 2: {expected}"]
    assert not (run / "analysis").exists()


FAKE = {"method": "fake_top", "method_params": {"fake_level": 0.0}}


def test_a_seedless_method_leaves_the_seed_columns_empty(tmp_path) -> None:
    with fake_method_registered():
        result = attribute_run(make_run(tmp_path, method=FAKE, seedless=True),
                               make_norms(tmp_path))
    rows = {row["image_id"]: row for row in result.rows}
    for row in rows.values():
        assert [row[k] for k in ("seed_row", "seed_col", "seed_norm", "seed_is_outlier",
                                 "seed_touches_outlier")] == [None] * 5
    # the box columns do not need a seed
    assert [rows[k]["box_has_outlier"] for k in "ABCDE"] == [True, False, True, False, False]
    summary = {row["group"]: row for row in result.summary}
    assert summary["all images"]["n_images"] == 5
    assert summary["all images"]["seed_is_outlier_pct"] is None
    assert summary["all images"]["box_has_outlier_pct"] == pytest.approx(40.0)
    assert summary["seed on/next to an outlier"]["n_images"] == 0
    assert summary["seed away from outliers"]["n_images"] == 0
    per_image = read_csv(tmp_path / "run" / "analysis" / "attribution.csv")
    assert per_image[0]["seed_row"] == "" and per_image[0]["box_has_outlier"] == "true"
    assert "| all images | 5 | 2 | 40.0 | – | – | 40.0 | 8.3 |" in result.markdown
    assert "FakeTop failure attribution" in result.markdown and "no seed" in result.markdown
    saved = json.loads((tmp_path / "run" / "analysis" / "attribution.json").read_text())
    assert saved["method"] == "fake_top" and saved["method_params"] == {"fake_level": 0.0}


def test_hits_table_says_which_runs_found_each_object(tmp_path, capsys) -> None:
    # hits per image A..E: LOST k=100 (the IMAGES table) F F T T F; fake_top T F T F F;
    # LOST k=5 F F T T and no prediction for E
    runs = [make_run(tmp_path, name="lost100"),
            make_run(tmp_path, name="fake", method=FAKE, seedless=True,
                     hits={"A": True, "D": False}),
            make_run(tmp_path, name="lost5", drop="E", k_patches=5)]
    out = tmp_path / "hits"
    with fake_method_registered():
        assert main(["attribution", "--run", *map(str, runs), "--hits-only", "--output",
                     str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 images predicted by every run (1 more left out" in printed
    table = read_csv(out / "hits.csv")
    assert list(table[0]) == [
        "image_id", "hit_lost_k_patches=100", "hit_fake_top", "hit_lost_k_patches=5",
        "best_iou_lost_k_patches=100", "best_iou_fake_top", "best_iou_lost_k_patches=5",
        "n_found", "found_by"]
    assert [(r["image_id"], r["hit_lost_k_patches=100"], r["hit_fake_top"],
             r["hit_lost_k_patches=5"], r["n_found"]) for r in table] == [
        ("A", "false", "true", "false", "1"), ("B", "false", "false", "false", "0"),
        ("C", "true", "true", "true", "3"), ("D", "true", "false", "true", "2")]
    assert table[3]["found_by"] == "lost k_patches=100;lost k_patches=5"
    assert table[1]["found_by"] == "" and table[0]["best_iou_fake_top"] == "0.7"
    summary = {r["group"]: (int(r["n_images"]), float(r["pct"]))
               for r in read_csv(out / "hits_summary.csv")}
    assert summary == {
        "found by all 3 runs": (1, 25.0), "found by none": (1, 25.0),
        "found by some, not all": (2, 50.0), "found only by lost k_patches=100": (0, 0.0),
        "found only by fake_top": (1, 25.0), "found only by lost k_patches=5": (0, 0.0),
        "found by lost k_patches=100 (CorLoc)": (2, 50.0),
        "found by fake_top (CorLoc)": (2, 50.0), "found by lost k_patches=5 (CorLoc)": (2, 50.0)}
    markdown = (out / "hits.md").read_text()
    assert "| found only by fake_top | 1 | 25.0 |" in markdown and "SMOKE RUN" in markdown
    listed = json.loads((out / "runs.json").read_text())
    assert [(r["label"], r["column"], r["method"]) for r in listed] == [
        ("lost k_patches=100", "hit_lost_k_patches=100", "lost"),
        ("fake_top", "hit_fake_top", "fake_top"),
        ("lost k_patches=5", "hit_lost_k_patches=5", "lost")]
    assert not (runs[0] / "analysis").exists()  # --hits-only: no per-run attribution


def test_several_runs_refuse_what_cannot_be_compared(tmp_path, capsys) -> None:
    run = make_run(tmp_path)
    assert main(["attribution", "--run", str(run), "--hits-only"]) == 2
    assert "at least two" in capsys.readouterr().err
    other = make_run(tmp_path, name="other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "dataset": "voc07"}))
    assert main(["attribution", "--run", str(run), str(other), "--hits-only"]) == 2
    err = capsys.readouterr().err
    assert "other/config.json: dataset 'voc07'" in err and "same images" in err
    unknown = make_run(tmp_path, name="unknown", method={"method": "no_such_method"})
    assert main(["attribution", "--run", str(run), str(unknown), "--hits-only"]) == 2
    assert "method 'no_such_method' is not known" in capsys.readouterr().err
    bad = make_run(tmp_path, name="bad", method={"method": "lost",
                                                 "method_params": {"k_patches": 0}})
    assert main(["attribution", "--run", str(bad), str(run), "--hits-only"]) == 2
    assert "bad/config.json: --k-patches 0: must be at least 1" in capsys.readouterr().err


# --- how many images an unfinished run's marks count it out of (issue 20 follow-up) ----------


def identity(**values) -> dict:
    return {"identity": {"dataset": "voc07", "no_hard": False, "limit": None, **values}}


@pytest.mark.parametrize(("config", "total"), [
    (identity(), 5011),                                # the benchmark split, checked complete
    (identity(dataset="coco20k"), 19817),
    (identity(dataset="ecssd"), 1000),
    (identity(limit=12), 12),                          # --limit: exactly the first 12
    (identity(dataset_images=40), 40),                 # a partial dataset, recorded
    (identity(dataset_images=40, limit=7), 7),
    (identity(no_hard=True), None),                    # --no-hard: smaller, not recorded
    (identity(no_hard=True, limit=9), 9),
    (identity(dataset="demo"), None),                  # no benchmark count
    ({"dataset": "voc07"}, None),                      # no identity: never a guess
])
def test_the_total_of_an_unfinished_run_comes_from_its_identity(config, total, tmp_path) -> None:
    from lostreg.reports.analysis.runs import split_images

    assert split_images(config, tmp_path / "config.json") == total


@pytest.mark.parametrize("values", [{"limit": "12"}, {"dataset_images": -3},
                                    {"dataset_images": True}])
def test_a_bad_count_in_an_unfinished_run_identity_is_one_line(values, tmp_path,
                                                                capsys) -> None:
    run = make_run(tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **identity(**values)}))
    (run / "metrics.json").unlink()
    assert main(["attribution", "--run", str(run), "--norms", str(make_norms(tmp_path))]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {run / 'config.json'} (identity): '")
    assert not (run / "analysis").exists()


def test_an_unfinished_run_without_a_known_total_gives_its_count_alone(tmp_path) -> None:
    run = make_run(tmp_path, drop="E")  # a hand-made folder: no identity
    (run / "metrics.json").unlink()
    attribute_run(run, make_norms(tmp_path))
    words = ("UNFINISHED RUN: 4 images predicted when analysed (no metrics.json yet); not the "
             "run's result")
    assert f"**{words}.**" in (run / "analysis" / "attribution.md").read_text()
    saved = json.loads((run / "analysis" / "attribution.json").read_text())
    assert saved["unfinished_run"] == {"images_predicted": 4, "split_images": None,
                                       "note": words}

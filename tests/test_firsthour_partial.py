"""Issue #21 row 3: a run on a partial dataset (``--allow-partial-dataset``) is marked as a
``--limit`` run is, in its line, its folder name, every table and every figure, and never sits
in a column beside a published figure.

Folders written before the mark keep their names: ``lostreg.runs.legacy.earlier_run_ids``
finds them, and rerunning one changes no byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from figure_checks import drawn_texts, svg_says
from run_folders import pair_hits, write_run

from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets.demo import generate_demo
from lostreg.reports import leaderboard as lb
from lostreg.reports.leaderboard.markdown import comparison_markdown
from lostreg.run import main
from lostreg.runs.folder import make_run_id, settings_label

SPEC = BackboneSpec("tiny_partial", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=2, embed_dim=48, num_heads=6))
IDENTITY = {"lostreg_version": "0.1.0", "model": "dino_vits16", "dataset": "voc07",
            "feature": "k", "k_patches": 100, "gram_bias": 0.0}
SUBSET_SECTION = "## Runs on part of a dataset (not comparable with published figures)"


def figure_says(figure, words: str) -> bool:
    """Whether a drawn text of ``figure`` says ``words``, across the line breaks of wrapping."""
    return any(words in " ".join(text.get_text().split()) for text, _ in drawn_texts(figure))


@pytest.fixture
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield SPEC
    BACKBONES.pop(SPEC.name, None)


def test_the_folder_name_says_partial_and_full_runs_keep_their_names() -> None:
    assert settings_label(IDENTITY) == "lost-keys"
    partial = {**IDENTITY, "dataset_images": 12}
    assert settings_label(partial) == "lost-keys-partial12"
    assert settings_label(partial, mark_partial=False) == "lost-keys"
    assert make_run_id(partial, False).startswith("voc07-dino_vits16-lost-keys-partial12-")
    # the mark is in the readable name only: the hash (and so the identity) is unchanged
    assert make_run_id(partial, False)[-10:] == make_run_id(partial, False, False)[-10:]


def partial_voc07(root: Path) -> None:
    """``root/data/VOC2007``: the 24 demo scenes in VOC format, a partial VOC07."""
    demo = generate_demo(root / "data")
    demo.rename(demo.parent / "VOC2007")


def run_partial(root: Path) -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", "voc07",
            "--data-root", str(root / "data"), "--runs", str(root / "runs"), "--num-workers",
            "0", "--no-progress", "--no-download", "--allow-partial-dataset", "--limit", "3"]


def test_a_partial_run_says_so_in_its_line_and_name_and_an_older_folder_is_reused(
        tmp_path, tiny_model, capsys) -> None:
    partial_voc07(tmp_path)
    assert main(run_partial(tmp_path)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert " limit=3 partial=24/5011 |" in line
    assert line.endswith("[SMOKE RUN (weights: random): not a result, never enters the "
                         "leaderboard]  [partial dataset (24 of 5011 images): not comparable "
                         "with published figures]")
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith(f"smoke-voc07-{SPEC.name}-lost-keys-partial24-")
    before = (folder / "predictions.jsonl").read_bytes()
    # a folder written before the mark existed: the same run under its unmarked name
    older = folder.with_name(folder.name.replace("-partial24", ""))
    folder.rename(older)
    assert main(run_partial(tmp_path)) == 0
    assert f"already finished: {older}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [older.name]
    assert (older / "predictions.jsonl").read_bytes() == before


def partial_runs(root: Path) -> Path:
    """A DINO ViT-S/16 LOST run on a 12-image VOC07 (which LOST published: 61.9), a full
    one, and a register pair on the 12 images."""
    runs = root / "runs"
    hits = [True] * 5 + [False] * 7
    for name, model, timm_name, images in (
            ("partial", "dino_vits16", "vit_small_patch16_224.dino", 12),
            ("full", "dino_vits16", "vit_small_patch16_224.dino", None)):
        folder = write_run(runs, name, hits, model=model, timm_name=timm_name, family="dino")
        if images is not None:
            config = json.loads((folder / "config.json").read_text())
            config["identity"]["dataset_images"] = images
            (folder / "config.json").write_text(json.dumps(config))
    base, other = pair_hits(3, 1, 2, 6)
    for name, extra in (("pair-base", {}), ("pair-reg", {"model": "dinov2_vits14_reg4",
                        "timm_name": "vit_small_patch14_reg4_dinov2.lvd142m", "registers": 4})):
        folder = write_run(runs, name, base if not extra else other, **extra)
        config = json.loads((folder / "config.json").read_text())
        config["identity"]["dataset_images"] = 12
        (folder / "config.json").write_text(json.dumps(config))
    return runs


def test_tables_mark_a_partial_run_and_keep_it_from_the_published_columns(tmp_path) -> None:
    board = lb.collect(partial_runs(tmp_path))
    table = board.table.set_index("run_id")
    assert table.loc["partial", "dataset_images"] == 12
    assert table.loc["full", "dataset_images"] is lb.pd.NA or \
        lb.pd.isna(table.loc["full", "dataset_images"])
    text = comparison_markdown(board)
    blocks, subsets = text.split(SUBSET_SECTION)
    lost_block = blocks.split("## LOST", 1)[1].split("\n## ", 1)[0]
    assert "| published: lost |" in lost_block  # the published 61.9 ...
    assert "partial" not in lost_block  # ... never beside the 12-image run
    subset_rows = [row for row in subsets.split("\n## ", 1)[0].splitlines()
                   if row.startswith("| LOST")]
    assert len(subset_rows) == 2, subset_rows  # the single run and the register pair
    assert all("partial dataset: 12 of 5011 images" in row for row in subset_rows)
    assert any("41.7 [" in row for row in subset_rows)  # 5 of 12, with its interval
    # the pair's statistics say on what images
    statistics = text.split("## Paired statistics (ours)", 1)[1]
    assert "partial dataset: 12 of 5011 images" in statistics


def test_a_partial_run_never_pairs_with_a_full_one(tmp_path) -> None:
    runs = tmp_path / "runs"
    base, other = pair_hits(3, 1, 2, 6)
    write_run(runs, "base", base)
    folder = write_run(runs, "reg", other, model="dinov2_vits14_reg4",
                       timm_name="vit_small_patch14_reg4_dinov2.lvd142m", registers=4)
    config = json.loads((folder / "config.json").read_text())
    config["identity"]["dataset_images"] = 12
    (folder / "config.json").write_text(json.dumps(config))
    pairs, _ = lb.find_pairs(lb.collect(runs).runs)
    assert pairs == []


def test_figures_of_a_partial_run_say_so(tmp_path) -> None:
    board = lb.collect(partial_runs(tmp_path))
    partial = next(run for run in board.runs if run.run_id == "partial")
    assert svg_says(lb.iou_svg(partial), "partial dataset: 12 of 5011 images")
    assert not svg_says(lb.iou_svg(next(r for r in board.runs if r.run_id == "full")),
                        "partial")
    assert figure_says(lb.register_bar_figure(board.comparison), "partial dataset")

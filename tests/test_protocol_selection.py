"""Selection on a grid of settings (best-of, split-half, cross-dataset), the grid itself, the
matrix bootstrap and protocol.csv read back: hand-made inputs with known answers, no model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lostreg.errors import LostregError
from lostreg.evaluation import stats
from lostreg.reports.protocol.grid import GridPoint, ProtocolGrid, parse_biases, pass_configs
from lostreg.reports.protocol.selection import (
    best_of_grid,
    cross_dataset,
    setting_corloc,
    split_half,
)
from lostreg.reports.protocol.table import bootstrap_cis, protocol_csv, read_protocol_csv
from lostreg.runs.config import RunConfig


def columns(*hit_lists: list[int]) -> np.ndarray:
    """A hits matrix from one list of 0/1 per setting (images down, settings across)."""
    return np.array(hit_lists, dtype=bool).T


# --- best of grid ------------------------------------------------------------------------------


def test_best_of_grid_takes_the_highest_corloc_and_the_first_of_equals() -> None:
    hits = columns([1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1])
    assert setting_corloc(hits).tolist() == [50.0, 75.0, 75.0, 25.0]
    best = best_of_grid(hits)
    assert (best.index, best.corloc) == (1, 75.0)  # settings 1 and 2 tie: grid order decides


def test_selection_refuses_what_it_cannot_score() -> None:
    with pytest.raises(LostregError, match="no images"):
        best_of_grid(np.zeros((0, 3), dtype=bool))
    with pytest.raises(ValueError, match="0/1"):
        best_of_grid(np.array([[0, 2]]))
    with pytest.raises(LostregError, match="at least 2 images"):
        split_half(columns([1], [0]))


# --- split half ------------------------------------------------------------------------------


def test_a_setting_that_wins_everywhere_has_no_optimism() -> None:
    """Setting 2 hits every image, the others a fixed few: every half chooses it."""
    hits = columns([1, 0, 1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1], [1] * 8)
    result = split_half(hits, n_splits=20, seed=3)
    assert result.chosen.tolist() == [2] * 20
    assert result.held_out.tolist() == [100.0] * 20
    assert result.optimism.tolist() == [0.0] * 20
    assert result.times_chosen() == {2: 20}
    assert (result.n_select, result.n_score) == (4, 4)


def test_split_half_on_complementary_settings_is_pure_optimism() -> None:
    """Setting 0 hits images 0-3, setting 1 hits 4-7: whichever half selects, the other half's
    in-sample best is the setting that hits more of *its* images. Expected values computed
    here image by image, from the documented split convention (``rng.permutation(n)`` of one
    ``default_rng(seed)`` stream, first ``n // 2`` select)."""
    hits = columns([1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
    result = split_half(hits, n_splits=6, seed=11)
    rng = np.random.default_rng(11)
    for split in range(6):
        order = rng.permutation(8)
        select, score = set(order[:4].tolist()), set(order[4:].tolist())
        in_select = [len(select & {0, 1, 2, 3}), len(select & {4, 5, 6, 7})]
        in_score = [len(score & {0, 1, 2, 3}), len(score & {4, 5, 6, 7})]
        chosen = 0 if in_select[0] >= in_select[1] else 1
        assert result.chosen[split] == chosen
        assert result.held_out[split] == 100.0 * in_score[chosen] / 4
        assert result.in_sample[split] == 100.0 * max(in_score) / 4
    # the two halves hold complementary counts, so the chosen setting is the scoring half's
    # worse one whenever the counts differ: optimism is never negative, and positive here
    assert (result.optimism >= 0).all() and result.optimism.mean() > 0


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_split_half_properties(n_images: int, n_settings: int, seed: int) -> None:
    hits = np.random.default_rng(seed).random((n_images, n_settings)) < 0.5
    result = split_half(hits, n_splits=5, seed=seed)
    assert (result.optimism >= -1e-12).all()
    assert result.n_select + result.n_score == n_images
    if n_settings == 1:
        assert (result.optimism == 0).all() and (result.chosen == 0).all()
    again = split_half(hits, n_splits=5, seed=seed)
    assert np.array_equal(result.held_out, again.held_out)  # seeded: repeatable


# --- cross dataset ---------------------------------------------------------------------------


def test_cross_dataset_chooses_on_one_dataset_and_scores_on_the_other() -> None:
    target = columns([1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0])  # 80, 40, 60
    choice = cross_dataset(np.array([50.0, 70.0, 60.0]), target)
    assert (choice.index, choice.selected_on, choice.held_out) == (1, 70.0, 40.0)
    assert (choice.best.index, choice.best.corloc) == (0, 80.0)
    assert choice.optimism == 40.0
    tie = cross_dataset(np.array([70.0, 70.0, 10.0]), target)
    assert (tie.index, tie.held_out) == (0, 80.0)  # ties on the selection set: grid order
    with pytest.raises(ValueError, match="2 selection scores for 3 settings"):
        cross_dataset(np.array([1.0, 2.0]), target)


# --- the grid --------------------------------------------------------------------------------


def test_default_grid_is_the_issues_144_settings() -> None:
    grid = ProtocolGrid()
    points = grid.points()
    assert len(points) == len(set(points)) == 144
    l2 = sorted({p.gram_bias for p in points if p.normalize == "l2"}, reverse=True)
    assert l2 == [0.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8, -0.9, -1.0]
    assert {p.gram_bias for p in points if p.normalize == "none"} == {0.0}
    assert all(str(p.gram_bias) != "-0.0" for p in points)  # -0.0 would hash to another run id
    assert {(p.feature, p.layer) for p in points} == {
        (f, layer) for f in "qkv" for layer in (-1, -2, -3, -4)}
    assert parse_biases("-0, -0.5", "--bias-l2") == (0.0, -0.5)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(features=()), "--features: the grid needs at least one value"),
    (dict(layers=(-1, -1)), "--layers: a value is listed twice"),
    (dict(biases=(("l3", (0.0,)),)), "--normalize 'l3'"),
    (dict(biases=(("l2", (0.0, -0.0)),)), "need distinct values"),
    (dict(pos_interps=("bilinear",)), "--pos-interp 'bilinear'"),
    (dict(k_patches=0), "--k-patches 0"),
])
def test_a_grid_that_cannot_run_is_one_line(kwargs, needle) -> None:
    with pytest.raises(LostregError, match=None) as info:
        ProtocolGrid(**kwargs)
    assert needle in str(info.value)


def test_pass_configs_are_lostreg_run_sweeps_of_every_point(tmp_path) -> None:
    base = RunConfig(model="m", dataset="demo", output=tmp_path, method="tokencut",
                     method_params={"tau": 0.3}, gram_bias=0.5, k_patches=7, pos_interp="timm")
    grid = ProtocolGrid()
    configs = pass_configs(base, grid)
    got = {GridPoint(c.pos_interp, c.normalize, c.features, c.layer, c.gram_bias)
           for c in configs}
    assert len(configs) == 144
    assert got == {dataclasses.replace(p, pos_interp="timm") for p in grid.points()}
    assert all(c.method == "lost" and c.method_params == {} and c.k_patches == 100
               for c in configs)


# --- the matrix bootstrap and protocol.csv ----------------------------------------------------


@pytest.mark.parametrize(("n_images", "n_settings"), [(1, 2), (37, 5), (4500, 3)])
def test_matrix_bootstrap_equals_stats_per_setting(n_images, n_settings) -> None:
    """(4500 images: the resamples come in several chunks.)"""
    hits = np.random.default_rng(n_images).random((n_images, n_settings)) < 0.4
    cis = bootstrap_cis(hits)
    for j in range(n_settings):
        assert tuple(cis[j]) == stats.bootstrap_corloc_ci(hits[:, j])


def table(rows: int = 3) -> pd.DataFrame:
    points = ProtocolGrid(features=("k",), layers=(-1,), biases=(("l2", (0.0, -0.1, -0.2)),)
                          ).points()[:rows]
    hits = [1, 2, 3][:rows]
    return pd.DataFrame([{
        "model": "m", "registers": 0, "test_time_registers": 0, "dataset": "voc07",
        "split": "trainval", "pos_interp": p.pos_interp,
        "normalize": p.normalize, "feature": p.feature, "layer": p.layer,
        "gram_bias": p.gram_bias, "k_patches": 100, "n_images": 4, "n_hits": h,
        "corloc": 25.0 * h, "ci_low": 0.0, "ci_high": 100.0, "run_id": f"run{i}",
        "smoke": False} for i, (p, h) in enumerate(zip(points, hits, strict=True))])


def test_protocol_csv_reads_back_what_was_written(tmp_path) -> None:
    path = tmp_path / "protocol.csv"
    path.write_text(protocol_csv(table()))
    frame = read_protocol_csv(path)
    assert frame["corloc"].tolist() == [25.0, 50.0, 75.0]
    assert frame["gram_bias"].tolist() == [0.0, -0.1, -0.2]
    assert frame["layer"].tolist() == [-1, -1, -1] and not frame["smoke"].any()


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda f: f.drop(columns="n_hits"), "missing column(s) n_hits"),
    (lambda f: f.assign(n_hits=[1, 9, 3]), "row 3, columns 'n_hits', 'n_images': 9 hits of 4"),
    (lambda f: f.assign(corloc=[25.0, 51.0, 75.0]),
     "row 3, column 'corloc': 51.0 is not 100 * n_hits"),
    (lambda f: f.assign(layer=["-1", "x", "-1"]), "row 3, column 'layer': 'x' is not a whole"),
    (lambda f: f.assign(normalize=["l2", "L2", "l2"]),
     "row 3, column 'normalize': 'L2' is not one of none, l2"),
    (lambda f: f.assign(smoke=["False", "yes", "False"]),
     "row 3, column 'smoke': 'yes' is not one of True, False"),
    (lambda f: f.assign(gram_bias=[0.0, 0.0, -0.2], n_hits=[1, 1, 3],
                        corloc=[25.0, 25.0, 75.0]), "appears twice"),
    (lambda f: f.assign(dataset=["voc07", "voc12", "voc07"]), "'dataset' differs"),
    (lambda f: f.assign(ci_high=[100.0, 40.0, 100.0]), "outside its interval"),
])
def test_a_damaged_protocol_csv_is_one_line_naming_file_and_row(tmp_path, edit, needle) -> None:
    path = tmp_path / "protocol.csv"
    path.write_text(edit(table()).to_csv(index=False))
    with pytest.raises(LostregError) as info:
        read_protocol_csv(path)
    assert str(path) in str(info.value) and needle in str(info.value)

"""Issue #21 row 8: each method declares the feature kinds it reads, and an unfit method/feature
pair is one line, by the same rule for one method or several.

The rule (``lostreg.runs.grid._features_for``): each method runs on the kinds of ``--features``
it reads; a method that reads none of them is one line naming it; a kind that no method of the
command reads is one line naming it. Without ``--features`` each method reads its default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lostreg.errors import LostregError
from lostreg.features.extract import FEATURE_KINDS, FeatureKind, register_feature_kind
from lostreg.methods import METHODS, get_method
from lostreg.methods.registry import MethodOutput, MethodSpec, register_method
from lostreg.run import main
from lostreg.runs.checks import accepted_features, check_config
from lostreg.runs.config import RunConfig
from lostreg.runs.grid import expand_sweep

# what LOST and TokenCut read: every embedding kind (q, k, v, their RoPE forms, a plug-in
# model's own features), never attn
EMBEDDINGS = "/".join(accepted_features(get_method("lost")))


def pairs(methods: list[str], features: list[str] | None) -> list[tuple[str, str | None]]:
    return [(c.method, c.features)
            for c in expand_sweep(RunConfig(), methods=methods, features=features)]


def test_lost_and_tokencut_read_embeddings_never_the_attention_weights() -> None:
    for name in ("lost", "tokencut"):
        kinds = accepted_features(get_method(name))
        assert {"q", "k", "v", "q_rope", "k_rope"} <= set(kinds)
        assert "attn" not in kinds
    assert accepted_features(get_method("dinoseg")) == ("attn",)


def test_every_feature_kind_is_read_by_some_method() -> None:
    """A kind no registered method reads could only ever be an error."""
    for kind in FEATURE_KINDS:
        assert any(kind in accepted_features(spec) for spec in METHODS.values()), kind


@pytest.mark.parametrize(("methods", "features", "needle"), [
    # one method: the pair that used to score LOST on attention weights silently (CorLoc 0)
    (["lost"], ["attn"], f"--method lost reads {EMBEDDINGS}, not --features attn"),
    (["tokencut"], ["attn"], f"--method tokencut reads {EMBEDDINGS}, not --features attn"),
    (["dinoseg"], ["k"], "--method dinoseg reads attn, not --features k"),
    # several methods: the one that reads none of the kinds is named (it used to run DINO-seg
    # on attn without a word)
    (["lost", "dinoseg"], ["k"], "--method dinoseg reads attn, none of --features k"),
    (["dinoseg", "lost"], ["k", "v"], "--method dinoseg reads attn, none of --features k,v"),
    # a kind that no method of the command reads is never dropped quietly
    (["lost"], ["k", "attn"], f"--method lost reads {EMBEDDINGS}, not --features attn"),
    (["lost", "tokencut"], ["k", "attn"], "--features attn: no method of --method lost,tokencut"),
])
def test_an_unfit_pair_is_one_line(methods, features, needle) -> None:
    with pytest.raises(LostregError) as caught:
        pairs(methods, features)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_each_method_runs_on_the_listed_kinds_it_reads() -> None:
    assert pairs(["lost", "dinoseg"], ["k", "attn"]) == [("lost", "k"), ("dinoseg", "attn")]
    assert pairs(["lost", "tokencut", "dinoseg"], ["k", "v", "attn"]) == [
        ("lost", "k"), ("lost", "v"), ("tokencut", "k"), ("tokencut", "v"), ("dinoseg", "attn")]
    assert pairs(["tokencut"], ["k_rope"]) == [("tokencut", "k_rope")]


def test_without_features_each_method_reads_its_default() -> None:
    assert pairs(["lost", "tokencut", "dinoseg"], None) == [
        ("lost", None), ("tokencut", None), ("dinoseg", None)]


def test_a_single_config_is_checked_the_same_way() -> None:
    """``run_benchmark``/``run_sweep`` take configs as given: ``check_config`` holds the rule."""
    with pytest.raises(LostregError, match=f"--method lost reads {EMBEDDINGS}, not --features attn"):
        check_config(RunConfig(method="lost", features="attn"))
    check_config(RunConfig(method="dinoseg", features="attn"))


@pytest.fixture
def toy_registrations():
    """A method and a feature kind registered for one test, removed afterwards."""
    yield
    METHODS.pop("toy_any", None)
    FEATURE_KINDS.pop("toy_embed", None)


def test_a_method_without_feature_kinds_reads_every_embedding_kind(toy_registrations) -> None:
    """``feature_kinds=None`` means every kind registered as an embedding, including kinds
    registered later; an entry that names its kinds reads only those."""
    def run(feats, grid, patch_size, sizes, params):  # never called here
        raise AssertionError

    register_method(MethodSpec("toy_any", run, lambda *a: MethodOutput(*[torch.zeros(1)] * 3)))
    register_feature_kind(FeatureKind("toy_embed", lambda layer: layer))
    assert "toy_embed" in accepted_features(get_method("toy_any"))
    assert "attn" not in accepted_features(get_method("toy_any"))
    assert pairs(["toy_any"], ["toy_embed"]) == [("toy_any", "toy_embed")]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--method", "lost", "--features", "attn"], f"--method lost reads {EMBEDDINGS}, not"),
    (["--method", "lost,dinoseg", "--features", "k"], "--method dinoseg reads attn, none of"),
])
def test_the_command_says_it_in_one_line_before_any_work(tmp_path: Path, capsys, model_builds,
                                                         extra, needle) -> None:
    argv = ["--model", "dinov2_vits14", "--weights", "random", "--dataset", "demo",
            "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
            "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert model_builds == [] and not (tmp_path / "runs").exists()

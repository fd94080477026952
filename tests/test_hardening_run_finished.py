"""Issue 20, rows 2 and 3: what a run folder already holds is checked before it is trusted.

Row 3: "already finished" trusted config.json and metrics.json. A tampered metrics.json, a
truncated or ``[]`` config.json, or an edited model in config all reran as "already finished"
and stayed broken, while the leaderboard said "rerun the run to rewrite it". Now a rerun
rewrites metrics.json from the validated lines (and config.json when it is merely unreadable),
and refuses with one line a config.json that disagrees with the command.

Row 2: resuming under another lostreg version mixed results. Now config.json records the
result version of the code behind the predictions and each session that wrote into the folder,
and a resume under another result version is refused (``--allow-version-mix``: recorded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import TINY, only_folder, tiny_command

from lostreg.datasets.demo import generate_demo
from lostreg.errors import LostregError
from lostreg.reports import leaderboard as lb
from lostreg.run import main
from lostreg.runs import state
from lostreg.runs.store import REWRITE_HINT, load_run
from lostreg.version import RESULT_VERSION, RESULT_VERSIONS

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture
def finished(tmp_path, tiny_model, capsys) -> tuple[list[str], Path]:
    """A finished run of 4 images: its command and its folder."""
    generate_demo(tmp_path / "data")
    argv = tiny_command(tmp_path / "data", tmp_path / "runs")
    assert main(argv) == 0
    capsys.readouterr()
    return argv, only_folder(tmp_path / "runs")


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def rerun(argv: list[str], capsys, code: int = 0) -> tuple[str, list[str]]:
    """The same command again: its summary line (or error line) and stderr lines."""
    assert main(argv) == code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    return (out.strip().splitlines()[-1] if code == 0 else lines[-1]), lines


def edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- row 3: metrics.json ------------------------------------------------------------------------


@pytest.mark.parametrize("damage, why", [
    ({"corloc": 99.0}, "its corloc 99.0 disagreed with the predictions'"),
    ({"n_hits": 4, "corloc": 100.0}, "disagreed with the predictions'"),
    ({"n_images": 5}, "its n_images 5 disagreed"),
    ({"model": "dinov2_vitl14"}, "its model 'dinov2_vitl14' disagreed with the config'"),
    ({"run_id": "another"}, "its run_id 'another' disagreed"),
    ({"nonfinite_images": 3}, "its nonfinite_images 3 disagreed with the predictions' 0"),
])
def test_a_tampered_metrics_json_is_rewritten_from_the_predictions(finished, capsys, damage,
                                                                  why) -> None:
    argv, folder = finished
    before = files(folder)
    edit(folder / "metrics.json", **damage)
    line, _ = rerun(argv, capsys)
    assert "| metrics.json rewritten from the predictions: " in line and why in line, line
    after = files(folder)
    metrics, original = (json.loads(after["metrics.json"]), json.loads(before["metrics.json"]))
    for key in ("corloc", "n_hits", "n_images", "run_id", "model", "nonfinite_images"):
        assert metrics[key] == original[key], key
    assert after["predictions.jsonl"] == before["predictions.jsonl"]
    assert after["config.json"] == before["config.json"]  # readable and this run's: kept
    line, _ = rerun(argv, capsys)  # and now it is finished, as it was
    assert "| already finished: " in line


@pytest.mark.parametrize("damage", [b"", b"{\"run_id\": ", b"[]", b"[" * 5000 + b"]" * 5000])
def test_an_unreadable_metrics_json_is_rewritten(finished, capsys, damage) -> None:
    argv, folder = finished
    before = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_bytes(damage)
    line, _ = rerun(argv, capsys)
    assert "| metrics.json rewritten from the predictions: metrics.json could not be read: " \
        in line, line
    assert json.loads((folder / "metrics.json").read_text())["corloc"] == before["corloc"]


def test_the_leaderboard_hint_is_true(finished, capsys) -> None:
    """The leaderboard's reader says what fixes a folder whose metrics.json disagrees with its
    predictions; doing it fixes the folder."""
    argv, folder = finished
    edit(folder / "metrics.json", n_hits=4, corloc=100.0)
    with pytest.raises(LostregError) as skipped:
        load_run(folder)
    assert f"{REWRITE_HINT} metrics.json from its predictions" in str(skipped.value)
    rerun(argv, capsys)
    assert load_run(folder).summary["n_hits"] == json.loads(
        (folder / "metrics.json").read_text())["n_hits"]
    (folder / "config.json").write_text("[]")
    with pytest.raises(LostregError) as skipped:
        load_run(folder)
    assert f"{REWRITE_HINT} config.json" in str(skipped.value)
    rerun(argv, capsys)
    assert load_run(folder).info.model == TINY.name


@pytest.mark.parametrize("damage", [b"", b"{\"run_id\": ", b"[]", b"{\"corloc\": NaN}"])
def test_the_leaderboard_hint_for_an_unreadable_metrics_json_is_true(finished, capsys,
                                                                     damage) -> None:
    """An unreadable metrics.json gets the same hint as an unreadable config.json (the rerun
    rewrites both), in the line the leaderboard prints when it skips the folder; following it
    puts the run back on the leaderboard."""
    argv, folder = finished
    runs = folder.parent
    (folder / "metrics.json").write_bytes(damage)
    skipped: list[str] = []
    assert lb.collect(runs, include_smoke=True, report=skipped.append).runs == []
    (line,) = skipped
    assert str(folder / "metrics.json") in line
    assert line.endswith(f"; {REWRITE_HINT} metrics.json from its predictions"), line
    assert "\n" not in line
    summary, _ = rerun(argv, capsys)
    assert "| metrics.json rewritten from the predictions: " in summary
    skipped.clear()
    (board,) = lb.collect(runs, include_smoke=True, report=skipped.append).runs
    assert skipped == [] and board.run_dir == folder


# --- row 3: config.json -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [b"", b"[]", b"{\"run_id\": \"smoke-", b"null", b"\xff\xfe"])
def test_an_unreadable_config_json_is_rewritten_and_the_run_stays_finished(finished, capsys,
                                                                          damage) -> None:
    argv, folder = finished
    before = files(folder)
    (folder / "config.json").write_bytes(damage)
    line, _ = rerun(argv, capsys)
    assert "| already finished (config.json rewritten: " in line, line
    after = files(folder)
    assert after["metrics.json"] == before["metrics.json"]  # valid: its timings kept
    assert after["predictions.jsonl"] == before["predictions.jsonl"]
    config, original = json.loads(after["config.json"]), json.loads(before["config.json"])
    assert config["identity"] == original["identity"] and config["model"] == TINY.name
    # who wrote the predictions cannot be known any more, and the file says so
    assert config["result_versions"] == [] and config["code_history"][0]["result_version"] is None
    assert "already finished: " in rerun(argv, capsys)[0]


@pytest.mark.parametrize("key, value", [
    ("model", "dinov2_vitl14"), ("timm_name", "vit_large_patch14_dinov2.lvd142m"),
    ("dataset", "voc07"), ("feature", "v"), ("method_params", {"k_patches": 50, "gram_bias": 0}),
    ("precision", "fp16"), ("smoke_run", False),
])
def test_a_config_json_of_another_run_is_refused_with_one_line(finished, capsys, key,
                                                              value) -> None:
    argv, folder = finished
    edit(folder / "config.json", **{key: value})
    before = files(folder)
    line, err = rerun(argv, capsys, code=2)
    assert line.startswith(f"error: {folder / 'config.json'}: '{key}' is ") and \
        "the folder holds another run" in line, line
    assert len([x for x in err if x.startswith("error:")]) == 1
    assert files(folder) == before  # nothing repaired, nothing rewritten


def test_an_edited_identity_or_weights_is_refused(finished, capsys) -> None:
    argv, folder = finished
    config = json.loads((folder / "config.json").read_text())
    edit(folder / "config.json", identity={**config["identity"], "k_patches": 50})
    assert "'identity' is " in rerun(argv, capsys, code=2)[0]
    edit(folder / "config.json", identity=config["identity"],
         weights={**config["weights"], "source": "hub", "sha256": "ab" * 32})
    assert "'weights' names other weights" in rerun(argv, capsys, code=2)[0]


# --- row 2: code versions -----------------------------------------------------------------------


def interrupt(folder: Path, keep: int = 2) -> None:
    """Leave the folder as a kill leaves it: ``keep`` predictions, no metrics.json."""
    lines = (folder / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "predictions.jsonl").write_bytes(b"".join(lines[:keep]))
    (folder / "metrics.json").unlink()


def test_every_session_that_writes_is_recorded(finished, capsys) -> None:
    argv, folder = finished
    config = json.loads((folder / "config.json").read_text())
    assert config["result_versions"] == [RESULT_VERSION] and config["version_mix"] is False
    (first,) = config["code_history"]
    assert (first["result_version"], first["predictions_before"]) == (RESULT_VERSION, 0)
    assert "git_commit" in first and "lostreg_version" in first
    interrupt(folder)
    assert "| resumed (2 of 4 were done): " in rerun(argv, capsys)[0]
    config = json.loads((folder / "config.json").read_text())
    assert [e["predictions_before"] for e in config["code_history"]] == [0, 2]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["result_versions"], metrics["version_mix"]) == ([RESULT_VERSION], False)


@pytest.mark.parametrize("older", ["declared", "legacy", "unreadable"])
def test_resuming_predictions_of_another_result_version_is_refused(finished, capsys,
                                                                   older) -> None:
    argv, folder = finished
    interrupt(folder)
    if older == "declared":  # written by code of result version 1
        edit(folder / "config.json", result_versions=[1])
        why = f"written by result version 1 ({RESULT_VERSIONS[1]})"
    elif older == "legacy":  # a folder from before versions were declared: version 1
        config = json.loads((folder / "config.json").read_text())
        for key in ("result_versions", "version_mix", "code_history"):
            config.pop(key)
        (folder / "config.json").write_text(json.dumps(config))
        why = "written by result version 1"
    else:
        (folder / "config.json").write_text("[]")
        why = "written by code of an unknown result version (config.json could not be read)"
    before = files(folder)
    line, _ = rerun(argv, capsys, code=2)
    assert line.startswith(f"error: {folder}: its 2 predictions were {why}"), line
    assert f"this code is result version {RESULT_VERSION}" in line
    assert "--allow-version-mix" in line
    assert files(folder) == before
    line, _ = rerun([*argv, "--allow-version-mix"], capsys)
    assert "| resumed (2 of 4 were done): " in line
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert config["version_mix"] is True and metrics["version_mix"] is True
    assert config["code_history"][-1]["version_mix_allowed"] is True
    assert config["settings"]["allow_version_mix"] is True
    expected = [RESULT_VERSION] if older == "unreadable" else [1, RESULT_VERSION]
    assert config["result_versions"] == metrics["result_versions"] == expected


def test_a_new_result_version_refuses_the_resume_and_leaves_finished_runs_alone(
        finished, capsys, monkeypatch) -> None:
    """The code's result version bumped (a change that alters results): a finished run is
    still "already finished" (nothing is written), a resumed one is refused, and so is
    rewriting a finished run's metrics.json with the new code."""
    argv, folder = finished
    monkeypatch.setattr(state, "RESULT_VERSION", RESULT_VERSION + 1)
    assert "| already finished: " in rerun(argv, capsys)[0]
    edit(folder / "metrics.json", corloc=99.0)
    line, _ = rerun(argv, capsys, code=2)
    assert f"this code is result version {RESULT_VERSION + 1}" in line
    interrupt(folder)
    line, _ = rerun(argv, capsys, code=2)
    assert line.startswith(f"error: {folder}: its 2 predictions were written by result version "
                           f"{RESULT_VERSION} (")

"""Issue #21 rows 9 and 10: what the commands write, and where they say they wrote it.

* ``analyze norms`` folders carry what defines the study (``--limit``, blocks, thresholds,
  weights file), so a second study never replaces the first;
* ``scripts/make_example.sh`` writes into a new temporary folder unless ``--out`` names one,
  and never replaces a folder that is not an earlier example;
* generated demo data and the feature cache are named in one line each;
* a ``--data-root`` that is a file is one line without an "offline?" hint;
* the Ctrl-C line starts on a line of its own after a progress bar;
* a run folder another process writes is refused before the set-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lostreg.runs.grid as grid_module
from lostreg.backbones import BACKBONES, BackboneSpec, create_backbone
from lostreg.datasets import load_dataset
from lostreg.errors import LostregError, close_progress_bars
from lostreg.reports.analysis.collect import default_output
from lostreg.run import main
from lostreg.runs import distributed
from lostreg.runs.lock import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[1]
SPEC = BackboneSpec("tiny_outputs", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=2, embed_dim=48, num_heads=6))


@pytest.fixture
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield SPEC
    BACKBONES.pop(SPEC.name, None)


def run_args(root: Path, *extra: str, weights: str = "random") -> list[str]:
    return ["--model", SPEC.name, "--weights", weights, "--dataset", "demo",
            "--data-root", str(root / "data"), "--runs", str(root / "runs"),
            "--num-workers", "0", "--no-progress", "--limit", "2", *extra]


# --- row 9: study folders, the example script, generated data and the cache ------------------


def test_norms_folders_name_what_defines_the_study() -> None:
    base = Path("results/analysis")
    assert default_output("dinov2_vitl14", "voc07") == base / "dinov2_vitl14-voc07"  # unchanged
    assert default_output("dinov2_vitl14", "voc07", True) == base / "smoke-dinov2_vitl14-voc07"
    named = {default_output("dinov2_vitl14", "voc07", limit=500),
             default_output("dinov2_vitl14", "voc07", limit=100),
             default_output("dinov2_vitl14", "voc07", no_hard=True),
             default_output("dinov2_vitl14", "voc07", layers=[22, 23]),
             default_output("dinov2_vitl14", "voc07", threshold=[150.0]),
             default_output("dinov2_vitl14", "voc07", weights_file="ab" * 32)}
    assert len(named) == 6 and base / "dinov2_vitl14-voc07" not in named
    assert default_output("timm:a/b", "voc07", limit=500, layers=[-1]) == \
        base / "timm_a_b-voc07-first500-blocks-1"


def test_norms_command_writes_a_limited_study_beside_the_full_one(tmp_path, tiny_model,
                                                                   monkeypatch) -> None:
    from lostreg.analyze import main as analyze_main

    monkeypatch.chdir(tmp_path)
    argv = ["norms", "--model", SPEC.name, "--weights", "random", "--dataset", "demo",
            "--data-root", str(tmp_path / "data"), "--num-workers", "0", "--no-progress"]
    assert analyze_main([*argv, "--limit", "2", "--layers", "-1,-2"]) == 0
    assert analyze_main([*argv, "--limit", "3"]) == 0
    folders = sorted(p.name for p in (tmp_path / "results" / "analysis").iterdir())
    assert folders == ["smoke-tiny_outputs-demo-first2-blocks0_1",
                       "smoke-tiny_outputs-demo-first3"], folders


def fake_python(tmp_path: Path) -> Path:
    """A stand-in for the venv's python that logs its arguments and, for the leaderboard,
    writes the output folder it was given: the script's own logic, without 1.5 minutes of
    runs."""
    script = tmp_path / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {tmp_path / "calls.log"}\n'
        'if [ "$2" = lostreg.leaderboard ]; then\n'
        '  while [ $# -gt 0 ]; do [ "$1" = --output ] && out=$2; shift; done\n'
        '  mkdir -p "$out" && echo run_id > "$out/leaderboard.csv"\n'
        "fi\n")
    script.chmod(0o755)
    return script


def make_example(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path)), "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(REPO / "scripts" / "make_example.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_make_example_writes_a_temporary_folder_unless_told(tmp_path) -> None:
    done = make_example(tmp_path)
    assert done.returncode == 0, done.stderr
    written = [line.split()[-1] for line in done.stdout.splitlines()
               if line.startswith("example written to")]
    assert len(written) == 1 and Path(written[0]).parent == tmp_path
    assert (Path(written[0]) / "leaderboard.csv").is_file()
    assert "--out results/example" in done.stdout  # how to refresh the tracked copy
    calls = (tmp_path / "calls.log").read_text()
    assert "results/example" not in calls and "--runs" in calls


def test_make_example_replaces_only_an_earlier_example(tmp_path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    done = make_example(tmp_path, "--out", str(foreign))
    assert done.returncode == 2 and "holds no leaderboard.csv" in done.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    earlier = tmp_path / "example"
    earlier.mkdir()
    (earlier / "leaderboard.csv").write_text("old")
    (earlier / "stale.png").write_text("old")
    done = make_example(tmp_path, "--out", str(earlier))
    assert done.returncode == 0 and f"replacing {earlier}" in done.stdout
    assert sorted(p.name for p in earlier.iterdir()) == ["leaderboard.csv"]


def test_generated_demo_data_is_named_once(tmp_path, capsys) -> None:
    (tmp_path / "data").mkdir()
    load_dataset("demo", tmp_path / "data")
    assert capsys.readouterr().err.splitlines() == [
        f"note: generated the demo dataset in {tmp_path / 'data' / 'demo'}"]
    load_dataset("demo", tmp_path / "data")
    assert capsys.readouterr().err == ""  # already there: nothing to say


def test_the_feature_cache_is_named_in_one_line(tmp_path, tiny_model, capsys) -> None:
    cache = tmp_path / "cache"
    load_dataset("demo", tmp_path / "data")
    capsys.readouterr()
    assert main(run_args(tmp_path, "--cache-features", str(cache))) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "feature cache" in line]
    assert notes == [f"note: feature cache in {cache} (features of images already there are "
                     "read from it, the others stored)"]
    assert main(run_args(tmp_path)) == 0  # no cache: no line
    assert "feature cache" not in capsys.readouterr().err


# --- row 10: one-line errors, the Ctrl-C line, the early lock ---------------------------------


def test_a_data_root_that_is_a_file_is_one_line_without_an_offline_hint(tmp_path, capsys) -> None:
    afile = tmp_path / "datasets.txt"
    afile.write_text("not a folder")
    for dataset in ("demo", "voc07"):
        with pytest.raises(LostregError) as caught:
            load_dataset(dataset, afile)
        assert str(caught.value) == (f"{afile}: is a file, not a folder; --data-root (or "
                                     "LOSTREG_DATA) names the folder that holds the datasets")
    assert main(["--dataset", "demo", "--weights", "random", "--data-root", str(afile),
                 "--runs", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "offline" not in err


def test_the_interrupt_line_starts_on_its_own_line_after_a_progress_bar(capsys) -> None:
    from tqdm.auto import tqdm

    def body() -> None:
        bar = tqdm(total=10, file=sys.stderr, desc="demo", dynamic_ncols=True)
        bar.update(3)  # a bar mid-line, as a run interrupted by Ctrl-C leaves it
        raise KeyboardInterrupt

    assert distributed.command_status(body) == 130
    err = capsys.readouterr().err
    assert "\ninterrupted: what was written is kept" in err
    assert not any(line.startswith("demo") and "interrupted" in line
                   for line in err.replace("\r", "\n").splitlines())


def test_closing_progress_bars_without_tqdm_loaded_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "tqdm.std", raising=False)
    close_progress_bars()


@pytest.fixture
def describe_spy(monkeypatch) -> list[str]:
    """The models described (weights resolved and hashed, timm imported) while a test runs."""
    described: list[str] = []
    real = grid_module.describe_backbone

    def spying(spec, weights):
        described.append(spec.name)
        return real(spec, weights)

    monkeypatch.setattr(grid_module, "describe_backbone", spying)
    return described


def unfinished_run(tmp_path: Path, capsys, *extra: str, weights: str = "random") -> Path:
    """A run folder as a process that is still writing it leaves it (no metrics.json)."""
    assert main(run_args(tmp_path, *extra, weights=weights)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    folder = Path(line.split("| new: ")[1].split()[0])
    (folder / "metrics.json").unlink()
    return folder


def test_a_held_run_is_refused_before_the_model_is_described(tmp_path, tiny_model, capsys,
                                                             describe_spy) -> None:
    folder = unfinished_run(tmp_path, capsys)
    describe_spy.clear()
    with RunLock(folder) as lock:
        before = (folder / LOCK_NAME).read_bytes()
        assert main(run_args(tmp_path)) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith(f"error: {folder}: another lostreg process is writing this run "
                                  f"(pid {os.getpid()} on ")
        assert describe_spy == []  # refused before the set-up
        assert lock.held and (folder / LOCK_NAME).read_bytes() == before  # only looked
    assert main(run_args(tmp_path)) == 0  # free again: the run resumes and finishes
    assert "resumed" in capsys.readouterr().out


def test_a_held_run_of_a_weights_file_is_refused_early_and_only_that_file(
        tmp_path, tiny_model, capsys, describe_spy) -> None:
    checkpoint, other = tmp_path / "w.pt", tmp_path / "copy" / "w.pt"
    torch.save(create_backbone(SPEC, "random", seed=1).model.state_dict(), checkpoint)
    other.parent.mkdir()
    other.write_bytes(checkpoint.read_bytes())
    folder = unfinished_run(tmp_path, capsys, weights=str(checkpoint))
    describe_spy.clear()
    with RunLock(folder):
        assert main(run_args(tmp_path, weights=str(checkpoint))) == 2
        assert "another lostreg process is writing this run" in capsys.readouterr().err
        assert describe_spy == []
        # the same bytes under another path: the same run id, so the run's own lock refuses
        # it, after describing (the early look never guesses beyond the recorded path)
        assert main(run_args(tmp_path, weights=str(other))) == 2
        assert "another lostreg process is writing this run" in capsys.readouterr().err
        assert describe_spy == [SPEC.name]

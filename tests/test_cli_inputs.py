"""Bad command-line input a user plausibly types: one ``error:`` line naming the value, exit
status 2, no traceback, nothing computed; and ``--help`` that states each default once."""

from __future__ import annotations

import pytest
import torch

from lostreg import analyze, cli, run, verify
from lostreg.reports import leaderboard

MODEL = "dinov2_vits14_reg4"


def run_args(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "data").mkdir(exist_ok=True)  # a new data root adds a "warning: created" line
    return ["--model", MODEL, "--weights", "random", "--dataset", "demo",
            "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
            "--num-workers", "0", "--no-progress", *extra]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--gram-bias", "nan"], "--gram-bias nan: must be a finite number"),
    (["--gram-bias=0,inf"], "--gram-bias inf: must be a finite number"),
])
def test_run_refuses_values_that_mean_nothing(tmp_path, capsys, extra, needle) -> None:
    assert run.main(run_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("main_args", [
    lambda tmp: (run.main, run_args(tmp)),
    lambda tmp: (analyze.main, ["norms", "--model", MODEL, "--dataset", "demo", "--weights",
                                "random", "--data-root", str(tmp / "data")]),
    lambda tmp: (verify.main, ["lost-voc07", "--data-root", str(tmp / "data")]),
])
def test_negative_num_workers_is_a_usage_error(tmp_path, capsys, main_args) -> None:
    main, args = main_args(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--num-workers", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --num-workers: -1: must be 0 or more" in err and "Traceback" not in err


def test_unknown_lostreg_command_says_so(capsys) -> None:
    assert cli.main(["runn", "--help"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: unknown command 'runn'; did you mean run?"
    assert "commands:" in captured.out
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0  # no command: usage, exit 2


@pytest.mark.parametrize("parser", [
    run.build_parser(), verify.build_parser(), leaderboard.build_parser(),
    *analyze.build_parser()._subparsers._group_actions[0].choices.values(),
])
def test_help_states_each_default_once(parser) -> None:
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    if "--data-root" in text:
        assert "$LOSTREG_DATA or datasets/) (default" not in text


class _Code:
    def __reduce__(self):
        return (print, ("executed!",))


@pytest.mark.parametrize(("make", "needle"), [
    (lambda tmp: tmp / "Random", "Random: weights file not found (--weights takes hub, random or"),
    (lambda tmp: (tmp / "ckpt").mkdir() or tmp / "ckpt", "ckpt: is a folder, not a weights file"),
    (lambda tmp: (tmp / "w.txt").write_text("hello\n") and tmp / "w.txt",
     "w.txt: cannot read checkpoint: not a PyTorch (torch.save) or safetensors weights file"),
    (lambda tmp: torch.save({"model": _Code()}, tmp / "evil.pth") or tmp / "evil.pth",
     "evil.pth: cannot read checkpoint: it pickles objects other than tensors"),
])
def test_bad_weights_name_the_file_and_the_problem(tmp_path, capsys, make, needle) -> None:
    weights = make(tmp_path)
    args = run_args(tmp_path, "--limit", "1")
    args[args.index("random")] = str(weights)
    assert run.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert "\x1b" not in err[0] and "executed!" not in err[0]
    runs = tmp_path / "runs"  # no run folder left behind holding only a config.json
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def test_datasets_info_on_missing_data_names_its_own_flag(tmp_path, capsys) -> None:
    from lostreg.datasets.__main__ import main as datasets_main

    (tmp_path / "data").mkdir()
    assert datasets_main(["info", "voc07", "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "python -m lostreg.datasets download voc07" in err
    assert err.endswith("or add --download") and "--no-download" not in err


def test_readme_option_table_lists_every_run_flag() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## `lostreg.run` options", 1)[1].split("\n\n", 2)[1]
    flags = {option for action in run.build_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"}
    missing = sorted(flag for flag in flags if f"| `{flag}" not in table)
    assert not missing, f"README's lostreg.run table lacks {missing}"


def _demo_as_voc07(tmp_path) -> None:
    """``tmp_path/data/VOC2007``: the demo scenes (VOC format) as a partial VOC07."""
    from lostreg.datasets.demo import generate_demo

    demo = generate_demo(tmp_path / "data")
    demo.rename(demo.parent / "VOC2007")


def _verify_args(tmp_path) -> list[str]:
    """A VOC2007-format tree (the demo scenes) and an empty "official" file of known sha256."""
    import hashlib
    import pickle

    _demo_as_voc07(tmp_path)
    official = tmp_path / "official.pkl"
    official.write_bytes(pickle.dumps({}))
    return ["--model", MODEL, "--weights", "random", "--data-root", str(tmp_path / "data"),
            "--predictions", str(official), "--expected-sha256",
            hashlib.sha256(official.read_bytes()).hexdigest(), "--allow-partial-dataset",
            "--no-download", "--limit", "1", "--num-workers", "0", "--no-progress",
            "--output", str(tmp_path / "verify")]


@pytest.mark.parametrize("command", ["run", "leaderboard", "norms", "verify", "datasets"])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys, command) -> None:
    from lostreg.datasets.__main__ import main as datasets_main

    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    main, args = {
        "run": (run.main, run_args(tmp_path, "--limit", "1", "--output", str(blocker))),
        "leaderboard": (leaderboard.main, ["--runs", str(runs), "--out", str(blocker)]),
        "norms": (analyze.main, ["norms", "--model", MODEL, "--dataset", "demo", "--weights",
                                 "random", "--data-root", str(tmp_path / "data"), "--limit", "1",
                                 "--num-workers", "0", "--no-progress", "--output", str(blocker)]),
        "verify": (verify.main, ["lost-voc07", *_verify_args(tmp_path), "--runs-dir", str(blocker)]),
        "datasets": (datasets_main, ["download", "demo", "--data-root", str(blocker / "sub")]),
    }[command]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(blocker) in err[0], err
    assert "Traceback" not in capsys.readouterr().err
    assert blocker.read_text() == "keep me\n"


def test_relative_paths_are_recorded_absolute_so_analysis_works_from_elsewhere(
        tmp_path, monkeypatch) -> None:
    import json

    from lostreg.reports.analysis.runs import load_run, run_records

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run.main(["--model", MODEL, "--weights", "random", "--dataset", "demo", "--data-root",
                     "data", "--output", "runs", "--limit", "2", "--num-workers", "0",
                     "--no-progress"]) == 0
    (run_dir,) = (work / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data_root"] == str(work / "data" / "demo")
    assert config["settings"]["data_root"] == str(work / "data")
    assert config["settings"]["output"] == str(work / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    index, by_id = run_records(load_run(run_dir))
    assert index.root == work / "data" / "demo" and len(by_id) == 24
    assert not (elsewhere / "data").exists()  # the demo was not generated again here


def test_analysis_of_a_run_whose_data_moved_points_to_data_root(tmp_path) -> None:
    from lostreg.errors import LostregError
    from lostreg.reports.analysis.runs import load_run, run_records

    _demo_as_voc07(tmp_path)
    assert run.main(["--model", MODEL, "--weights", "random", "--dataset", "voc07", "--data-root",
                     str(tmp_path / "data"), "--output", str(tmp_path / "runs"), "--limit", "1",
                     "--allow-partial-dataset", "--no-download", "--num-workers", "0",
                     "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    (tmp_path / "data" / "VOC2007").rename(tmp_path / "VOC2007")  # the data moved away
    with pytest.raises(LostregError) as info:
        run_records(load_run(run_dir))
    message = str(info.value)
    assert str(tmp_path / "data") in message and "--no-download" not in message
    assert message.endswith("or pass --data-root with the folder the run used")
    index, _ = run_records(load_run(run_dir), data_root=tmp_path)
    assert index.root == tmp_path / "VOC2007"


def test_a_missing_dataset_fails_before_any_run_with_no_download(tmp_path, capsys) -> None:
    _demo_as_voc07(tmp_path)  # voc07 is there, voc12 is not
    assert run.main(["--model", MODEL, "--weights", "random", "--dataset", "voc07,voc12",
                     "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
                     "--limit", "1", "--allow-partial-dataset", "--no-download",
                     "--num-workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "PASCAL VOC 2012 (voc12) not found" in err
    assert not (tmp_path / "runs").exists()  # nothing was run on voc07 first


def test_comma_lists_may_start_with_a_minus() -> None:
    """``--layer -1,-2`` and ``--gram-bias -0.1,0`` are values, not unknown options (Python
    3.11's argparse needed ``--layer=-1,-2``)."""
    from lostreg.reports.protocol.cli import build_parser as protocol_parser
    from lostreg.run import build_parser

    args = build_parser().parse_args(["--layer", "-1,-2", "--gram-bias", "-0.1,0",
                                      "--k-patches", "50"])
    assert (args.layer, args.param_gram_bias) == ("-1,-2", "-0.1,0")
    protocol = protocol_parser().parse_args(["--layers", "-1,-2", "--bias-l2", "-0.5,0"])
    assert (protocol.layers, protocol.bias_l2) == ("-1,-2", "-0.5,0")

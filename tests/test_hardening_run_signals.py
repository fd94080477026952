"""Issue 20, row 20: Ctrl-C in the first seconds of a run (while torch is being imported) gave
a KeyboardInterrupt traceback, and SIGTERM or SIGHUP killed a run without a word. Now each of
the three ends a run command with one line and exit 128 + the signal's number, whenever it
comes, and the run stays resumable: the rerun finishes with the bytes of an uninterrupted run.
Real processes, signalled at several moments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lostreg import signals
from lostreg.datasets import load_dataset
from lostreg.io import read_jsonl
from lostreg.run import main

REPO = Path(__file__).resolve().parents[1]
SIGNALS = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
STARTING = "{what} while starting: nothing was written"
RUNNING = "{what}: what was written is kept; rerun the same command to resume"
LIMIT = 10  # images: the run lasts a second or two, long enough to be signalled mid-way
SMOKE = "warning: SMOKE RUN (weights: random): not a result, never enters the leaderboard"

pytestmark = pytest.mark.usefixtures("one_thread")


def command(root: Path, out: str = "runs") -> list[str]:
    return ["--model", "dinov2_vits14_reg4", "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--runs", str(root / out), "--device", "cpu",
            "--batch-size", "1", "--num-workers", "0", "--no-progress", "--limit", str(LIMIT)]


def start(root: Path, how: str) -> subprocess.Popen:
    entry = {"module": [sys.executable, "-m", "lostreg.run"],
             "cli": [sys.executable, "-m", "lostreg", "run"]}[how]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the run as a terminal starts it: a suite started under ``nohup`` (SIGHUP ignored) or as
    # a background job of a non-interactive shell (SIGINT ignored) would otherwise hand its
    # ignored signals down, and an ignored signal rightly stays ignored (lostreg.signals)
    return subprocess.Popen([*entry, *command(root)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=default_signals)


def default_signals() -> None:
    for number in signals.SIGNALS:
        signal.signal(number, signal.SIG_DFL)


def what(name: str) -> str:
    return "interrupted" if name == "SIGINT" else f"terminated by {name}"


def ended(proc: subprocess.Popen) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, [line for line in err.splitlines() if line and line != SMOKE]


def importing_torch(proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Wait until the process maps torch's library: it is importing torch, so ``import
    lostreg`` (which comes first) has run. A signal in the interpreter's own first tens of
    milliseconds, before any lostreg code exists in the process, is Python's to handle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "torch" in Path(f"/proc/{proc.pid}/maps").read_text():
                return True
        except OSError:
            pass
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("name", list(SIGNALS))
@pytest.mark.parametrize("delay, how", [(0.0, "module"), (0.3, "cli"), (1.0, "module")])
def test_a_signal_while_starting_is_one_line(tmp_path, name, delay, how) -> None:
    """Signalled as torch starts loading, and 0.3 s and 1 s later (the first seconds of a
    run are its imports)."""
    load_dataset("demo", tmp_path / "data")
    proc = start(tmp_path, how)
    assert importing_torch(proc)
    time.sleep(delay)
    proc.send_signal(getattr(signal, name))
    code, err = ended(proc)
    assert code == SIGNALS[name], err
    # still importing (the usual case at these moments), or already running on a fast machine
    assert err in ([STARTING.format(what=what(name))], [RUNNING.format(what=what(name))]), err
    assert not any((tmp_path / "runs").glob("*/metrics.json"))


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_signal_while_running_is_one_line_and_the_run_resumes(tmp_path, name) -> None:
    load_dataset("demo", tmp_path / "data")
    proc = start(tmp_path, "module")
    deadline, predictions = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/predictions.jsonl"))
        if found and len(list(read_jsonl(found[0]))) >= 2:
            predictions = found[0]
            proc.send_signal(getattr(signal, name))
            break
        time.sleep(0.01)
    code, err = ended(proc)
    assert predictions is not None, f"the run ended before it was signalled: {err}"
    assert (code, err) == (SIGNALS[name], [RUNNING.format(what=what(name))])
    done = len(list(read_jsonl(predictions)))
    assert 2 <= done < LIMIT and not (predictions.parent / "metrics.json").exists()
    assert not (predictions.parent / "run.lock").exists()  # released on the way out
    assert main(command(tmp_path)) == 0  # resumable: the rerun writes the rest
    assert main(command(tmp_path, "whole")) == 0
    whole = tmp_path / "whole" / predictions.parent.name
    assert predictions.read_bytes() == (whole / "predictions.jsonl").read_bytes()


def test_only_run_commands_take_the_signals_over() -> None:
    python = "/usr/bin/python3"
    for argv in ([python, "-m", "lostreg.run"], [python, "-X", "dev", "-m", "lostreg.protocol"],
                 [python, "-m", "lostreg", "run", "--model", "x"], [python, "/bin/lostreg-run"],
                 [python, "/venv/bin/lostreg", "protocol"]):
        assert signals.is_run_command(argv), argv
    for argv in ([python, "-m", "pytest"], [python, "-m", "lostreg", "leaderboard"],
                 [python, "-m", "lostreg.leaderboard"], [python, "-c", "import lostreg"],
                 [python, "script.py", "run"], [python, "/venv/bin/lostreg"], [python]):
        assert not signals.is_run_command(argv), argv


def test_a_signal_the_process_ignores_stays_ignored_and_handlers_are_restored() -> None:
    """nohup starts a command with SIGHUP ignored: it must stay ignored; and a command run
    in a process (tests, a notebook) leaves that process's handlers as they were."""
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    # a terminal's Python: Ctrl-C raises KeyboardInterrupt (whatever the suite was started
    # with), and SIGHUP ignored as nohup leaves it
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_IGN)}
    try:
        with signals.running_handlers():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            with pytest.raises(signals.Terminated) as raised:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            assert raised.value.name == "SIGTERM"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before

"""Issue 20, row 16: two identical runs racing. The one that does not get the run folders must
always print the holder's line, never ``No such file or directory``.

The cause: a command refused at one folder's lock cleaned up the folders it had meant to create
by listing them, and a folder later in the (sorted) lock order did not exist yet, or was being
made by the winner, whose ``open`` of its lock file then failed. Now the clean-up happens only
under the locks the command holds, and a lock taken in a folder that vanished makes it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import TINY as SPEC
from tiny_runs import tiny_command

from lostreg.backbones import BACKBONES
from lostreg.datasets.demo import generate_demo
from lostreg.run import main
from lostreg.runs import grid
from lostreg.runs.lock import RunLock, RunLocked

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["--k-patches", "50,60,70,80"]  # four run folders, locked in sorted order


def command(data: Path, runs: Path) -> list[str]:
    return tiny_command(data, runs, *SWEEP, limit=1)


@pytest.fixture
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield SPEC
    BACKBONES.pop(SPEC.name, None)


@pytest.mark.usefixtures("one_thread")
def test_a_command_refused_at_its_first_folder_names_the_holder(tmp_path, tiny_model, capsys,
                                                                monkeypatch) -> None:
    """The losing interleaving, made deterministic: the holder has the first folder and has not
    made the others yet, and the early look at /proc/locks missed it (it locked just after)."""
    generate_demo(tmp_path / "data")
    assert main(command(tmp_path / "data", tmp_path / "first")) == 0
    names = sorted(path.name for path in (tmp_path / "first").iterdir())
    assert len(names) == 4
    capsys.readouterr()
    monkeypatch.setattr(grid, "_flock_table", frozenset)  # the look found no holder
    runs = tmp_path / "runs"
    with RunLock(runs / names[0]):  # another process's lock, as far as flock can tell
        assert main(command(tmp_path / "data", runs)) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {runs / names[0]}: another lostreg process is writing "
                              f"this run (pid {os.getpid()} on "), err
        assert sorted(os.listdir(runs)) == [names[0]]  # nothing made, nothing removed
        assert os.listdir(runs / names[0]) == ["run.lock"]  # the holder's lock left alone


# One process imports once, then forks pairs of processes running the same command at once
# (the second after a seeded random delay, so the pairs meet at every stage of the first's run).
RACE = r"""
import json, os, random, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from test_hardening_run_race import SPEC, command
from lostreg.backbones import BACKBONES
from lostreg.run import main
BACKBONES[SPEC.name] = SPEC
root, tries = sys.argv[2], int(sys.argv[3])
main(command(root + "/data", root + "/warm"))  # imports and first builds, before any fork
random.seed(0)
results = []
for attempt in range(tries):
    runs = f"{root}/runs{attempt}"
    delay = random.uniform(0, 0.03)
    gate_r, gate_w = os.pipe()
    pids = []
    for who in range(2):
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(f"{runs}.{who}.{name}", os.O_WRONLY | os.O_CREAT), fd)
            os.read(gate_r, 1)
            time.sleep(delay * who)
            os._exit(main(command(root + "/data", runs)))
        pids.append(pid)
    os.write(gate_w, b"go")
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    results.append({"runs": runs, "pids": pids, "codes": codes,
                    "out": [open(f"{runs}.{who}.out").read() for who in range(2)],
                    "err": [open(f"{runs}.{who}.err").read() for who in range(2)]})
print(json.dumps(results))
"""
SMOKE_WARNING = "warning: SMOKE RUN (weights: random): not a result, never enters the leaderboard"


def test_two_identical_commands_racing_24_times(tmp_path) -> None:
    """24 races of real processes: each time, every process either scores the four runs (new
    or already finished) or prints exactly the holder's line, naming the other process. Before
    the fix about 1 race in 6 printed ``No such file or directory`` instead."""
    generate_demo(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RACE, str(Path(__file__).parent),
                           str(tmp_path), "24"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    refused = 0
    for race in json.loads(done.stdout.splitlines()[-1]):
        for who, (code, out, err) in enumerate(zip(race["codes"], race["out"], race["err"],
                                                   strict=True)):
            other = race["pids"][1 - who]
            errors = [line for line in err.splitlines() if line != SMOKE_WARNING]
            scored = [line for line in out.splitlines() if line.startswith("CorLoc")]
            if code == 0:
                assert errors == [] and len(scored) == 4, race
                continue
            refused += 1
            assert code == 2 and scored == [] and len(errors) == 1, race
            assert errors[0].startswith(f"error: {race['runs']}/"), race
            assert (": another lostreg process is writing this run (pid "
                    f"{other} on ") in errors[0], race
        assert 0 in race["codes"], race  # one of the two always scores the runs
        finished = sorted(Path(race["runs"]).iterdir())
        assert len(finished) == 4 and all((f / "metrics.json").is_file() for f in finished)
    assert refused >= 6  # the races did meet: most losers were refused, not served late


def test_a_holder_that_has_not_written_its_name_yet_is_still_named(tmp_path) -> None:
    """The other losing interleaving: the holder has the flock but is still writing its name
    (an fsync away). The refused process waits for the name instead of printing "a process
    that has not written its name yet"."""
    import fcntl
    import threading

    tmp_path.joinpath("run.lock").touch()
    fd = os.open(tmp_path / "run.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    info = json.dumps({"pid": 4242, "host": "elsewhere", "started": "t"}).encode() + b"\n"
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, info, 0))
    writer.start()
    try:
        with pytest.raises(RunLocked) as refused, RunLock(tmp_path):
            pass
    finally:
        writer.join()
        os.close(fd)
    assert "(pid 4242 on elsewhere since t)" in str(refused.value)

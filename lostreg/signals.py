"""Ctrl-C, SIGTERM and SIGHUP end a run command with one line, whenever they come.

A run command (``lostreg.run``, ``lostreg.protocol``) spends its first seconds importing torch
and timm, before any code of its own runs; a Ctrl-C there used to end in a KeyboardInterrupt
traceback, and SIGTERM or SIGHUP (a scheduler's kill, a closed terminal) killed it at any time
without a word. So:

* **while starting** (from the moment ``import lostreg`` runs in such a process until the
  command's body starts), each of the three signals prints one line and exits at once
  (``os._exit``; nothing has been written yet): 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP;
* **while running** (``running_handlers``, around ``lostreg.runs.distributed.command_status``),
  SIGINT raises ``KeyboardInterrupt`` as usual and SIGTERM/SIGHUP raise ``Terminated``, so the
  same clean-up runs for all three (queued predictions written, progress bar closed, locks
  released) and the command prints one line and exits 128 + the signal's number. What was
  written stays resumable, as after a kill -9.

A signal the process was started ignoring (``nohup`` ignores SIGHUP) stays ignored. Nothing
here runs in a process that is not a run command (a notebook or a script importing lostreg
keeps Python's own handling): ``is_run_command`` reads ``sys.orig_argv``. Cheap to import (no
torch): it must be in place before the slow imports start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                if hasattr(signal, name))
RUN_COMMANDS = ("run", "protocol")  # the commands that write run folders
_MODULES = {f"lostreg.{name}" for name in RUN_COMMANDS}
_SCRIPTS = {"lostreg-run": "run"}


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while a run command was running: raised in the main thread,
    like ``KeyboardInterrupt`` for SIGINT (and, like it, not an ``Exception``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_status(signum: int) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended."""
    return 128 + int(signum)


def is_run_command(argv: Sequence[str]) -> bool:
    """Whether the interpreter's command line (``sys.orig_argv``) runs a lostreg command that
    writes run folders: ``python -m lostreg.run``, ``python -m lostreg run``, ``lostreg run``,
    ``lostreg-run`` (and the same for ``protocol``)."""
    argv = list(argv)
    if "-m" in argv[1:]:
        at = argv.index("-m", 1)
        module, rest = (argv[at + 1] if at + 1 < len(argv) else ""), argv[at + 2:]
    elif len(argv) > 1:
        module, rest = os.path.basename(argv[1]), argv[2:]
        if module in _SCRIPTS:
            return True
    else:
        return False
    if module in _MODULES:
        return True
    return module == "lostreg" and bool(rest) and rest[0] in RUN_COMMANDS


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr (the terminal went away on SIGHUP)
        pass


def _while_starting(signum: int, _frame: Any) -> None:
    what = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    _say(f"{what} while starting: nothing was written")
    os._exit(exit_status(signum))


def _settable(signum: int) -> bool:
    """Whether lostreg may take the signal over: not one the process was started ignoring,
    nor one another program installed its own handler for."""
    current = signal.getsignal(signum)
    if signum == signal.SIGINT:
        return current is signal.default_int_handler
    return current == signal.SIG_DFL


def quiet_while_starting(argv: Sequence[str] | None = None) -> bool:
    """In a run command's process, make the three signals one line and an exit while the
    imports run; returns whether it did (called by ``import lostreg``)."""
    argv = getattr(sys, "orig_argv", []) if argv is None else argv
    if not is_run_command(argv) or threading.current_thread() is not threading.main_thread():
        return False
    for signum in SIGNALS:
        if _settable(signum) or signal.getsignal(signum) is _while_starting:
            signal.signal(signum, _while_starting)
    return True


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def running_handlers() -> Iterator[None]:
    """While a command's body runs: SIGINT raises ``KeyboardInterrupt``, SIGTERM and SIGHUP
    raise ``Terminated``; the handlers found are restored afterwards. Outside the main thread
    (a command called from a worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum, current in saved.items():
        if current is _while_starting or _settable(signum):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is _while_starting:  # the command is over: nothing is starting now
                handler = signal.default_int_handler if signum == signal.SIGINT \
                    else signal.SIG_DFL
            if handler is not None:
                signal.signal(signum, handler)

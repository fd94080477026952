"""Background threads every command's exit path waits for (``features.pipeline.warm_start``).

A daemon thread still inside C++ code when the interpreter finalises (importing timm loads
torch's and torchvision's libraries) is ended by ``pthread_exit``, whose unwinding through C++
aborts the process: exit status 134 and "terminate called without an active exception" after
an error that had been reported correctly. So a command waits, boundedly, for such threads
before it returns (``lostreg.runs.distributed.command_status``), and a script that never goes
through a command waits for them at exit.
"""

from __future__ import annotations

import atexit
import threading
import time

# the threads the exit path waits for; see ``wait_for_background``
_BACKGROUND: list[threading.Thread] = []
_EXITING = threading.Event()  # set while the exit path waits: work not started yet is skipped
BACKGROUND_WAIT_S = 60.0


def exit_waits_for(thread: threading.Thread) -> None:
    """Have ``command_status`` wait for ``thread`` before the command returns. A daemon thread
    still inside C++ code (importing timm loads torch's and torchvision's libraries) when the
    interpreter finalises is ended by ``pthread_exit``, whose unwinding through C++ aborts the
    process: exit status 134 and "terminate called without an active exception" after an
    error that had been reported correctly. Outside a command (a script calling ``run_grid``)
    the same wait runs at exit, before the interpreter ends daemon threads."""
    _BACKGROUND[:] = [done for done in _BACKGROUND if done.is_alive()]  # many runs, one process
    if not _BACKGROUND:
        atexit.unregister(wait_for_background)  # registered once, however many threads
        atexit.register(wait_for_background)
    _BACKGROUND.append(thread)


def background_running() -> bool:
    return any(thread.is_alive() for thread in _BACKGROUND)


def exiting() -> bool:
    """True once the exit path waits for the background threads: a thread checks it before
    work that nobody will use any more (starting CUDA after an error)."""
    return _EXITING.is_set()


def wait_for_background(timeout: float | None = None) -> bool:
    """Join every thread of ``exit_waits_for``, all within ``timeout`` seconds (default
    ``BACKGROUND_WAIT_S``: such a thread only imports and starts CUDA, so a longer wait means
    it hangs, and an exit must not hang with it). True when none is left running; one that
    is makes ``leave`` skip the interpreter's teardown."""
    deadline = time.monotonic() + (BACKGROUND_WAIT_S if timeout is None else timeout)
    _EXITING.set()
    try:
        for thread in list(_BACKGROUND):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # a second Ctrl-C stops the wait, not with a traceback
        pass
    _BACKGROUND[:] = [thread for thread in _BACKGROUND if thread.is_alive()]
    _EXITING.clear()  # a later command in this process (tests, notebooks) warms up again
    return not _BACKGROUND

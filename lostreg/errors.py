"""One exception type for bad input: the CLI prints its message on one line and exits 2."""

import difflib
from collections.abc import Iterable


class LostregError(Exception):
    """A user-facing error: the message names the file or setting and what is wrong with it."""


def os_error_message(exc: OSError) -> str:
    """One line for a filesystem error no check anticipated (an output path that is a file, no
    permission, a full disk): the path, and what went wrong there."""
    what = exc.strerror or f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        what += " (a file is where a folder is needed)"
    if exc.filename is None:
        return what
    return f"{exc.filename}: {what}"


def error_line(exc: LostregError | OSError) -> str:
    """The one line every command prints for a user-facing error (exit status 2)."""
    text = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
    return "error: " + text.replace("\r", " ").replace("\n", " ")


def close_progress_bars() -> None:
    """Close every open progress bar, so that the line printed next starts on a line of its
    own: a bar that an interrupt (Ctrl-C) or an error left open ends mid-line (tqdm redraws
    with a carriage return and no newline), and the message would be glued to it. tqdm is
    not imported for this: no bar can be open if nothing imported it."""
    import sys

    module = sys.modules.get("tqdm.std")
    if module is None:
        return
    for bar in list(getattr(module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar on a closed stream: nothing left to end
            pass


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """The end of an "unknown name" line: the close matches among ``known``, or all of them
    (every registry says it the same way)."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=n, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"

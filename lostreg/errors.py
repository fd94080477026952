"""One exception type for bad input: the CLI prints its message on one line and exits 2."""


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

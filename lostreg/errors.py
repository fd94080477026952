"""One exception type for bad input: the CLI prints its message on one line and exits 2."""


class LostregError(Exception):
    """A user-facing error: the message names the file or setting and what is wrong with it."""

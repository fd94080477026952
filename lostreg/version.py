"""The code version every artefact records: the package version and the checkout's commit.

Asked once per process (the code that runs is the code that was imported), by the runs (each
``config.json``) and by ``--version``; cheap to import (no torch), so a ``--version`` is quick.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import lostreg


@functools.lru_cache(maxsize=1)
def checkout_commit() -> str | None:
    """The git commit of the lostreg checkout this code was imported from, with ``-dirty``
    when tracked files changed; None when it is not a checkout (an installed copy) or git is
    missing. Every run's ``config.json`` records it (``git_commit``)."""
    repo = Path(lostreg.__file__).resolve().parent.parent
    if not (repo / ".git").exists():  # not a checkout: never report an enclosing repo's commit
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


#: The version of what lostreg *computes*: bumped only when a change alters some prediction
#: line or figure of some run (a method, a metric, the image protocol, the features), never for
#: a change that alters none (speed, messages, reports). Each run folder records the versions
#: of the code that wrote its predictions (``config.json``: ``result_versions``,
#: ``code_history``), and a resume under another result version is refused
#: (``lostreg.runs.state``): its predictions would match neither version. Versions are
#: declared here, in ``RESULT_VERSIONS``, never guessed from commits.
RESULT_VERSION = 2

#: What each result version changed, for the line that refuses a resume and for readers.
RESULT_VERSIONS = {
    1: "every release before result versions were declared (a config.json without "
       "result_versions)",
    2: "an image whose features are not finite gets no prediction (a nonfinite line, scored as "
       "a failure) instead of a box computed from NaN or inf (issue 20)",
}

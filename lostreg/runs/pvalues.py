"""McNemar p-values kept between leaderboard builds, so a build whose pairs' counts were all
seen before never imports SciPy.

A register pair's McNemar p-value is ``stats.mcnemar_exact``'s: SciPy's ``binomtest`` on the
discordant images. Importing ``scipy.stats`` costs a rebuild 1.2-1.6 s on two cores, more than
everything else a rebuild does. The p-value depends on two whole numbers only (images the
variant gained, discordant images), so a table of them is a pure function, shared by every
pair and every build: ``<runs>/.summaries/.mcnemar.json`` keeps what SciPy gave.

Nothing read back is trusted. The file is read with the bounded JSON reader; its format, its
own sha256 (damage) and the SciPy version that made it (another version may differ in the
last bits) must match, else it is ignored. Each stored p-value is checked, before first use,
against the p-value computed exactly in integers (``exact_p_value``): it must agree to
``TOLERANCE`` (SciPy's floating point differs from the exact value by 5.7e-13 relative at
most in 45,950 cases tried; a stored value outside the tolerance is dropped and recomputed).
The exact value is never what is written: ``comparison.csv`` holds SciPy's bits, as always.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from lostreg.errors import LostregError
from lostreg.evaluation import stats
from lostreg.io import dumps_strict, loads_bounded, read_bounded

FILE_NAME = ".mcnemar.json"  # a dot name: never a run's summary, never pruned as one
FORMAT = "lostreg-mcnemar-p/1"
TOLERANCE = 1e-9  # relative; and absolute 1e-300 where SciPy underflows to a denormal or 0
MAX_BYTES = 16 << 20


def exact_p_value(miss_to_hit: int, discordant: int) -> float:
    """McNemar's exact two-sided p-value from whole numbers: ``2 P(X <= min(k, n - k))`` for
    ``X ~ Binomial(n, 1/2)``, 1 when ``k = n / 2`` or ``n = 0``, at most 1 (the definition
    ``binomtest`` computes in floating point), correctly rounded."""
    k, n = miss_to_hit, discordant
    low = min(k, n - k)
    if n == 0 or 2 * low == n:
        return 1.0
    term = total = 1
    for i in range(low):
        term = term * (n - i) // (i + 1)
        total += term
    return min(1.0, (2 * total) / (1 << n))


def _scipy_version() -> str:
    try:
        return version("scipy")
    except PackageNotFoundError:  # pragma: no cover - scipy is a dependency
        return "unknown"


def _digest(entries: list[list[Any]], scipy: str) -> str:
    text = json.dumps([FORMAT, scipy, entries], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _entry(value: Any) -> tuple[tuple[int, int], float] | None:
    """``((miss_to_hit, discordant), p)`` of a stored ``[k, n, p]``, typed and in range."""
    if not (isinstance(value, list) and len(value) == 3):
        return None
    k, n, p = value
    if (type(k) is not int or type(n) is not int or type(p) is not float
            or not 0 <= k <= n or not 0.0 <= p <= 1.0):
        return None
    return (k, n), p


@dataclass
class PValueTable:
    """p-values by ``(miss_to_hit, discordant)``: ``checked`` ones (computed here, or read and
    held to the exact value) and ``stored`` ones read back and not yet checked."""

    checked: dict[tuple[int, int], float] = field(default_factory=dict)
    stored: dict[tuple[int, int], float] = field(default_factory=dict)
    computed: int = 0  # p-values SciPy computed in this process (tests count them)
    # the keys each folder's file held when loaded or saved: a save that adds none is skipped
    on_disk: dict[Path, set[tuple[int, int]]] = field(default_factory=dict)

    def p_value(self, miss_to_hit: int, hit_to_miss: int) -> float:
        """``stats.mcnemar_exact``'s p-value for these counts, from the table when it holds
        a checked one."""
        key = (miss_to_hit, miss_to_hit + hit_to_miss)
        if key in self.checked:
            return self.checked[key]
        stored = self.stored.pop(key, None)
        if stored is not None and math.isclose(stored, exact_p_value(*key), rel_tol=TOLERANCE,
                                               abs_tol=1e-300):
            self.checked[key] = stored
            return stored
        if stored is not None:  # a wrong stored value: the files holding it are rewritten
            for held in self.on_disk.values():
                held.discard(key)
        base = np.r_[np.zeros(miss_to_hit, bool), np.ones(hit_to_miss, bool)]
        p_value = stats.mcnemar_exact(base, ~base).p_value  # every image discordant
        self.checked[key] = p_value
        self.computed += 1
        return p_value

    def load(self, folder: Path) -> None:
        """Add the entries of ``folder``'s table when the file passes every check."""
        path = folder / FILE_NAME
        if path.is_symlink() or not path.is_file():
            return
        try:
            data = loads_bounded(read_bounded(path, MAX_BYTES, "p-value table"), str(path),
                                 max_bytes=None)
        except LostregError:
            return
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return
        entries, scipy = data.get("entries"), _scipy_version()
        if (data.get("scipy") != scipy or not isinstance(entries, list)
                or data.get("digest") != _digest(entries, scipy)):
            return
        held = self.on_disk.setdefault(folder, set())
        for value in entries:
            entry = _entry(value)
            if entry is None:
                continue
            held.add(entry[0])
            if entry[0] not in self.checked:
                self.stored[entry[0]] = entry[1]

    def save(self, folder: Path) -> None:
        """Write the table into ``folder`` (atomically, never through a link) when it has
        checked entries the folder's file lacks; a folder that cannot be written costs speed,
        never a result."""
        if (not set(self.checked) - self.on_disk.get(folder, set()) or folder.is_symlink()
                or not folder.is_dir()):
            return
        merged = {**self.stored, **self.checked}
        entries = [[k, n, p] for (k, n), p in sorted(merged.items())]
        scipy = _scipy_version()
        payload = {"format": FORMAT, "scipy": scipy, "entries": entries,
                   "digest": _digest(entries, scipy)}
        text = dumps_strict(payload, folder / FILE_NAME)  # p-values are finite: strict JSON
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                os.replace(tmp, folder / FILE_NAME)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return
        self.on_disk[folder] = set(merged)


# p-values are a pure function of the two counts: one table serves every build of a process
P_VALUES = PValueTable()


def mcnemar(base: np.ndarray, other: np.ndarray) -> stats.McNemarResult:
    """``stats.mcnemar_exact(base, other)``, its p-value from ``P_VALUES``."""
    a, b = stats.as_hits(base), stats.as_hits(other)
    if a.shape != b.shape:
        return stats.mcnemar_exact(a, b)  # says what is wrong
    miss_to_hit = int(np.count_nonzero(~a & b))
    hit_to_miss = int(np.count_nonzero(a & ~b))
    return stats.McNemarResult(miss_to_hit, hit_to_miss,
                               P_VALUES.p_value(miss_to_hit, hit_to_miss))

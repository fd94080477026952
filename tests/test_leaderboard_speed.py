"""What makes a leaderboard rebuild fast (issue 20, "Load") without changing a byte: the
methods' titles and order read without importing torch, McNemar p-values kept between builds
(each checked against the exact value before use, SciPy only for new ones)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from leaderboard_cases import write_cases

from lostreg.evaluation import stats
from lostreg.runs import pvalues, summaries

REPO = Path(__file__).resolve().parents[1]


# --- the methods' titles and order without torch -------------------------------------------


def test_declared_methods_are_the_registry_s_built_in_entries() -> None:
    from lostreg.methods import BUILTIN_METHODS, METHODS
    from lostreg.methods.registry import declared_methods

    declared = declared_methods()
    assert declared is not None and len(declared) == len(BUILTIN_METHODS)
    registered = [(name, spec.title) for name, spec in METHODS.items()][:len(declared)]
    assert list(declared.items()) == registered  # same names, titles and order


@pytest.mark.parametrize(("source", "entry"), [
    ('MethodSpec("m", run, ref, title="M")', ("m", "M")),
    ('MethodSpec(name="m", run=run, reference=ref)', ("m", "")),
    ('MethodSpec(NAME, run, ref, title="M")', None),  # a name only running the module knows
    ('MethodSpec("m", run, ref, title=TITLE)', None),
    ('MethodSpec("m", run, ref, **extra)', None),
    ('Other("m", title="M")', None),
])
def test_an_entry_is_read_only_when_spelled_in_literal_strings(source: str, entry) -> None:
    from lostreg.methods.registry import _literal_entry

    call = ast.parse(source, mode="eval").body
    assert _literal_entry(call) == entry


def test_a_plugin_registered_first_still_comes_after_the_built_in_methods() -> None:
    code = ("from lostreg.methods.registry import MethodSpec, register_method, METHODS\n"
            "register_method(MethodSpec('zz_plugin', None, None, title='Z'))\n"
            "print(list(METHODS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=True).stdout
    assert out.strip() == str(["lost", "dinoseg", "tokencut", "zz_plugin"])


# --- McNemar p-values ------------------------------------------------------------------------


def test_the_exact_p_value_is_scipy_s_to_the_tolerance() -> None:
    from scipy.stats import binomtest

    cases = [(k, n) for n in range(0, 41) for k in range(n + 1)]
    rng = np.random.default_rng(0)
    cases += [(int(rng.integers(0, n + 1)), int(n)) for n in rng.integers(41, 2500, 30)]
    for k, n in cases:
        scipy_p = 1.0 if n == 0 else min(1.0, binomtest(k, n, 0.5).pvalue)
        assert np.isclose(pvalues.exact_p_value(k, n), scipy_p, rtol=pvalues.TOLERANCE,
                          atol=1e-300), (k, n)


def _table_file(folder: Path) -> dict:
    return json.loads((folder / pvalues.FILE_NAME).read_text())


def _rewrite(folder: Path, data: dict, *, digest: bool = True) -> None:
    if digest:
        data["digest"] = pvalues._digest(data["entries"], data["scipy"])
    (folder / pvalues.FILE_NAME).write_text(json.dumps(data))


def test_kept_p_values_are_scipy_s_bits_and_spare_scipy(tmp_path: Path) -> None:
    first = pvalues.PValueTable()
    p = first.p_value(3, 9)
    assert first.computed == 1 and p == stats.mcnemar_exact([0] * 3 + [1] * 9,
                                                            [1] * 3 + [0] * 9).p_value
    first.save(tmp_path)
    again = pvalues.PValueTable()
    again.load(tmp_path)
    assert again.p_value(3, 9) == p and again.computed == 0


@pytest.mark.parametrize("damage", ["forged value", "digest", "scipy version", "format",
                                    "not a list", "a bool count", "link"])
def test_a_damaged_or_forged_table_is_never_trusted(tmp_path: Path, damage: str) -> None:
    table = pvalues.PValueTable()
    p = table.p_value(5, 30)
    table.save(tmp_path)
    data = _table_file(tmp_path)
    if damage == "forged value":  # a valid file, digest included, whose value is off by 1e-6
        data["entries"][0][2] = p * (1 + 1e-6)
        _rewrite(tmp_path, data)
    elif damage == "digest":
        data["entries"][0][2] = p / 2
        _rewrite(tmp_path, data, digest=False)
    elif damage == "scipy version":
        data["scipy"] = "0.0.1"
        _rewrite(tmp_path, data)
    elif damage == "format":
        data["format"] = "other/1"
        _rewrite(tmp_path, data)
    elif damage == "not a list":
        data["entries"] = {"5": p}
        _rewrite(tmp_path, data)
    elif damage == "a bool count":
        data["entries"][0][0] = True
        _rewrite(tmp_path, data)
    else:
        outside = tmp_path / "outside.json"
        outside.write_text((tmp_path / pvalues.FILE_NAME).read_text())
        (tmp_path / pvalues.FILE_NAME).unlink()
        (tmp_path / pvalues.FILE_NAME).symlink_to(outside)
    fresh = pvalues.PValueTable()
    fresh.load(tmp_path)
    assert fresh.p_value(5, 30) == p and fresh.computed == 1  # recomputed, not read
    fresh.save(tmp_path)  # rewritten: the next build trusts it again
    assert not (tmp_path / pvalues.FILE_NAME).is_symlink()
    if damage == "link":
        assert json.loads((tmp_path / "outside.json").read_text()) == data  # not written through
    trusted = pvalues.PValueTable()
    trusted.load(tmp_path)
    assert trusted.p_value(5, 30) == p and trusted.computed == 0


def test_a_rebuild_imports_neither_torch_nor_scipy_and_gives_the_same_tables(
        tmp_path: Path) -> None:
    """A first build keeps the pairs' p-values; a second, in a fresh process, needs neither
    torch (the methods' titles come from their source) nor SciPy, and gives the same
    tables, to the byte."""
    runs = write_cases(tmp_path / "runs")
    code = ("import hashlib, json, sys\n"
            "from lostreg.reports import leaderboard as lb\n"
            f"board = lb.collect({str(runs)!r}, report=None)\n"
            "text = lb._csv(board.table) + lb._csv(board.comparison) + "
            "lb.comparison_markdown(board)\n"
            "print(json.dumps([hashlib.sha256(text.encode()).hexdigest(), sorted(m for m in "
            "('torch', 'scipy', 'scipy.stats') if m in sys.modules)]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def child() -> list:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=REPO, env=env, timeout=300, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    first, kept = child(), runs / summaries.STORE_FOLDER / pvalues.FILE_NAME
    assert kept.is_file() and first[1] == ["scipy", "scipy.stats"]  # new pairs: SciPy
    assert child() == [first[0], []]  # nothing new: neither torch nor SciPy, same bytes

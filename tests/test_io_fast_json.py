"""``io.loads_fast``: orjson's speed with ``io.loads_strict``' acceptance and values (issue 20,
"Load": the leaderboard parses every run's predictions). Every text is accepted by both or
refused by both with the same message, and read to the same values, to the bit for floats.
``loads_strict`` is ``json.loads`` less Python's non-finite extensions (issue 20 row 11: no
JSON file holds NaN): it reads what ``json.loads`` reads wherever every number is finite, and
refuses every text that ``json.loads`` reads to a NaN or an infinity."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import orjson
import pytest

from lostreg.io import JsonInputError, loads_bounded, loads_fast, loads_strict


def _outcome(parse, text: bytes):
    try:
        return "value", _exact(parse(text))
    except (ValueError, RecursionError) as exc:
        return "refused", f"{type(exc).__name__}: {exc}"


def _exact(value):
    """A value with its types and float bits spelled out (``-0.0`` is not ``0``, nor ``0.0``)."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value).hex())
    if isinstance(value, list):
        return [_exact(item) for item in value]
    if isinstance(value, dict):
        return [(key, _exact(item)) for key, item in value.items()]
    return (type(value).__name__, value)


CASES = [
    b"[NaN]", b"[Infinity, -Infinity]", b"[1e400]", b"[-1e400]", b"[0.1e999999999999999999]",
    b"[1e-400]", b"[-0]", b"[-0.0]", b"[0]", b"[1E+2, 1e-2, 1.0e5]",
    b"[9223372036854775807]", b"[-9223372036854775808]", b"[-9223372036854775809]",
    b"[18446744073709551615]", b"[18446744073709551616]", b"[123456789012345678901234567890]",
    b"[-123456789012345678901234567890]", b"[1234567890123456789.5]",
    b'[{"a": 1, "b": 2, "a": 3}]', b'["\\ud800"]', b'["\\udc00\\ud800"]', b'["\xed\xa0\x80"]',
    b'["\xff"]', b'["\xc3\xa9\\u00e9\\/"]', b"[\xef\xbb\xbf1]", b"[1]\x00", b"[01]", b"[1.]",
    b"[.5]", b"[+1]", b"[1,]", b'[{"a": 1,}]', b"['a']", b'["a\tb"]', b'["\\x"]', b"[1 2]",
    b"[]", b"[{}]", b"[\t1\r]\n", b"[\x0c1]", b"[//c\n1]", b"[" * 300 + b"]" * 300,
    b"[true, false, null]", b"[True]", b'{"k": [1, {"x": "y"}]}', b"", b" ", b"1", b'"s"',
]


@pytest.mark.parametrize("text", CASES)
def test_a_text_is_read_or_refused_as_loads_strict_does(text: bytes) -> None:
    assert _outcome(loads_fast, text) == _outcome(loads_strict, text)


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True


@pytest.mark.parametrize("text", CASES)
def test_loads_strict_is_json_loads_less_its_non_finite_numbers(text: bytes) -> None:
    plain, strict = _outcome(json.loads, text), _outcome(loads_strict, text)
    if plain[0] == "value" and not _finite(json.loads(text)):
        assert strict[0] == "refused", strict
        assert ("Infinity, which is not JSON" in strict[1]
                or "is not JSON; lostreg writes null" in strict[1]), strict
    else:
        assert strict == plain


def test_the_cases_hold_non_finite_numbers() -> None:
    """The cases above test the refusal: some of them read to NaN or infinity in json."""
    read = [json.loads(text) for text in CASES if _outcome(json.loads, text)[0] == "value"]
    assert sum(not _finite(value) for value in read) >= 5


def test_integers_beyond_64_bits_stay_integers() -> None:
    """orjson alone makes them floats: the digit-run guard sends them to ``json.loads``."""
    text = b"[18446744073709551616, -9223372036854775809, 10000000000000000000000]"
    assert isinstance(orjson.loads(text)[0], float)  # what the guard is there for
    assert _exact(loads_fast(text)) == _exact([2**64, -(2**63) - 1, 10**22])


def _random_doubles(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**64, count, dtype=np.uint64).view(np.float64)
    tiny = rng.uniform(0, 1, count) * 10.0 ** rng.integers(-320, -300, count)
    digits = rng.integers(1, 8, count)
    near = [round(float(v), int(d))  # IoUs as written
            for v, d in zip(rng.uniform(0, 1, count), digits, strict=True)]
    values = np.concatenate([bits, tiny, near, [5e-324, 2.2250738585072014e-308,
                                                 1.7976931348623157e308, 0.1, 1 / 3]])
    return values[np.isfinite(values)]


def test_floats_parse_to_json_loads_bits_in_repr_and_17_digits() -> None:
    values = _random_doubles(3000, 0)
    for form in (repr, "{:.17g}".format, "{:.17e}".format, "{:.6f}".format):
        text = ("[" + ",".join(form(float(v)) for v in values) + "]").encode()
        assert orjson.loads(text) == json.loads(text)  # orjson itself reads them, unguarded
        fast, plain = loads_fast(text), json.loads(text)
        assert [struct.pack("<d", v) for v in fast] == [struct.pack("<d", v) for v in plain]
    assert all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("text", [b"[NaN, 1]", b'{"a": [1, 2', b"\xff", b"[" * 150 + b"]" * 150,
                                  b'[1, "NaN"]'])
def test_bounded_reader_says_what_it_said_before(text: bytes) -> None:
    """As ``json.loads`` says, but NaN (which it reads) is refused, and so is a deep text."""
    try:
        expected = ("value", _exact(json.loads(text)))
    except ValueError as exc:
        expected = ("refused", f"x: not readable JSON ({exc})")
    if text.startswith(b"[" * 150):
        expected = ("refused", "x: not readable JSON (nested more than 100 levels deep)")
    if b"NaN," in text:
        expected = ("refused", "x: not readable JSON (NaN is not JSON; lostreg writes null for "
                               "an undefined figure)")
    try:
        got = ("value", _exact(loads_bounded(text, "x")))
    except JsonInputError as exc:
        got = ("refused", str(exc))
    assert got == expected

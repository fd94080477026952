"""Issue 20 row 11, the reading side: "no JSON file ever holds NaN".

lostreg writes no NaN or Infinity (``io.dumps_strict``). Its one JSON reader
(``io.loads_bounded``, with ``loads_fast`` under it) refuses ``NaN``, ``Infinity``,
``-Infinity`` and numbers overflowing a float, which ``json.loads`` reads as non-finite floats:
a file holding one was damaged or edited, and is treated as any other text that is not JSON (one
line naming the file, a quarantined and recomputed line, a skipped cache entry, a summary
recomputed, a run file rewritten from the validated predictions)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from run_folders import write_run
from test_datasets import _ann, _image, make_coco
from tiny_runs import TINY, only_folder, tiny_command

import lostreg.datasets.derived as derived
import lostreg.features.cache as cache_module
import lostreg.io as io_module
from lostreg.backbones import load_neuron_file
from lostreg.datasets.coco import load_coco20k
from lostreg.datasets.demo import generate_demo
from lostreg.errors import LostregError, error_line
from lostreg.features.cache import FeatureCache
from lostreg.io import (
    JsonInputError,
    loads_bounded,
    loads_fast,
    read_json_object,
    read_jsonl,
    unique_keys,
)
from lostreg.run import main
from lostreg.runs import lock as lock_module
from lostreg.runs import summaries
from lostreg.runs.fastlines import box_columns
from lostreg.runs.lock import holder_info
from lostreg.runs.store import load_run, read_lines, read_predictions

CONSTANTS = ["NaN", "Infinity", "-Infinity"]
# where a constant may sit: alone, nested in arrays, deep in objects, as a line's field
SHAPES = ["X", "[1, [X]]", '{"a": {"b": [0.5, X]}}', '[{"best_iou": X, "hit": true}]']


def strict_json(text: str | bytes) -> object:
    """``json.loads`` failing the test on any non-finite constant (what the files must hold)."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a file"))


def _reason(constant: str) -> str:
    return f"{constant} is not JSON; lostreg writes null for an undefined figure"


def _readers(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Every way ``loads_bounded`` parses: bytes through orjson, text, a hook (``json``),
    and bytes with orjson missing."""
    def without_orjson(text: str, where: str) -> object:
        monkeypatch.setattr(io_module, "_orjson", None)
        try:
            return loads_bounded(text.encode(), where)
        finally:
            monkeypatch.undo()
    return {"bytes": lambda text, where: loads_bounded(text.encode(), where),
            "text": loads_bounded,
            "hook": lambda text, where: loads_bounded(text, where, object_pairs_hook=unique_keys),
            "no orjson": without_orjson}


# --- the reader -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["bytes", "text", "hook", "no orjson"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("constant", CONSTANTS)
def test_a_non_finite_constant_is_not_json(monkeypatch, constant: str, shape: str,
                                           reader: str) -> None:
    text = shape.replace("X", constant)
    found = json.loads(text)  # Python's json reads it: what the refusal is for
    while isinstance(found, (list, dict)):
        found = found[-1] if isinstance(found, list) else list(found.values())[0]
    assert isinstance(found, float) and not math.isfinite(found)
    with pytest.raises(JsonInputError) as info:
        _readers(monkeypatch)[reader](text, "f.json")
    assert error_line(info.value) == f"error: f.json: not readable JSON ({_reason(constant)})"
    assert isinstance(info.value, ValueError) and info.value.where == "f.json"


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1.5E+999", "0.1e99999999999999999999",
                                    "9" * 400 + ".0", "-" + "9" * 309 + "e0"])
def test_a_number_overflowing_a_float_is_refused(monkeypatch, number: str) -> None:
    assert math.isinf(json.loads(number))  # what json.loads would make of it
    for read in _readers(monkeypatch).values():
        with pytest.raises(JsonInputError, match=r"^f\.json: not readable JSON \(the number "
                                                 r"-?[0-9.]+.* overflows a float: it would read"
                                                 r" as -?Infinity, which is not JSON\)$"):
            read(f"[1, {{\"x\": [{number}]}}]", "f.json")


def test_finite_extremes_and_constants_inside_strings_are_read(monkeypatch) -> None:
    text = json.dumps({"NaN": "NaN", "v": ["Infinity", "-Infinity", "1e400", 'say "NaN"'],
                       "Infinity": [1.7976931348623157e308, -1.7976931348623157e308, 5e-324,
                                    0.0, -0.0, 10 ** 400]})
    for read in _readers(monkeypatch).values():
        assert read(text, "f.json") == json.loads(text)
    assert loads_bounded(b"[1e-400, -1e-400]", "f.json") == [0.0, -0.0]  # underflow: finite
    assert loads_fast(b'["NaN", {"Infinity": "-Infinity"}]') == ["NaN",
                                                                {"Infinity": "-Infinity"}]


def test_a_jsonl_line_and_a_json_file_name_where_the_constant_is(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": [NaN]}\n')
    lines = read_jsonl(path)
    assert next(lines) == {"a": 1}
    with pytest.raises(JsonInputError) as info:
        next(lines)
    assert str(info.value) == f"{path}: line 2: not readable JSON ({_reason('NaN')})"
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"corloc": -Infinity}')
    with pytest.raises(LostregError) as info:
        read_json_object(metrics)
    assert str(info.value) == f"{metrics}: not readable JSON ({_reason('-Infinity')})"


# --- predictions: the reports' reader (one line) and its fast path (never alone) --------------


LINE_EDITS = {  # fields the reports' reader does not type-check, and one it does
    "seed": (b'"seed": [1, 1]', b'"seed": [X, 1]'),
    "an extra key": (b'"hit": ', b'"note": X, "hit": '),
    "best_iou": (b'"best_iou": 0.', b'"best_iou": X, "was": 0.'),
}


@pytest.mark.parametrize("edit", list(LINE_EDITS))
@pytest.mark.parametrize("constant", CONSTANTS)
def test_a_predictions_line_with_a_constant_is_one_line_for_the_reports(
        tmp_path: Path, constant: str, edit: str) -> None:
    run = write_run(tmp_path, "r", [True, False, True])
    path = run / "predictions.jsonl"
    lines = path.read_bytes().split(b"\n")
    old, new = LINE_EDITS[edit]
    assert old in lines[1]
    lines[1] = lines[1].replace(old, new.replace(b"X", constant.encode()), 1)
    path.write_bytes(b"\n".join(lines))
    expected = f"{path}:2: not valid JSON ({_reason(constant)})"
    assert box_columns(path.read_bytes()) is None  # the fast path leaves it to the line reader
    with pytest.raises(LostregError) as plain:
        read_predictions(path)
    assert str(plain.value) == expected
    with pytest.raises(LostregError) as loaded:
        load_run(run)
    store = summaries.SummaryStore(tmp_path, None)
    with pytest.raises(LostregError) as summarised:
        summaries.load_summary(run, store)
    assert str(loaded.value) == str(summarised.value) == expected
    with pytest.raises(LostregError) as listed:  # the lines verify and the analyses read
        read_lines(run)
    assert str(listed.value) == (f"{path}: not valid JSON lines ({path}: line 2: not readable "
                                 f"JSON ({_reason(constant)}))")


def test_a_stored_summary_with_a_constant_is_recomputed(tmp_path: Path) -> None:
    """A run summary holding NaN, its digest forged to match: never used, recomputed."""
    runs = tmp_path / "runs"
    write_run(runs, "r", [True, False, True, True])
    assert summaries.scan_summaries(runs, report=None)[1].recomputed == ["r"]
    stored = runs / summaries.STORE_FOLDER / "r.json"
    data = json.loads(stored.read_text())
    strict_json(stored.read_text())  # the writer wrote strict JSON
    data["note"] = math.nan  # a key no check reads
    payload = {key: value for key, value in data.items() if key != "digest"}
    stored.write_text(json.dumps({**payload, "digest": summaries.payload_digest(payload)}))
    assert "NaN" in stored.read_text()
    store = summaries.scan_summaries(runs, report=None)[1]
    assert (store.recomputed, store.reused) == (["r"], 0)
    strict_json(stored.read_text())  # rewritten


def test_the_summary_store_never_writes_a_constant(tmp_path: Path) -> None:
    store = summaries.SummaryStore(tmp_path, None)
    with pytest.raises(ValueError, match="not JSON"):
        store.write_payload("r", {"format": "x", "value": math.inf})
    assert not store.path("r").exists()


# --- a run folder: a rerun validates, never trusts -----------------------------------------------


@pytest.fixture
def finished(tmp_path: Path, tiny_model, one_thread, capsys) -> tuple[list[str], Path]:
    """A finished tiny run of 4 images: its command and its folder."""
    generate_demo(tmp_path / "data")
    argv = tiny_command(tmp_path / "data", tmp_path / "runs")
    assert main(argv) == 0
    capsys.readouterr()
    return argv, only_folder(tmp_path / "runs")


def _rerun(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return out.strip().splitlines()[-1]


def _put(path: Path, key: bytes, value: bytes) -> None:
    """Set ``key`` of a JSON object file to the raw text ``value`` (which json cannot write)."""
    text = path.read_bytes().rstrip()
    assert text.endswith(b"}")
    path.write_bytes(text[:-1] + b', "' + key + b'": ' + value + b"}\n")


@pytest.mark.parametrize("constant", CONSTANTS)
def test_a_constant_in_metrics_json_is_rewritten_from_the_predictions(finished, capsys,
                                                                     constant: str) -> None:
    """A key no check compares (``edited``) used to leave the run "already finished" with the
    constant kept; ``corloc`` used to be compared as a number."""
    argv, folder = finished
    original = strict_json((folder / "metrics.json").read_text())
    for key in (b"edited", b"corloc"):
        text = (folder / "metrics.json").read_bytes()
        if key == b"corloc":
            text = text.replace(f'"corloc": {original["corloc"]}'.encode(),
                                b'"corloc": ' + constant.encode())
            (folder / "metrics.json").write_bytes(text)
        else:
            _put(folder / "metrics.json", key, constant.encode())
        line = _rerun(argv, capsys)
        assert ("| metrics.json rewritten from the predictions: metrics.json could not be read: "
                in line and _reason(constant) in line), line
        metrics = strict_json((folder / "metrics.json").read_text())
        assert metrics["corloc"] == original["corloc"] and "edited" not in metrics
    assert "| already finished: " in _rerun(argv, capsys)


@pytest.mark.parametrize("constant", CONSTANTS)
def test_a_constant_in_config_json_is_rewritten_and_the_leaderboard_says_so(
        finished, capsys, constant: str) -> None:
    argv, folder = finished
    original = strict_json((folder / "config.json").read_text())
    _put(folder / "config.json", b"num_params", constant.encode())
    with pytest.raises(LostregError) as skipped:
        load_run(folder)
    assert _reason(constant) in str(skipped.value)
    assert "rerun the same lostreg.run command" in str(skipped.value)
    line = _rerun(argv, capsys)
    assert "| already finished (config.json rewritten: " in line and _reason(constant) in line
    config = strict_json((folder / "config.json").read_text())
    assert config["identity"] == original["identity"]
    assert config["num_params"] == original["num_params"]
    assert load_run(folder).info.model == TINY.name


@pytest.mark.parametrize("constant", CONSTANTS)
def test_a_predictions_line_with_a_constant_is_quarantined_and_recomputed(
        finished, capsys, constant: str) -> None:
    argv, folder = finished
    path = folder / "predictions.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    good = strict_json(lines[1])
    lines[1] = lines[1].replace(b'"hit": ', b'"best_iou": ' + constant.encode() + b', "hit": ', 1)
    lines[1] = lines[1].replace(f'"best_iou": {good["best_iou"]}, '.encode(), b"", 1)
    path.write_bytes(b"".join(lines))
    (folder / "metrics.json").unlink()  # as a kill leaves it: the run is resumed
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    quarantined = [strict_json(x) for x in (folder / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantined) == 1 and _reason(constant) in json.dumps(quarantined[0])
    after = [strict_json(x) for x in path.read_text().splitlines()]
    assert len(after) == 4 and good in after  # the image recomputed, to the same line
    strict_json((folder / "metrics.json").read_text())


# --- the feature cache: a bad entry is skipped, the run goes on ------------------------------------

KEY = {"format": cache_module.FORMAT_VERSION, "timm_name": "arch.tag", "dataset": "d",
       "split": "s", "feature": "k"}


@pytest.mark.parametrize("constant", CONSTANTS)
def test_a_cache_index_line_with_a_constant_is_a_bad_line(tmp_path: Path, capsys,
                                                          constant: str) -> None:
    cache = FeatureCache(tmp_path, KEY)
    assert cache.write(["img"], [(28, 28)], ["sha256:00"], (2, 2), torch.ones(1, 4, 2))
    cache.close()
    (index,) = cache.index_dir.glob("*.jsonl")
    line = index.read_bytes().rstrip(b"\n")
    assert line.endswith(b"}")
    index.write_bytes(line[:-1] + b', "written": ' + constant.encode() + b"}\n")
    again = FeatureCache(tmp_path, KEY)
    assert again.lookup("img", "sha256:00") is None
    assert "1 bad line(s) ignored" in capsys.readouterr().err


def test_a_cache_key_file_with_a_constant_is_rewritten(tmp_path: Path, capsys) -> None:
    cache = FeatureCache(tmp_path, KEY)
    assert cache.write(["img"], [(28, 28)], ["sha256:00"], (2, 2), torch.ones(1, 4, 2))
    cache.close()
    _put(cache.dir / "key.json", b"extra", b"NaN")
    FeatureCache(tmp_path, KEY).lookup("img", "sha256:00")
    assert "does not match its folder; rewriting" in capsys.readouterr().err
    assert strict_json((cache.dir / "key.json").read_text()) == KEY


def test_a_run_over_a_cache_with_constants_in_its_index_goes_on(tmp_path: Path, tiny_model,
                                                               one_thread, capsys) -> None:
    generate_demo(tmp_path / "data")

    def cli(out: str) -> list[str]:
        return [*tiny_command(tmp_path / "data", tmp_path / out, limit=3),
                "--cache-features", str(tmp_path / "cache")]

    assert main(cli("first")) == 0
    (index,) = (tmp_path / "cache").glob("*/index/*.jsonl")
    lines = index.read_bytes().splitlines()
    index.write_bytes(b"".join(line[:-1] + b', "x": Infinity}\n' for line in lines))
    capsys.readouterr()
    assert main(cli("second")) == 0
    err = capsys.readouterr().err
    assert f"{len(lines)} bad line(s) ignored" in err and "Traceback" not in err
    metrics = strict_json((only_folder(tmp_path / "second") / "metrics.json").read_text())
    assert metrics["seconds"]["cached_images"] == 0  # recomputed, none trusted
    first = strict_json((only_folder(tmp_path / "first") / "metrics.json").read_text())
    assert metrics["corloc"] == first["corloc"]


# --- the other readers: one line each ----------------------------------------------------------


def test_a_neuron_file_with_a_constant_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "neurons.json"
    path.write_text('{"kind": "lostreg-register-neurons", "neurons": {"1": [NaN]}}')
    with pytest.raises(LostregError) as info:
        load_neuron_file(path)
    assert str(info.value).startswith(f"{path}: not a register-neuron file (not readable JSON: "
                                      f"{_reason('NaN')}")
    assert "\n" not in str(info.value)


def test_a_coco_file_with_a_constant_is_one_line(tmp_path: Path) -> None:
    folder = make_coco(tmp_path, [1], [_ann(1, 1, [1.0, 1.0, 2.0, 2.0])], [_image(1)])
    ann_path = folder / "annotations" / "instances_train2014.json"
    text = ann_path.read_text()
    assert '"iscrowd": 0' in text
    ann_path.write_text(text.replace('"iscrowd": 0', '"iscrowd": 0, "score": -Infinity', 1))
    with pytest.raises(LostregError) as info:
        load_coco20k(tmp_path, use_cache=False)
    assert str(info.value) == (f"{ann_path}: cannot read COCO annotations "
                               f"({_reason('-Infinity')})")


# --- files lostreg reads that were read with json.loads, unbounded ------------------------------

HOLDER_DAMAGE = [b"[" * 4096, b'{"pid": NaN, "host": "h"}', b'{"pid": 1e400}', b"\xff"]


@pytest.mark.parametrize("data", HOLDER_DAMAGE)
def test_a_damaged_lock_file_names_no_holder_and_raises_nothing(tmp_path: Path,
                                                               data: bytes) -> None:
    """``json.loads`` of 4096 ``[`` was a RecursionError; NaN was a pid."""
    assert holder_info(data) is None
    lock = tmp_path / "run.lock"
    lock.write_bytes(data)
    assert lock_module.read_holder(lock) is None
    fd = os.open(lock, os.O_RDONLY)
    try:
        assert lock_module._read_holder(fd) is None
    finally:
        os.close(fd)
    assert holder_info(b'{"pid": 7, "host": "h"}') == {"pid": 7, "host": "h"}


def test_a_lock_file_is_read_by_one_reader_never_through_a_link_nor_a_fifo(
        tmp_path: Path) -> None:
    """The grid's check of held runs reads a lock file it does not hold open with
    ``read_holder``: it used to read the whole file, through a link, and block on a FIFO."""
    holder = tmp_path / "holder.lock"
    holder.write_bytes(b'{"pid": 7, "host": "h"}' + b" " * 10_000)
    assert lock_module.read_holder(holder) == {"pid": 7, "host": "h"}  # the first 4096 bytes
    linked = tmp_path / "linked" / "run.lock"
    linked.parent.mkdir()
    linked.symlink_to(holder)
    assert lock_module.read_holder(linked) is None
    fifo = tmp_path / "fifo" / "run.lock"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    assert lock_module.read_holder(fifo) is None  # returns at once: no writer is waited for
    assert lock_module.read_holder(tmp_path / "none.lock") is None


@pytest.mark.parametrize("body", [b'{"records":[NaN]}', b'{"a":' + b"[" * 5000 + b"]" * 5000
                                  + b"}", b'{"x":-Infinity}'])
def test_a_stored_dataset_index_with_a_valid_checksum_and_bad_json_is_not_used(
        body: bytes) -> None:
    """The checksum proves the file intact, not that lostreg wrote it (anyone can compute
    one): its JSON is read by the bounded reader all the same."""
    body += b"\n"
    data = body + derived._TRAILER + derived.sha256_hex(body).encode("ascii") + b"\n"
    assert derived.decode(data) is None
    good = derived.encode({"records": [0.5]})
    assert derived.decode(good) == {"records": [0.5]}

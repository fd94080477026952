"""Issue 20, row 4: every JSON lostreg reads goes through one bounded reader
(``lostreg.io.loads_bounded``), so a file nested 200,000 levels deep is one line naming it (or,
for the feature cache, a skipped entry that is recomputed), never a ``RecursionError``.
Rows 14 and 15: ``--ttr-neurons`` layer keys are plain ASCII integers given once."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_datasets import _ann, _image, make_coco

import lostreg.features.cache as cache_module
from lostreg.backbones import BACKBONES, BackboneSpec, load_neuron_file
from lostreg.datasets import load_dataset
from lostreg.datasets.coco import load_coco20k
from lostreg.errors import LostregError, error_line
from lostreg.features.cache import CacheProblem, FeatureCache
from lostreg.io import (
    MAX_JSON_DEPTH,
    JsonInputError,
    json_depth,
    loads_bounded,
    read_json_object,
    read_jsonl,
)
from lostreg.run import main

DEEP = b"[" * 200_000 + b"]" * 200_000  # what made json.loads raise RecursionError


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- the reader ---------------------------------------------------------------------------------


def test_deep_json_is_one_line_naming_where_it_came_from() -> None:
    for data in (DEEP, DEEP.decode(), b"[" * 200_000, b'{"a":' * 100_000):
        with pytest.raises(JsonInputError) as info:
            loads_bounded(data, "somewhere.json")
        assert error_line(info.value) == ("error: somewhere.json: not readable JSON (nested "
                                          f"more than {MAX_JSON_DEPTH} levels deep)")
        assert isinstance(info.value, ValueError) and isinstance(info.value, LostregError)
        assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    assert loads_bounded(nested(MAX_JSON_DEPTH), "x") is not None  # the limit itself is fine
    with pytest.raises(JsonInputError, match="nested more than 3 levels"):
        loads_bounded(nested(4), "x", max_depth=3)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 5000, "b": ['\\"[[[' * 300, "\\" * 7 + '"[{'], "c": "}]" * 9})
    assert json_depth(text.encode()) == 2
    assert loads_bounded(text, "x") == json.loads(text)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


_TEXT = st.text(alphabet=st.sampled_from(list('[]{}"\\/ab\n\u00e9')), max_size=8)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.booleans())
def test_the_depth_count_is_exact_on_any_json(value: object, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(data) == _depth(value)


def test_size_caps_refuse_before_parsing(tmp_path: Path) -> None:
    with pytest.raises(JsonInputError, match="x: not readable JSON .*11 bytes, more than the 10"):
        loads_bounded(b'"123456789"', "x", max_bytes=10)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"a": "b" * 100}))
    with pytest.raises(LostregError, match=f"^{path}: 109 bytes, more than the 50 a JSON file"):
        read_json_object(path, max_bytes=50)


@pytest.mark.parametrize("name", ["config.json", "metrics.json"])
def test_a_deep_run_file_is_one_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(DEEP)
    with pytest.raises(LostregError) as info:
        read_json_object(path)
    assert str(info.value) == (f"{path}: not readable JSON (nested more than {MAX_JSON_DEPTH} "
                               "levels deep)")


def test_a_deep_jsonl_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(b'{"a": 1}\n' + DEEP + b"\n")
    lines = read_jsonl(path)
    assert next(lines) == {"a": 1}
    with pytest.raises(JsonInputError, match=rf"^{path}: line 2: not readable JSON \(nested"):
        next(lines)
    path.write_bytes(b'{"a": 1}\n' + b" " * 100 + b"1\n")
    with pytest.raises(JsonInputError, match=r"line 2: not readable JSON \(longer than 64 bytes"):
        list(read_jsonl(path, max_line_bytes=64))


# --- the feature cache: skipped and recomputed, never a failed run --------------------------------

KEY = {"format": cache_module.FORMAT_VERSION, "timm_name": "arch.tag", "dataset": "d",
       "split": "s", "feature": "k"}


def test_a_deep_cache_index_line_is_a_bad_line(tmp_path: Path, capsys) -> None:
    cache = FeatureCache(tmp_path, KEY)
    assert cache.write(["img"], [(28, 28)], ["sha256:00"], (2, 2), torch.ones(1, 4, 2))
    cache.close()
    (index,) = cache.index_dir.glob("*.jsonl")
    with open(index, "ab") as handle:
        handle.write(DEEP + b"\n" + b'{"image_id": "' + b"x" * 70_000 + b'"}\n')
    again = FeatureCache(tmp_path, KEY)
    assert again.lookup("img", "sha256:00") is not None
    assert "2 bad line(s) ignored" in capsys.readouterr().err


def test_a_deep_cache_key_file_is_rewritten(tmp_path: Path, capsys) -> None:
    cache = FeatureCache(tmp_path, KEY)
    assert cache.write(["img"], [(28, 28)], ["sha256:00"], (2, 2), torch.ones(1, 4, 2))
    cache.close()
    (cache.dir / "key.json").write_bytes(DEEP)
    again = FeatureCache(tmp_path, KEY)
    assert again.lookup("img", "sha256:00") is not None
    assert "does not match its folder; rewriting" in capsys.readouterr().err
    assert json.loads((cache.dir / "key.json").read_text()) == KEY


def test_a_deep_shard_header_is_a_cache_problem(tmp_path: Path) -> None:
    """Even under a valid checksum (which anyone can compute), a deep header is refused."""
    header = DEEP
    prefix = cache_module.MAGIC + len(header).to_bytes(8, "little")
    digest = hashlib.sha256(prefix + header).digest()
    cache = FeatureCache(tmp_path, KEY)
    name = "0" * 20 + "-" + "a" * 12 + ".feats"
    cache.shard_dir.mkdir(parents=True)
    (cache.shard_dir / name).write_bytes(prefix + digest + header)
    with pytest.raises(CacheProblem, match="unreadable header"):
        cache.read(name)


TINY = BackboneSpec("tiny_json_hard", "vit_small_patch16_224.dino", "dino", 16, 0,
                    pos_embed="dino", model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))


@pytest.mark.usefixtures("one_thread")
def test_a_run_over_a_cache_with_a_deep_index_line_goes_on(tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    load_dataset("demo", tmp_path / "data")
    monkeypatch.setitem(BACKBONES, TINY.name, TINY)

    def cli(out: str) -> list[str]:
        return ["--model", TINY.name, "--weights", "random", "--dataset", "demo",
                "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / out),
                "--cache-features", str(tmp_path / "cache"), "--num-workers", "0",
                "--no-progress", "--limit", "3"]

    assert main(cli("first")) == 0
    (index,) = (tmp_path / "cache").glob("*/index/*.jsonl")
    with open(index, "ab") as handle:
        handle.write(DEEP + b"\n")
    capsys.readouterr()
    assert main(cli("second")) == 0
    err = capsys.readouterr().err
    assert "1 bad line(s) ignored" in err and "Traceback" not in err
    (run_dir,) = (tmp_path / "second").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["seconds"]["cached_images"] == 3


# --- COCO and the neuron list ------------------------------------------------------------------


def test_a_deep_coco_annotation_file_is_one_line(tmp_path: Path) -> None:
    folder = make_coco(tmp_path, [1], [_ann(1, 1, [1.0, 1.0, 2.0, 2.0])], [_image(1)])
    ann_path = folder / "annotations" / "instances_train2014.json"
    payload = json.loads(ann_path.read_text())
    text = json.dumps(payload)
    ann_path.write_text(text[:-1] + ', "info": ' + DEEP.decode() + "}")
    with pytest.raises(LostregError) as info:
        load_coco20k(tmp_path, use_cache=False)
    assert str(info.value) == (f"{ann_path}: cannot read COCO annotations (nested more than "
                               f"{MAX_JSON_DEPTH} levels deep)")


def neuron_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "neurons.json"
    path.write_text(text)
    return path


def test_a_deep_neuron_file_is_one_line(tmp_path: Path) -> None:
    path = neuron_file(tmp_path, '{"kind": "lostreg-register-neurons", "neurons": '
                       + DEEP.decode() + "}")
    with pytest.raises(LostregError) as info:
        load_neuron_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a register-neuron file (not readable JSON: nested "
                              f"more than {MAX_JSON_DEPTH} levels deep)")
    assert "\n" not in message


def _neurons(body: str) -> str:
    return '{"kind": "lostreg-register-neurons", "neurons": {' + body + "}}"


def test_a_layer_given_twice_is_refused(tmp_path: Path) -> None:
    """Row 14: "1" and "01" are the same layer; one of them used to replace the other."""
    with pytest.raises(LostregError, match=r"layer 1 is given twice \(as '1' and '01'\)"):
        load_neuron_file(neuron_file(tmp_path, _neurons('"1": [2], "01": [3]')))
    # the same key twice: json.loads would keep the last one silently
    with pytest.raises(LostregError, match="not readable JSON: key '1' is given twice"):
        load_neuron_file(neuron_file(tmp_path, _neurons('"1": [2], "1": [3]')))
    ttr = load_neuron_file(neuron_file(tmp_path, _neurons('"01": [3], "2": [4]')))
    assert ttr.neurons == ((1, (3,)), (2, (4,)))


@pytest.mark.parametrize("layer", ["\u00b2", "\u0663", "1\u00b2", "1" * 5000, "-1", " 1", ""])
def test_a_layer_that_is_not_an_ascii_integer_is_one_line(tmp_path: Path, layer: str) -> None:
    """Row 15: "²" passes str.isdigit but int() refuses it (a ValueError traceback)."""
    path = neuron_file(tmp_path, _neurons(json.dumps(layer) + ": [1]"))
    with pytest.raises(LostregError, match="is not a non-negative integer") as info:
        load_neuron_file(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)

"""Bounded work for any input: image size limits, out-of-memory lines, limits beyond the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import lostreg.features.pipeline as pipeline_module
import lostreg.runs.sweep as sweep_module
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.datasets import load_dataset
from lostreg.run import main

SPEC = BackboneSpec("tiny_limits", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=dict(depth=2, embed_dim=48, num_heads=3))


@pytest.fixture(autouse=True)
def tiny_model():
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


def cli(root: Path, *extra: str) -> list[str]:
    return ["--model", SPEC.name, "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / "runs"),
            "--num-workers", "0", "--no-progress", *extra]


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def test_an_image_above_max_pixels_is_refused_before_any_forward(tmp_path, capsys, model_builds) -> None:
    index = load_dataset("demo", tmp_path / "data")
    big = max(index.records, key=lambda r: r.width * r.height)
    limit = big.width * big.height - 1
    assert main(cli(tmp_path, "--max-pixels", str(limit))) == 2
    (line,) = errors(capsys)
    assert str(big.path) in line and f"above --max-pixels {limit}" in line
    assert f"{big.width}x{big.height} = {big.width * big.height:,} pixels" in line  # not "0.0 MP"
    assert model_builds == []  # refused from the annotated sizes, before the model is built
    assert main(cli(tmp_path, "--limit", "2", "--max-pixels", str(limit + 1))) == 0


def test_an_image_larger_than_its_annotation_is_refused_when_decoded(tmp_path, capsys) -> None:
    index = load_dataset("demo", tmp_path / "data")
    record = index.records[1]
    Image.new("RGB", (400, 300)).save(record.path)  # the XML still says the old size
    limit = max(r.width * r.height for r in index.records)
    assert 400 * 300 > limit
    assert main(cli(tmp_path, "--limit", "3", "--max-pixels", str(limit))) == 2
    (line,) = errors(capsys)
    assert str(record.path) in line and "400x300" in line and "saved" in line


def test_running_out_of_memory_is_one_line_naming_the_images(tmp_path, capsys, monkeypatch) -> None:
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.10 GiB")

    monkeypatch.setattr(pipeline_module, "extract", exhausted)
    assert main(cli(tmp_path, "--limit", "2")) == 2
    (line,) = errors(capsys)
    first = load_dataset("demo", tmp_path / "data").records[0]
    assert str(first.path) in line and "out of GPU memory" in line and "--batch-size" in line


def test_host_out_of_memory_in_a_method_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    from lostreg.methods import METHODS

    lost = METHODS["lost"]

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 16212345600 bytes")

    monkeypatch.setitem(METHODS, "lost", type(lost)(**{**lost.__dict__, "run": exhausted}))
    assert main(cli(tmp_path, "--limit", "2")) == 2
    (line,) = errors(capsys)
    assert "demo" in line and "in lost: out of memory" in line
    assert sweep_module  # the pass is where methods run


def test_a_limit_beyond_the_dataset_reuses_the_full_run(tmp_path, capsys) -> None:
    assert main(cli(tmp_path)) == 0
    capsys.readouterr()
    assert main(cli(tmp_path, "--limit", "1000")) == 0
    captured = capsys.readouterr()
    assert "--limit 1000 covers all 24 images of demo" in captured.err
    assert "already finished" in captured.out
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_a_filesystem_error_names_the_flag(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("not a folder")
    assert main(cli(tmp_path, "--limit", "1", "--output", str(tmp_path / "file" / "runs"))) == 2
    (line,) = errors(capsys)
    assert f"(--output {tmp_path / 'file' / 'runs'})" in line

"""End-to-end runs on the generated demo dataset, checked against an independent computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from lostreg.backbones import create_backbone
from lostreg.datasets import load_dataset
from lostreg.io import read_jsonl
from lostreg.methods.lost import lost_reference
from lostreg.run import main

MODEL = "dinov2_vits14_reg4"
REPO = Path(__file__).resolve().parents[1]


def cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--weights", "random", "--dataset", "demo",
            "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
            "--num-workers", "0", "--no-progress", *extra]


def only_run(tmp_path: Path) -> Path:
    (run_dir,) = list((tmp_path / "runs").iterdir())
    return run_dir


def independent_box(backbone, path: Path, k: int = 100) -> tuple[list[int], int]:
    """LOST on one image the way the reference script does it: torchvision transforms, pad
    with zeros, hook the last qkv during the full forward, reshape, drop class + registers."""
    img = Image.open(path).convert("RGB")
    tensor = transforms.Compose([transforms.ToTensor(),
                                 transforms.Normalize(backbone.mean, backbone.std)])(img)
    p = backbone.patch_size
    h, w = tensor.shape[1:]
    padded = torch.zeros(3, int(np.ceil(h / p) * p), int(np.ceil(w / p) * p))
    padded[:, :h, :w] = tensor
    store = {}
    hook = backbone.model.blocks[-1].attn.qkv.register_forward_hook(
        lambda m, a, out: store.setdefault("qkv", out))
    with torch.no_grad():
        backbone.model.forward_features(padded[None])
    hook.remove()
    qkv = store["qkv"]
    heads = backbone.model.blocks[-1].attn.num_heads
    b, t, _ = qkv.shape
    keys = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)[1].transpose(1, 2).reshape(b, t, -1)
    keys = keys[0, 1 + backbone.spec.num_registers:]
    out = lost_reference(keys, (padded.shape[1] // p, padded.shape[2] // p), p, (h, w), k)
    return out.box, out.seed


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_cli_run_matches_independent_computation(tmp_path, capsys) -> None:
    assert main(cli(tmp_path, "--batch-size", "5")) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    run_dir = only_run(tmp_path)
    assert run_dir.name.startswith("smoke-demo-dinov2_vits14_reg4-lost-keys-")
    lines = list(read_jsonl(run_dir / "predictions.jsonl"))
    index = load_dataset("demo", tmp_path / "data")
    assert [line["image_id"] for line in lines] == [r.image_id for r in index.records]
    backbone = create_backbone(MODEL, "random")
    hits = 0
    for record, line in zip(index.records, lines, strict=True):
        box, seed = independent_box(backbone, record.path)
        assert line["box"] == box, record.image_id
        assert line["seed"] == list(divmod(seed, -(-record.width // 14)))
        best = max((iou(box, gt) for gt in record.boxes), default=0.0)
        assert line["best_iou"] == pytest.approx(best, abs=1e-6)
        assert line["hit"] == (best >= 0.5)
        assert line["weights"] == "random"
        hits += best >= 0.5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert metrics["n_images"] == len(index.records) and metrics["n_hits"] == hits
    assert metrics["corloc"] == pytest.approx(100 * hits / len(index.records), abs=1e-4)
    assert metrics["smoke_run"] and metrics["weights"] == "random"
    assert config["smoke_run"] and config["weights"]["source"] == "random"
    assert config["numerics"]["tf32_matmul"] is False and config["timm_name"].endswith("lvd142m")
    assert summary.startswith(f"CorLoc {100 * hits / len(index.records):.2f} ({hits}/24) demo")
    assert f"| new: {run_dir}" in summary and "SMOKE RUN" in summary


def test_batch_size_changes_no_result(tmp_path) -> None:
    """Batch size and decoding in worker processes (stacked there, pickled back) change no
    byte of the predictions."""
    assert main(cli(tmp_path / "a", "--batch-size", "1")) == 0
    assert main(cli(tmp_path / "b", "--batch-size", "7", "--num-workers", "2")) == 0
    a = (only_run(tmp_path / "a") / "predictions.jsonl").read_bytes()
    b = (only_run(tmp_path / "b") / "predictions.jsonl").read_bytes()
    assert a == b


def test_wrong_annotated_sizes_split_into_shape_groups(tmp_path) -> None:
    """Batches are formed from the annotated sizes; when an XML lies, the loader regroups the
    decoded images by their real shape and the predictions equal those of a truthful tree."""
    assert main(cli(tmp_path / "truth", "--batch-size", "24")) == 0
    truthful = list(read_jsonl(only_run(tmp_path / "truth") / "predictions.jsonl"))
    index = load_dataset("demo", tmp_path / "lying" / "data")
    for record in index.records[::3]:
        xml = index.root / "Annotations" / f"{record.image_id}.xml"
        text = xml.read_text()
        lie = f"<width>{record.width + 40}</width>"
        assert f"<width>{record.width}</width>" in text
        xml.write_text(text.replace(f"<width>{record.width}</width>", lie))
    assert main(cli(tmp_path / "lying", "--batch-size", "24")) == 0
    lying = list(read_jsonl(only_run(tmp_path / "lying") / "predictions.jsonl"))
    keys = ("image_id", "width", "height", "box", "seed", "best_iou", "hit")
    assert [[line[k] for k in keys] for line in lying] == [[line[k] for k in keys] for line in truthful]


def test_collate_by_shape_keeps_batch_order_and_errors() -> None:
    from lostreg.run import collate_by_shape

    def item(position, shape=None, error=None):
        if error:
            return {"position": position, "error": error}
        return {"position": position, "tensor": torch.full((3, *shape), float(position)),
                "size": (shape[0] - 1, shape[1]), "error": None}

    loaded = collate_by_shape([item(0, (14, 28)), item(1, (28, 14)), item(2, error="x.jpg: bad"),
                               item(3, (14, 28))])
    assert loaded.n_items == 4 and loaded.errors == ["x.jpg: bad"]
    assert [g.positions for g in loaded.groups] == [[0, 3], [1]]
    assert loaded.groups[0].images.shape == (2, 3, 14, 28)
    assert loaded.groups[0].images[:, 0, 0, 0].tolist() == [0.0, 3.0]
    assert loaded.groups[0].sizes == [(13, 28), (13, 28)] and loaded.groups[1].sizes == [(27, 14)]


def test_resume_after_torn_write_computes_only_missing_images(tmp_path) -> None:
    assert main(cli(tmp_path, "--batch-size", "4")) == 0
    run_dir = only_run(tmp_path)
    full = (run_dir / "predictions.jsonl").read_bytes()
    full_metrics = json.loads((run_dir / "metrics.json").read_text())
    # simulate a kill -9: 9 complete lines, then half of the 10th, no metrics
    lines = full.splitlines(keepends=True)
    (run_dir / "predictions.jsonl").write_bytes(b"".join(lines[:9]) + lines[9][:20])
    (run_dir / "metrics.json").unlink()
    assert main(cli(tmp_path, "--batch-size", "4")) == 0
    assert (run_dir / "predictions.jsonl").read_bytes() == full
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_with"] == 9 and metrics["seconds"]["images_computed"] == 15
    assert metrics["corloc"] == full_metrics["corloc"]
    # a third run finds everything done, computes nothing and leaves the files as they are:
    # metrics.json keeps the timings of the work done, config.json its provenance
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.json", "config.json")}
    assert main(cli(tmp_path, "--batch-size", "2")) == 0
    assert (run_dir / "predictions.jsonl").read_bytes() == full
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, name


def test_corrupt_image_is_named_and_nothing_is_lost(tmp_path, capsys) -> None:
    load_dataset("demo", tmp_path / "data")
    victim = sorted((tmp_path / "data" / "demo" / "JPEGImages").glob("*.jpg"))[3]
    original = victim.read_bytes()
    victim.write_bytes(b"\xff\xd8 definitely not a jpeg")
    assert main(cli(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and victim.name in err and "rerun" in err
    run_dir = only_run(tmp_path)
    assert len(list(read_jsonl(run_dir / "predictions.jsonl"))) == 23
    assert not (run_dir / "metrics.json").exists()
    victim.write_bytes(original)
    assert main(cli(tmp_path)) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_images"] == 24 and metrics["seconds"]["images_computed"] == 1


def test_limit_and_settings_get_their_own_run(tmp_path) -> None:
    assert main(cli(tmp_path, "--limit", "3")) == 0
    assert main(cli(tmp_path, "--limit", "3", "--k-patches", "5", "--features", "q")) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run_dir in runs:
        assert json.loads((run_dir / "metrics.json").read_text())["n_images"] == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "dinov2_vitl14_reg", "--weights", "random", "--dataset", "demo"],
         "did you mean dinov2_vitl14_reg4"),
        (["--dataset", "voc07", "--data-root", "/nonexistent/lostreg", "--no-download",
          "--weights", "random", "--model", MODEL], "/nonexistent/lostreg"),
        (["--weights", "/nonexistent/w.pth", "--model", MODEL, "--dataset", "demo"],
         "/nonexistent/w.pth: weights file not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle) -> None:
    env = {**os.environ, "LOSTREG_DATA": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lostreg.run", *args, "--output",
                           str(tmp_path / "runs"), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def write_tiny_voc07(root: Path, n: int = 3) -> None:
    folder = root / "VOC2007"
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "Annotations").mkdir()
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(n)]
    for image_id in ids:
        Image.fromarray(np.full((40, 50, 3), 90, dtype=np.uint8)).save(
            folder / "JPEGImages" / f"{image_id}.jpg")
        (folder / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><size><width>50</width><height>40</height></size><object><name>x</name>"
            "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>"
            "</object></annotation>")
    (folder / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")


def test_incomplete_benchmark_dataset_is_refused_unless_allowed(tmp_path, capsys) -> None:
    write_tiny_voc07(tmp_path / "data")
    args = ["--model", MODEL, "--weights", "random", "--dataset", "voc07", "--data-root",
            str(tmp_path / "data"), "--output", str(tmp_path / "runs"), "--num-workers", "0",
            "--no-progress", "--no-download"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lists 3 images, expected 5011" in err and "--allow-partial-dataset" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert main([*args, "--allow-partial-dataset"]) == 0
    config = json.loads((only_run(tmp_path) / "config.json").read_text())
    assert config["identity"]["dataset_images"] == 3


def test_lostreg_entry_point_dispatches_and_documents_features(tmp_path, capsys) -> None:
    from lostreg import cli as lostreg_cli

    assert lostreg_cli.main(["--help"]) == 0
    assert "register token are removed" in capsys.readouterr().out
    assert lostreg_cli.main(["nonsense"]) == 2
    assert lostreg_cli.main(["run", *cli(tmp_path, "--limit", "2")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("CorLoc ")


def test_decoding_workers_default_to_none_on_the_cpu() -> None:
    from lostreg.cli import workers_count
    from lostreg.run import decode_workers

    assert decode_workers(torch.device("cpu")) == 0  # the forward already uses every core
    assert 1 <= decode_workers(torch.device("cuda")) <= 8
    assert workers_count("auto") is None and workers_count("3") == 3


def test_summary_line_names_every_setting_that_changes_the_result(tmp_path, capsys) -> None:
    assert main(cli(tmp_path, "--limit", "3", "--precision", "bf16", "--no-hard",
                    "--k-patches", "7")) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert " k=7" in line and " no_hard" in line and " bf16" in line and " limit=3" in line
    assert " k lost k=7" in line  # the feature, the method (LOST too), then its parameters

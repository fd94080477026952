"""The README's "Extending lostreg" examples, executed from the README and run end to end: a
method, a backbone family, a metric and a dataset, each one registration. The registries are
restored afterwards, so nothing leaks into other tests."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.backbones.families import FAMILIES
from lostreg.datasets import DATASETS, load_dataset
from lostreg.evaluation import METRICS
from lostreg.methods import METHODS
from lostreg.run import main

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = BackboneSpec("tiny_extending", "vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0,
                    model_kwargs=dict(depth=2, embed_dim=32, num_heads=2))


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(),
                      re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


@pytest.fixture
def registries():
    """Every registry as it was, after the test."""
    saved = (dict(METHODS), list(FAMILIES), dict(METRICS), dict(DATASETS), dict(BACKBONES))
    yield
    for live, old in zip((METHODS, METRICS, DATASETS, BACKBONES), saved[0:1] + saved[2:],
                         strict=True):
        live.clear()
        live.update(old)
    FAMILIES[:] = saved[1]


def _boxes_csv_tree(root: Path) -> None:
    """``root/boxes_csv``: the demo's images and boxes, written as the example reads them."""
    demo = load_dataset("demo", root)
    folder = root / "boxes_csv"
    (folder / "images").mkdir(parents=True)
    with open(folder / "boxes.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["file", "x1", "y1", "x2", "y2"])
        for record in demo.records[:6]:
            (folder / "images" / record.path.name).write_bytes(record.path.read_bytes())
            for box in record.boxes:
                out.writerow([record.path.name, *box])


@pytest.mark.usefixtures("registries", "one_thread")
def test_a_method_a_metric_and_a_dataset_run_end_to_end(tmp_path, capsys) -> None:
    for name in ("method", "metric", "dataset"):
        exec(compile(example(name), f"README example {name}", "exec"), {})  # noqa: S102
    BACKBONES[TINY.name] = TINY
    _boxes_csv_tree(tmp_path / "data")
    command = ["--dataset", "boxes_csv", "--data-root", str(tmp_path / "data"),
               "--method", "keynorm,lost", "--keynorm-scale", "1.0,1.2", "--model", TINY.name,
               "--weights", "random", "--output", str(tmp_path / "runs"), "--no-progress",
               "--num-workers", "0"]
    assert main(command) == 0
    summaries = [line for line in capsys.readouterr().out.splitlines()
                 if line.startswith("CorLoc ")]
    assert len(summaries) == 3 and all(" CorLoc@0.7 " in line for line in summaries)
    assert sorted(line.split()[9] for line in summaries) == ["keynorm", "keynorm", "lost"]
    for run_dir in (tmp_path / "runs").iterdir():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["n_images"] == 6 and 0 <= metrics["corloc70"] <= metrics["corloc"]
        lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").open()]
        assert len(lines) == 6
        assert all(not line["hit70"] or line["hit"] for line in lines)  # 0.7 is stricter
        assert sum(line["hit70"] for line in lines) == round(metrics["corloc70"] * 6 / 100)
    assert main(command) == 0  # a rerun finds every run finished
    assert capsys.readouterr().out.count("already finished") == 3


@pytest.mark.usefixtures("registries")
def test_a_family_without_blocks_or_class_token_gives_its_keys() -> None:
    from lostreg.backbones.build import Backbone
    from lostreg.backbones.weights import WeightsInfo
    from lostreg.features.extract import FeatureRequest, extract

    namespace: dict = {}
    exec(compile(example("family"), "README example family", "exec"), namespace)  # noqa: S102
    torch.manual_seed(0)
    model = namespace["LayersViT"]().eval()
    spec = BackboneSpec("layers_vit_toy", "none", "layers_vit", 8, 0)
    backbone = Backbone(spec, model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                        WeightsInfo("random", None, None), 0)
    images = torch.randn(2, 3, 24, 40)
    keys = extract(backbone, images, [FeatureRequest("k", -1)])[FeatureRequest("k", -1)]
    # by hand: the last block's input, normalised, through its qkv projection's key part
    with torch.no_grad():
        tokens = model.embed(images).flatten(2).transpose(1, 2)
        for layer in model.layers[:-1]:
            tokens = layer(tokens)
        last = model.layers[-1]
        qkv = last.attn.qkv(last.norm1(tokens))
    dim = tokens.shape[-1]
    assert keys.shape == (2, 3 * 5, dim)
    assert torch.equal(keys, qkv[..., dim:2 * dim])
    with pytest.raises(Exception, match="class token"):
        extract(backbone, images, [FeatureRequest("attn", -1)])


@pytest.mark.usefixtures("registries", "one_thread")
def test_a_family_module_is_scored_end_to_end(tmp_path) -> None:
    """The README's one-liner: the family's module scored through ``lostreg.evaluate``."""
    import lostreg

    namespace: dict = {}
    exec(compile(example("family"), "README example family", "exec"), namespace)  # noqa: S102
    torch.manual_seed(0)
    result = lostreg.evaluate(namespace["LayersViT"](), dataset="demo", method="lost",
                              patch_size=8, data_root=tmp_path / "data", limit=4,
                              output=tmp_path / "runs", no_progress=True, num_workers=0)
    (run_dir,) = result.run_dirs
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").open()]
    assert len(lines) == 4 and result.metrics["n_images"].tolist() == [4]

"""Keep ``benchmarks/bench_protocol.py`` from rotting: its core on a tiny model and 3 images.

Checks correctness only (the single run's boxes equal the protocol's run of the same setting,
every part is timed and counted); never a timing."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_protocol  # noqa: E402
from benchmarks.common import sample_sizes, write_voc_tree  # noqa: E402
from lostreg.backbones import BackboneSpec, create_backbone  # noqa: E402
from lostreg.methods import METHODS  # noqa: E402
from lostreg.runs.folder import RunFolder  # noqa: E402

TINY = BackboneSpec("tiny_bench_protocol", "vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0,
                    pos_embed="dinov2", model_kwargs=dict(depth=4, embed_dim=48, num_heads=3))


def test_bench_protocol_core_runs_and_checks_its_boxes(tmp_path, one_thread) -> None:
    cpu = torch.device("cpu")
    index = write_voc_tree(tmp_path / "data", sample_sizes(3, seed=4, scale=0.12), seed=4)
    backbone = create_backbone(TINY, "random", cpu)
    lost, append = METHODS["lost"], RunFolder.append
    result = bench_protocol.measure(index, backbone, cpu, tmp_path, batch_size=4,
                                    num_workers=0, repeats=1)
    assert METHODS["lost"] is lost and RunFolder.append is append  # instrumentation undone
    assert result["n_runs"] == 144 and result["same_boxes_as_single"] is True
    single, protocol = result["single_parts"], result["protocol_parts"]
    batches = int(single["calls_extract"])
    # LOST serves a whole bias sweep from one Gram matrix: one call per batch for each
    # (feature, layer, normalize) group: 3 features x 4 layers x 2 normalisations = 24.
    assert single["calls_lost"] == batches and protocol["calls_lost"] == 24 * batches
    assert protocol["calls_extract"] == batches  # one forward per batch for the whole grid
    assert protocol["calls_append"] == 144 * batches and protocol["calls_finish_runs"] == 144
    assert result["ratio_protocol_vs_single"] > 0
    text = bench_protocol.report(bench_protocol.build_parser().parse_args([]), result,
                                 backbone, cpu)
    assert "RATIO protocol (pass + study) / single run" in text
    assert "not applicable to this CPU figure" in text

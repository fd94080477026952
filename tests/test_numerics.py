"""No TF32 for matmuls and cuDNN (fp32 is exact, LOST is float32 at any precision), and the
run records it."""

from __future__ import annotations

import json

import pytest
import torch

from lostreg.run import set_numerics


@pytest.fixture(autouse=True)
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp32_turns_tf32_off_and_reports_it() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = set_numerics("fp32")
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert report["precision"] == "fp32"
    assert report["tf32_matmul"] is False and report["tf32_cudnn"] is False


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_keeps_lost_similarities_float32(precision) -> None:
    """Autocast covers the backbone; TF32 would only round LOST's float32 ``F F^T`` on a GPU
    (config.json says ``lost_similarity_dtype: float32``), so it stays off."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = set_numerics(precision)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert report["precision"] == precision and report["lost_similarity_dtype"] == "float32"
    assert report["tf32_matmul"] is False and report["tf32_cudnn"] is False


def test_fp32_after_bf16_is_exact_again() -> None:
    """A bf16 run earlier in the same process must not leak TF32 into a later fp32 run."""
    set_numerics("bf16")
    report = set_numerics("fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert not report["tf32_matmul"] and not report["tf32_cudnn"]


def test_run_records_numerics_in_config(tmp_path) -> None:
    """config.json says what the run used: TF32 off in fp32 even if it was on before."""
    from lostreg.backbones import BACKBONES, BackboneSpec
    from lostreg.run import RunConfig, run_benchmark

    spec = BackboneSpec("tiny_numerics", "vit_small_patch16_224.dino", "dino", 16, 0,
                        pos_embed="dino", model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    BACKBONES[spec.name] = spec
    try:
        result = run_benchmark(RunConfig(
            model=spec.name, dataset="demo", data_root=tmp_path / "data", weights="random",
            limit=2, output=tmp_path / "runs", num_workers=0, progress=False, device="cpu"))
    finally:
        BACKBONES.pop(spec.name, None)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["precision"] == "fp32"
    assert config["numerics"]["precision"] == "fp32"
    assert config["numerics"]["tf32_matmul"] is False
    assert config["numerics"]["tf32_cudnn"] is False

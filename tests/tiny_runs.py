"""A tiny random backbone and the command that runs it on the generated demo scenes, for the
run-side hardening tests (issue 20): a whole run in a fraction of a second after warm-up."""

from __future__ import annotations

from pathlib import Path

from lostreg.backbones import BackboneSpec

TINY = BackboneSpec("tiny_hardening", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg",
                    model_kwargs=dict(depth=2, embed_dim=48, num_heads=6))


def tiny_command(data: Path, runs: Path, *extra: str, limit: int = 4) -> list[str]:
    """``lostreg.run`` arguments: the tiny model (random weights) on the first ``limit`` demo
    scenes, in the main process, on the CPU."""
    return ["--model", TINY.name, "--weights", "random", "--dataset", "demo", "--data-root",
            str(data), "--runs", str(runs), "--num-workers", "0", "--no-progress", "--device",
            "cpu", "--limit", str(limit), *extra]


def only_folder(runs: Path) -> Path:
    (folder,) = [path for path in Path(runs).iterdir() if path.is_dir()]
    return folder

